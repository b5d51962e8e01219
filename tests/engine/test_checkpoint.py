import ast
import errno
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch

import fredfusion
from fredfusion.engine.checkpoint import copy_checkpoint, save_checkpoint
from fredfusion.model.weights import CheckpointError, load_checkpoint, load_model


class _Exploit:
    """Unpickling this creates the folder ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_round_trip(tmp_path: Path) -> None:
    payload = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"modality": "dual"}}
    save_checkpoint(payload, tmp_path / "last.pth")
    back = load_checkpoint(tmp_path / "last.pth")
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left


def test_crash_during_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.arange(3.0)}, path)
    before = path.read_bytes()

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    message = f"cannot write checkpoint {path}: No space left on device; the previous checkpoint is intact"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({"epoch": 2}, path)
    assert str(info.value) == message
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_real_full_disk_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()
    temp = tmp_path / ".last.pth.full.tmp"
    temp.write_bytes(b"")
    # the temp file is /dev/full: every write fails with ENOSPC from the kernel
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (os.open("/dev/full", os.O_WRONLY), str(temp)))
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint is intact"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(100_000)}, path)
    assert path.read_bytes() == before and not temp.exists()


def test_unwritable_folder_and_failed_rename_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", denied)
        with pytest.raises(CheckpointError) as info:
            save_checkpoint({"epoch": 1}, tmp_path / "best.pth")
    expected = (
        f"cannot write checkpoint {tmp_path / 'best.pth'}: Permission denied; no previous checkpoint there"
    )
    assert str(info.value) == expected

    save_checkpoint({"epoch": 1}, tmp_path / "best.pth")
    before = (tmp_path / "best.pth").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", denied)
        with pytest.raises(CheckpointError, match="Permission denied; the previous checkpoint is intact"):
            save_checkpoint({"epoch": 2}, tmp_path / "best.pth")
    assert (tmp_path / "best.pth").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*file/x/last\.pth: "):
        save_checkpoint({"epoch": 1}, blocker / "x" / "last.pth")


def test_copy_checkpoint_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    copy_checkpoint(tmp_path / "last.pth", tmp_path / "alias" / "best.pth")
    assert (tmp_path / "alias" / "best.pth").read_bytes() == (tmp_path / "last.pth").read_bytes()
    before = (tmp_path / "alias" / "best.pth").read_bytes()
    save_checkpoint({"epoch": 2}, tmp_path / "last.pth")

    def full(src, dst, length=0):
        dst.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shutil.copyfileobj", full)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint is intact"):
        copy_checkpoint(tmp_path / "last.pth", tmp_path / "alias" / "best.pth")
    assert (tmp_path / "alias" / "best.pth").read_bytes() == before
    assert [p.name for p in (tmp_path / "alias").iterdir()] == ["best.pth"]


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    with path.open("wb") as handle:
        pickle.dump({"model": _Exploit(marker)}, handle, protocol=2)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_every_torch_load_in_the_package_uses_weights_only() -> None:
    calls = []
    for source in Path(fredfusion.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            func = getattr(node, "func", None)
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and getattr(func.value, "id", "") == "torch"
            ):
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                calls.append((f"{source.name}:{node.lineno}", flags.get("weights_only")))
    assert calls and all(flag is True for _, flag in calls), calls


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01junk")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_checkpoint(tmp_path / "junk.pth")


def test_checkpoints_and_copies_get_the_umask_mode(tmp_path: Path) -> None:
    """Teammates can read best.pth: written with 0666 less the umask, not a temp file's 0600."""
    import os

    mask = os.umask(0o022)
    try:
        save_checkpoint({"x": torch.zeros(1)}, tmp_path / "last.pth")
        copy_checkpoint(tmp_path / "last.pth", tmp_path / "best.pth")
    finally:
        os.umask(mask)
    for name in ("last.pth", "best.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
