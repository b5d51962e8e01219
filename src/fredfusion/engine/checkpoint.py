"""Writing checkpoints: atomic writes and copies (reading them is ``model.weights``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from fredfusion.model.weights import CheckpointError


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    previous = "the previous checkpoint is intact" if path.is_file() else "no previous checkpoint there"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return CheckpointError(f"cannot write checkpoint {path}: {reason}; {previous}")


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` to a temp file in path's folder, fsync, rename over path.

    Any failure removes the temp file and leaves the file at path as it was; an OSError (disk full,
    no permission, ...) becomes a CheckpointError naming the path and the reason.
    """
    path = Path(path)
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write payload atomically: a temp file in the same folder, fsync, then rename over path.

    A crash or a full disk during the write leaves the previous file at path byte-identical and
    no temp file behind; write errors raise CheckpointError("cannot write checkpoint PATH: REASON; ...").
    """
    _atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint file atomically (same guarantees and errors as save_checkpoint)."""

    def write(handle: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, handle, length=16 << 20)

    _atomic_write(Path(dst), write)
