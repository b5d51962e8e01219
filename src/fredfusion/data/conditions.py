"""Conditions of a sequence (night, hover, small, canonical, ...): the groups ``eval`` reports AP by.

A sequence's conditions come from one of two places:

- its side file ``<seq>/conditions.json`` (``{"conditions": ["night", "small"], ...}``), which
  ``synth`` writes for every sequence (the parts of its scenario: ``night+small`` -> night, small).
  The file is not part of FRED's format; FRED readers ignore it, and a user may write one for real
  sequences. When present it is the sequence's whole list.
- otherwise FRED's official test lists, by sequence id: ``canonical`` and / or ``challenging``.
  FRED's files carry no other condition (no day / night label: RGB names give a wall-clock time only,
  without place or season), so none is derived from them.

``prepare`` copies each sequence's list onto its images (COCO ``images[].conditions``) and into
``prepare_summary.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from fredfusion.data.splits import CANONICAL_TEST_IDS, CHALLENGING_TEST_IDS
from fredfusion.files import write_json_atomic

__all__ = [
    "CONDITIONS_FILE",
    "CONDITION_ORDER",
    "official_conditions",
    "read_conditions",
    "sequence_conditions",
    "sort_conditions",
    "write_conditions",
]

CONDITIONS_FILE = "conditions.json"
#: Table order: the synthetic scenarios, then FRED's official test lists; other names follow sorted.
CONDITION_ORDER: tuple[str, ...] = (
    "day",
    "night",
    "hover",
    "clutter",
    "noise",
    "multi",
    "edge",
    "small",
    "canonical",
    "challenging",
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", re.ASCII)
_MAX_BYTES = 1 << 16


def _check_names(names: Iterable[object], where: str) -> list[str]:
    """The names in order without repeats; ValueError naming ``where`` for a name that is not one."""
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"{where}: bad condition name {name!r} (letters, digits, '_', '.', '-'; at most 40)"
            )
        if name not in out:
            out.append(name)
    return out


def write_conditions(seq_dir: Path, conditions: Sequence[str], **extra: str) -> Path:
    """Write ``seq_dir/conditions.json`` with ``conditions`` (and ``extra`` string fields, e.g. scenario)."""
    path = Path(seq_dir) / CONDITIONS_FILE
    names = _check_names(conditions, str(path))
    return write_json_atomic(path, {**extra, "conditions": names}, indent=1)


def read_conditions(seq_dir: Path) -> list[str] | None:
    """The conditions listed in ``seq_dir/conditions.json``; None without the file.

    ValueError naming the file when it cannot be read or does not hold a list of condition names.
    """
    path = Path(seq_dir) / CONDITIONS_FILE
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > _MAX_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("conditions"), list):
        raise ValueError(f'{path}: expected {{"conditions": [names]}}')
    return _check_names(doc["conditions"], str(path))


def official_conditions(seq_id: int) -> list[str]:
    """``canonical`` / ``challenging`` when FRED's official test list of that name holds ``seq_id``."""
    lists = (("canonical", CANONICAL_TEST_IDS), ("challenging", CHALLENGING_TEST_IDS))
    return [name for name, ids in lists if int(seq_id) in ids]


def sequence_conditions(seq_dir: Path, seq_id: int, problems: list[str]) -> list[str]:
    """A sequence's conditions: its ``conditions.json`` when present, else FRED's official lists.

    An unusable side file is a problem (appended to ``problems``) and gives no condition.
    """
    try:
        listed = read_conditions(seq_dir)
    except ValueError as exc:
        problems.append(f"{exc}; sequence {seq_id} gets no condition")
        return []
    return official_conditions(seq_id) if listed is None else listed


def sort_conditions(names: Iterable[str]) -> list[str]:
    """``names`` without repeats in table order (:data:`CONDITION_ORDER`, then the others sorted)."""
    rank = {name: k for k, name in enumerate(CONDITION_ORDER)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))
