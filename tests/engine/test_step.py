"""The training step's blanking of dual samples: unpaired images (pairs: any) enter with their missing
modality blank, modality dropout blanks one modality of true pairs, reproducibly, and leaves the
augmentation as it was; default runs do not blank at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fredfusion.engine.step as step_mod
from fredfusion.config import load_config
from fredfusion.data import blanking
from fredfusion.data.blanking import blank_frames, box_cover
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import BatchLoader, DeviceBatch
from fredfusion.engine.step import TrainStep
from fredfusion.model import build_model
from shared import TINY_TRAIN

CPU = torch.device("cpu")


_STEPS: dict[tuple[Any, ...], TrainStep] = {}


OPTIONS_OFF = {"pairs": "required", "modality_dropout": 0, "modality_dropout_region": "image",
               "modality_dropout_side": "both", "modality_dropout_ramp": 0}  # fmt: skip
"""The fusion training options switched off: each test below switches on what it tests."""


def _step(data: Path, **overrides: Any) -> TrainStep:
    """A dual YOLO-n TrainStep of the tiny settings with ``overrides`` on OPTIONS_OFF (built once per
    module; ``defaults=True``: the defaults instead of OPTIONS_OFF)."""
    key = (data, *sorted(overrides.items()))
    if key not in _STEPS:
        base = {} if overrides.pop("defaults", False) else OPTIONS_OFF
        cfg = load_config(overrides={**TINY_TRAIN, "data": str(data), "fp16": False, **base, **overrides})
        model = build_model("dual", "n", num_classes=1)
        _STEPS[key] = TrainStep(cfg, model, 8, device=CPU, amp_dtype=None, optimizer_choice=("sgd", None))
    return _STEPS[key]


def _split_batch(data: Path, pairs: str) -> DeviceBatch:
    """One batch of 24 train images spread over the split (unpaired ones too with ``pairs: any``)."""
    ds = PreparedDataset(data, "train", modality="dual", pairs=pairs, max_images=24, skip_bad=True)
    return next(iter(BatchLoader(ds, len(ds), shuffle=False, drop_last=False)))


def _inputs(
    step: TrainStep,
    batch: DeviceBatch,
    monkeypatch: pytest.MonkeyPatch,
    seed: int = 0,
    progress: float = 1.0,
) -> dict[str, Any]:
    """The model inputs and keep mask ``step.run`` produces for ``batch`` at ``progress`` (the
    optimisation left out)."""
    got: dict[str, Any] = {}

    def blank(rgb: torch.Tensor, event: torch.Tensor, keep: torch.Tensor) -> Any:
        got["keep"] = keep.clone()
        return blank_frames(rgb, event, keep)

    def optimize(
        _wrapped: Any, rgb: torch.Tensor, event: torch.Tensor, targets: torch.Tensor, *_: Any
    ) -> Any:
        got["rgb"], got["event"], got["targets"] = rgb, event, targets
        return None

    monkeypatch.setattr(step_mod, "blank_frames", blank)
    monkeypatch.setattr(step, "optimize", optimize)
    step.run(step.model, batch, True, torch.Generator().manual_seed(seed), progress)
    return got


def _blank(x: torch.Tensor) -> torch.Tensor:
    return (x == 0).flatten(1).all(1)


def test_unpaired_images_train_with_their_missing_modality_blank(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    batch = _split_batch(tiny_prepared, "any")
    present = batch.present
    assert present is not None and (~present[:, 0]).sum() > 0  # event_only images are in the batch
    got = _inputs(_step(tiny_prepared, pairs="any"), batch, monkeypatch)
    assert torch.equal(got["keep"], present)
    assert torch.equal(_blank(got["rgb"]), ~present[:, 0])  # blank exactly where the RGB frame is missing
    assert not bool(_blank(got["event"]).any())


def test_dropout_blanks_one_modality_of_every_drawn_pair(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    batch = _split_batch(tiny_prepared, "required")
    got = _inputs(_step(tiny_prepared, modality_dropout=1.0), batch, monkeypatch)
    keep = got["keep"]
    assert bool((keep.sum(1) == 1).all())  # every true pair lost exactly one modality, none both
    assert 0 < int(keep[:, 0].sum()) < len(keep)  # both sides drawn
    assert torch.equal(_blank(got["rgb"]), ~keep[:, 0]) and bool(_blank(got["event"])[~keep[:, 1]].all())


def test_dropout_is_reproducible_and_leaves_the_augmentation_alone(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    batch = _split_batch(tiny_prepared, "any")
    plain = _inputs(_step(tiny_prepared, pairs="any"), batch, monkeypatch)
    step = _step(tiny_prepared, pairs="any", modality_dropout=0.5)
    first = _inputs(step, batch, monkeypatch)
    again = _inputs(step, batch, monkeypatch)  # a new generator of the same seed: the same draws
    other = _inputs(step, batch, monkeypatch, seed=1)
    assert torch.equal(first["keep"], again["keep"]) and not torch.equal(first["keep"], other["keep"])
    dropped = ~first["keep"].all(1) & batch.present.all(1)
    assert 0 < int(dropped.sum()) < int(batch.present.all(1).sum())
    for k, kind in enumerate(("rgb", "event")):
        kept = first["keep"][:, k]
        assert torch.equal(first[kind][kept], plain[kind][kept]), kind  # the same augmented frames


def test_the_dropout_share_rises_over_the_ramp(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """``modality_dropout_ramp: 0.5``: no pair dropped at the start, the share growing linearly to
    the configured one half-way through the run, then staying there."""
    step = _step(tiny_prepared, modality_dropout=1.0, modality_dropout_ramp=0.5)
    assert [step.dropout_at(p) for p in (0.0, 0.25, 0.5, 0.9)] == [0.0, 0.5, 1.0, 1.0]
    assert _step(tiny_prepared, modality_dropout=0.4).dropout_at(0.0) == 0.4  # no ramp: from the start
    batch = _split_batch(tiny_prepared, "required")
    start = _inputs(step, batch, monkeypatch, progress=0.0)["keep"]
    half = _inputs(step, batch, monkeypatch, progress=0.25)["keep"]
    assert bool(start.all())  # nothing dropped
    assert 0 < int((half.sum(1) == 1).sum()) < len(half)  # some pairs dropped, not all
    assert bool((_inputs(step, batch, monkeypatch, progress=0.6)["keep"].sum(1) == 1).all())


def test_box_dropout_replaces_one_modality_inside_the_boxes_only(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """``modality_dropout_region: boxes``: unpaired images still lose their missing modality whole;
    every true pair (share 1.0) is drawn for exactly one modality, changed only inside its grown boxes."""
    batch = _split_batch(tiny_prepared, "any")
    present = batch.present
    assert present is not None
    plain = _inputs(_step(tiny_prepared, pairs="any"), batch, monkeypatch)
    drawn: dict[str, torch.Tensor] = {}

    def blank_boxes(
        rgb: torch.Tensor, event: torch.Tensor, dropped: torch.Tensor, *rest: Any, **kw: Any
    ) -> Any:
        drawn["dropped"] = dropped.clone()
        return blanking.blank_boxes(rgb, event, dropped, *rest, **kw)

    monkeypatch.setattr(step_mod, "blank_boxes", blank_boxes)
    got = _inputs(
        _step(tiny_prepared, pairs="any", modality_dropout=1.0, modality_dropout_region="boxes"),
        batch,
        monkeypatch,
    )
    assert torch.equal(got["keep"], present)  # the whole-frame blanking: the missing frames only
    assert torch.equal(got["targets"], plain["targets"])
    cover = box_cover(got["targets"], len(present), got["rgb"].shape[-2:]).unsqueeze(1)
    changed = torch.stack([(got[k] != plain[k]).flatten(1).any(1) for k in ("rgb", "event")], 1)
    dropped, pairs = drawn["dropped"], present.all(1)
    assert bool((dropped[pairs].sum(1) == 1).all()) and not bool(dropped[~pairs].any())  # one side
    assert not bool((changed & ~dropped).any())  # only the drawn modality changed
    assert bool(changed[:, 0].any()) and bool(changed[:, 1].any())  # both sides drawn and replaced
    for k in ("rgb", "event"):
        assert torch.equal(got[k] * ~cover, plain[k] * ~cover)  # nothing outside the boxes moved


def test_events_only_box_dropout_leaves_the_rgb_alone(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """``modality_dropout_side: event``: every true pair (share 1.0) has its events replaced inside some
    box and its RGB exactly as augmented; nothing outside the grown boxes moves."""
    batch = _split_batch(tiny_prepared, "required")
    plain = _inputs(_step(tiny_prepared), batch, monkeypatch)
    got = _inputs(
        _step(
            tiny_prepared,
            modality_dropout=1.0,
            modality_dropout_region="boxes",
            modality_dropout_side="event",
        ),
        batch,
        monkeypatch,
    )
    assert torch.equal(got["rgb"], plain["rgb"])
    cover = box_cover(got["targets"], len(batch.ids), got["event"].shape[-2:]).unsqueeze(1)
    assert torch.equal(got["event"] * ~cover, plain["event"] * ~cover)
    assert bool((got["event"] != plain["event"]).any())


def test_runs_without_missing_or_dropped_modalities_do_not_blank(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    step = _step(tiny_prepared)
    got = _inputs(step, _split_batch(tiny_prepared, "required"), monkeypatch)
    assert step.blanking is False and "keep" not in got and not bool(_blank(got["rgb"]).any())
    assert _step(tiny_prepared, pairs="any", modality_dropout=0.5).blanking is True


def test_dual_models_train_unpaired_frames_and_box_dropout_by_default(tiny_prepared: Path) -> None:
    from fredfusion.config import dropout_share, train_pairs

    cfg = _step(tiny_prepared, defaults=True).cfg
    assert (train_pairs(cfg), dropout_share(cfg)) == ("any", 0.3)
    assert (cfg.modality_dropout_region, cfg.modality_dropout_side) == ("box_parts", "event")
    assert cfg.modality_dropout_ramp == 0.5
    assert _step(tiny_prepared, defaults=True).blanking is True
    for single in ("rgb", "event"):
        cfg = load_config(overrides={**TINY_TRAIN, "data": str(tiny_prepared), "modality": single})
        assert (train_pairs(cfg), dropout_share(cfg)) == ("required", 0.0)


def test_resume_with_unpaired_images_and_dropout_is_bit_exact(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """Two epochs straight equal one epoch, a stop, and --resume, bit for bit: the dropout draws are a
    function of (seed, epoch) like the augmentation."""
    from fredfusion.engine.trainer import Trainer
    from fredfusion.model.weights import load_checkpoint
    from shared import same_bits

    def cfg(run: str, **extra: Any) -> Any:
        return load_config(
            overrides={**TINY_TRAIN, "data": str(tiny_prepared), "save_dir": str(tmp_path / run),
                       "unfreeze_epoch": 2, "pairs": "any", "modality_dropout": 0.5, "no_eval_map": True,
                       "precise_bn": 0, "device": "cpu", **extra}
        )  # fmt: skip

    Trainer(cfg("a")).fit()
    original = Trainer._end_epoch

    def stop_after_first(self: Trainer, epoch: int, *args: Any, **kwargs: Any) -> Any:
        original(self, epoch, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_epoch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("b")).fit()
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    Trainer(cfg("b", resume=True)).fit()
    a, b = (load_checkpoint(tmp_path / run / "dual" / "last.pth") for run in ("a", "b"))
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "ema"):
        differ = [name for name, value in a[key].items() if not same_bits(b[key][name], value)]
        assert not differ, f"{key}: {differ[:5]}"
