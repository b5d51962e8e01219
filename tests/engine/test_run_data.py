"""A run's data: what a dual run blanks is printed at start, and precise BN reads true pairs only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fredfusion.config import load_config
from fredfusion.data.dataset import PreparedDataset
from fredfusion.engine.batchnorm import recalibrate_batchnorm
from fredfusion.engine.run_data import open_run_data
from fredfusion.model import build_model


def _lines(data: Path, **overrides: object) -> list[str]:
    lines: list[str] = []
    open_run_data(load_config(overrides={"data": str(data), **overrides}), lines.append)
    return lines


def test_the_unpaired_images_and_the_dropout_are_printed_at_start(tiny_prepared: Path) -> None:
    lines = _lines(tiny_prepared)  # a dual model's defaults: pairs auto (any), dropout auto (0.3)
    assert lines[0].startswith("data: 62 train /") and "train dual_rate 48/62 (77.4%)" in lines[0]
    assert lines[1] == (
        "unpaired: 0 rgb_only + 14 event_only train images (pairs any), "
        "their missing modality blanked (zeros)"
    )
    assert lines[2] == (
        "modality dropout: 0.3 of the true pairs trained with their events blanked (target boxes less a "
        "random part of each, where the other modality shows them, filled from elsewhere in the frame, "
        "drawn per sample on the device), rising from 0 over the first 50% of the run"
    )
    frames = _lines(
        tiny_prepared,
        modality_dropout=0.25,
        modality_dropout_region="image",
        modality_dropout_side="both",
        modality_dropout_ramp=0,
    )
    assert frames[2] == (
        "modality dropout: 0.25 of the true pairs trained with RGB or events (50/50) blanked (whole frame, "
        "zeros, drawn per sample on the device)"
    )
    plain = _lines(tiny_prepared, pairs="required", modality_dropout=0)
    assert "train dual_rate 48/48 (100.0%)" in plain[0]
    assert not any(line.startswith(("unpaired", "modality dropout")) for line in plain)
    assert len(_lines(tiny_prepared, modality="rgb")) == 1  # single models: their frames, no dropout


def test_precise_bn_reads_only_images_with_every_frame(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    ds = PreparedDataset(tiny_prepared, "train", modality="dual", pairs="any")
    read: list[int] = []
    load = ds.load
    monkeypatch.setattr(ds, "load", lambda ids, *a, **k: (read.extend(ids.tolist()), load(ids, *a, **k))[1])
    used = recalibrate_batchnorm(build_model("dual", "n"), ds, (64, 128), images=100, batch_size=32)
    paired = set(ds.ids[ds.has_rgb & ds.has_event].tolist())
    assert used == len(paired) == len(read) and set(read) == paired
    assert np.any(~ds.has_rgb)  # the split does hold unpaired images
