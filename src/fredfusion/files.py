"""Atomic file writes: a temp file in the target's folder, flushed to disk, renamed over the target.

A reader never sees a half-written file, a crash leaves the previous file as it was and no temp file
behind, and the new file gets the mode a plain ``open`` would give (0666 less the umask).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Write ``path`` through ``write(handle)``: temp file, fsync, rename. Any failure removes the temp
    file, leaves ``path`` as it was and re-raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(
    path: Path, data: Any, indent: int | None = None, default: Callable[[Any], Any] | None = None
) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (compact unless ``indent``; ``default`` converts
    objects json does not know)."""
    separators = None if indent else (",", ":")

    def write(fh: IO[Any]) -> None:
        json.dump(data, fh, indent=indent, separators=separators, default=default)

    return atomic_write(path, write, binary=False)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def is_temp_file(name: str) -> bool:
    """True for the temp files ``atomic_write`` leaves when a process is killed mid-write."""
    return name.startswith(".") and name.endswith(".tmp")
