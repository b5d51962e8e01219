"""`fredfusion prepare` killed (SIGKILL) during the frame store build, then run again."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from fredfusion.cli import main
from fredfusion.data.prepare import prepare
from fredfusion.data.store import FrameStore
from fredfusion.data.store import build as store_build
from fredfusion.spec import FRAME_KINDS

# prepare_summary.json fields that legitimately differ between two builds of the same tree:
# where the output went, and what this particular run did (timings, built vs reused shards).
RUN_SPECIFIC = {"out", "annotation_files"}
RUN_SPECIFIC_STORE = {
    "dir",
    "built_shards",
    "reused_shards",
    "frames_written",
    "seconds",
    "frames_per_s",
    "bytes_written",
}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _summary(out: Path) -> dict[str, Any]:
    data = json.loads((out / "prepare_summary.json").read_text())
    for key in RUN_SPECIFIC:
        data.pop(key)
    for key in RUN_SPECIFIC_STORE:
        data["store"].pop(key)
    return data


def _frames_of_first_shard(out: Path) -> int:
    """Frames (RGB + event files) the store build decodes for the first sequence."""
    n = 0
    for split in ("train", "val", "test"):
        coco = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        for im in coco["images"]:
            if im["sequence_id"] == 0:
                n += (im["rgb_file_name"] is not None) + (im["event_file_name"] is not None)
    return n


@pytest.mark.reliability
@pytest.mark.parametrize("codec", ["raw", "jpeg", "zstd", "auto"])
def test_killed_store_build_then_rerun_equals_uninterrupted(
    small_sample: Any, tmp_path: Path, run_child: Any, capsys: pytest.CaptureFixture, codec: str
) -> None:
    args = ["--fred-root", str(small_sample.fred), "--split", str(small_sample.split_file)]
    args += ["--imgsz", "128", "--workers", "0", "--codec", codec, "--device", "cpu"]
    reference = tmp_path / "reference"
    prepare(
        small_sample.fred,
        reference,
        split=str(small_sample.split_file),
        imgsz=128,
        workers=0,
        progress=False,
        log=lambda _m: None,
        codec=codec,
    )
    # the free-space estimate of an encoded store first encodes a few sample frames of each kind
    samples = 0 if codec == "raw" else len(FRAME_KINDS) * store_build._SAMPLE_FRAMES
    first_shard = samples + _frames_of_first_shard(reference)

    # killed halfway through the second shard: the first one is complete, the second one is not
    out = tmp_path / "killed"
    proc = run_child("store-frame", first_shard + 3, ["prepare", *args, "--out", str(out)])
    assert proc.returncode == -signal.SIGKILL, proc.output[-2000:]
    store = out / "store"
    names = sorted(p.name for p in store.iterdir())
    assert {"seq_0.rgb.json", "seq_0.event.json"} <= set(names), names
    assert "manifest.json" not in names and "seq_1.rgb.json" not in names
    assert any(n.startswith("seq_1.rgb.") and ".tmp" in n for n in names), names
    assert not (out / "annotations").exists()
    with pytest.raises(FileNotFoundError, match=r"incomplete frame store: .*manifest\.json is missing"):
        FrameStore(store)

    # the same command again finishes the job: the complete shard is reused, temp files are gone
    capsys.readouterr()
    assert main(["prepare", *args, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "frame store: 2 shard(s) built, 1 reused" in log
    assert not list(store.glob("*.tmp*"))

    got, want = _files(out), _files(reference)
    got.pop("prepare_summary.json")
    want.pop("prepare_summary.json")
    assert sorted(got) == sorted(want)
    for name, data in want.items():
        assert got[name] == data, f"{name} differs from the uninterrupted build"
    assert _summary(out) == _summary(reference)
