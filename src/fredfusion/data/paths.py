"""Joining file names read from data files (COCO JSON, annotation files) to the folder they are relative to.

A name read from a file is data, not a trusted path: ``../`` components or an absolute path
would let a tampered file make the tool read (or write) outside the dataset root. Names are
checked as text, without touching the file system and without following symlinks: a symlink
placed inside the root by its owner is the owner's choice.
"""

from __future__ import annotations

import ntpath
from pathlib import Path

__all__ = ["UnsafePathError", "check_relative_name", "resolve_under"]


class UnsafePathError(ValueError):
    """A file name that would leave the folder it must stay in; the message names its source."""


def _reason(name: str) -> str | None:
    """Why ``name`` may not be joined to a root, or None when it is a plain relative name."""
    if not name:
        return "empty file name"
    if "\x00" in name:
        return "NUL byte in file name"
    # Windows separators and drives too: a file written on Windows must not escape either.
    if name.startswith(("/", "\\")) or ntpath.splitdrive(name)[0]:
        return "absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "'..' component"
    return None


def check_relative_name(name: object, source: Path | str) -> str:
    """Return ``name`` when it is a plain relative file name; raise :class:`UnsafePathError` otherwise.

    ``name`` must be a non-empty string without NUL bytes, must not be absolute (``/x``, ``\\x``,
    ``C:x``) and must have no ``..`` component (with ``/`` or ``\\`` as separator). The message
    names ``source`` (the file the name was read from) and the name.
    """
    if not isinstance(name, str):
        raise UnsafePathError(f"{source}: file name {name!r} is not a string")
    reason = _reason(name)
    if reason is not None:
        raise UnsafePathError(f"{source}: refused file name {name!r} ({reason})")
    return name


def resolve_under(root: Path | str, name: object, source: Path | str) -> Path:
    """``root / name`` for a relative ``name`` read from ``source``; refuses names that leave ``root``.

    Checks as :func:`check_relative_name`; raises :class:`UnsafePathError` (a ``ValueError``)
    naming ``source``, the name and the root.
    """
    try:
        return Path(root) / check_relative_name(name, source)
    except UnsafePathError as exc:
        raise UnsafePathError(f"{exc}: file names must stay inside {root}") from None
