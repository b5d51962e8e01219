import os
import pickle
from pathlib import Path

import pytest
import torch

from fredfusion.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_round_trip(tmp_path: Path) -> None:
    payload = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"modality": "dual"}}
    save_checkpoint(payload, tmp_path / "last.pth")
    back = load_checkpoint(tmp_path / "last.pth")
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left


def test_crash_during_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"model": _Exploit()}, handle)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01junk")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_checkpoint(tmp_path / "junk.pth")
