"""Every file a command writes gets the user's umask (0666 less the umask; folders 0777 less it), so a
team can read a run's checkpoints, logs, pictures and reports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fredfusion.cli import main

UMASK = 0o027  # group may read, others nothing: 0640 files, 0750 folders

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def _wrong_modes(root: Path) -> list[str]:
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        want = (0o777 if path.is_dir() else 0o666) & ~UMASK
        if mode != want:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)} (want {oct(want)})")
    return wrong


def test_every_command_writes_with_the_umask(
    tiny_prepared: Path, tmp_path: Path, umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fredfusion.data.synth import write_sample
    from fredfusion.engine.trainer import Trainer

    original = Trainer._loader
    monkeypatch.setattr(Trainer, "_loader", lambda self, ds, batch, _max: original(self, ds, batch, 2))
    out = tmp_path / "out"
    small = ["--model", "n", "--imgsz", "128"]
    runs = [
        ["synth", "--out", str(out / "fred"), "--sequences", "1", "--frames", "4", "--width", "320",
         "--height", "180", "--workers", "1"],
        ["train", "--data", str(tiny_prepared), "--out", str(out / "train" / "dual"), *small, "--epochs", "1",
         "--batch", "8", "--num_workers", "0", "--freeze_train", "false", "--precise_bn", "8",
         "--save_period", "1"],
        ["eval", "--weights", str(out / "train" / "dual" / "best.pth"), "--data", str(tiny_prepared),
         "--split", "val", "--out", str(out / "eval")],
        ["show", "--data", str(tiny_prepared), "--n", "4", "--out", str(out / "show")],
        ["bench", "--data", str(tiny_prepared), *small, "--batch", "4", "--steps", "1", "--warmup", "0",
         "--out", str(out / "bench")],
    ]  # fmt: skip
    for argv in runs:
        assert main(argv) == 0, argv
    write_sample(out / "src", sequences=1, frames=4, width=320, height=180, seed=0)
    (seq,) = [p for p in (out / "src").iterdir() if p.is_dir()]
    weights = out / "train" / "dual" / "best.pth"
    assert main(["predict", "--weights", str(weights), "--source", str(seq), "--out", str(out / "pred")]) == 0
    if _has("onnxruntime") and _has("onnx"):
        assert main(["export", "--weights", str(weights), "--out", str(out / "onnx" / "best.onnx")]) == 0
    written = {p.name for p in out.rglob("*") if p.is_file()}
    for name in ("best.pth", "last.pth", "ep001.pth", "results.csv", "config.yaml", "curves.png",
                 "metrics.json", "pairs.png", "bench.json", "detections.csv", "predictions.mp4"):  # fmt: skip
        assert name in written, name
    assert not _wrong_modes(out), _wrong_modes(out)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
