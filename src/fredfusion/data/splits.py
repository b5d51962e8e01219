"""Sequence-level train / val / test splits: the official FRED lists, user files, validation carve-out.

A sequence is never split: all images of one sequence belong to one split (neighbouring frames
are near-duplicates, a frame-level split would leak them into the test set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fredfusion.data.fred import FredError

__all__ = [
    "CANONICAL_TEST_IDS",
    "CHALLENGING_TEST_IDS",
    "FRED_IDS",
    "SPLIT_NAMES",
    "SplitPlan",
    "assign_splits",
    "plan_splits",
    "read_split_file",
]

SPLIT_NAMES = ("train", "val", "test")
FRED_IDS = range(0, 231)


def _ids(text: str) -> frozenset[int]:
    return frozenset(int(i) for i in text.split())


CANONICAL_TEST_IDS: frozenset[int] = _ids(
    "8 9 12 20 21 29 34 39 41 46 51 60 63 64 65 80 83 90 93 110 111 114 115 127 128 129 138 139 "
    "142 152 153 154 162 163 167 178 179 187 194 195 196 202 210 217 219 223 230"
)
CHALLENGING_TEST_IDS: frozenset[int] = _ids(
    "9 10 17 21 22 23 24 27 28 29 33 34 35 36 68 69 71 76 77 78 79 81 82 83 84 85 86 87 88 89 90 "
    "97 98 99 100 105 107 108 109 110 111 112 113 114 140 141 142 176 177 178 179 188 189 190 191 "
    "192 193 194 195"
)
_OFFICIAL = {"canonical": CANONICAL_TEST_IDS, "challenging": CHALLENGING_TEST_IDS}
FALLBACK_TEST_FRACTION = 0.2


@dataclass
class SplitPlan:
    """Split of the sequences: ``assignment`` maps sequence id -> ``train`` | ``val`` | ``test``.

    ``source`` names where the test sequences came from (``canonical``, ``challenging``, a file
    path, or ``fallback``); ``warnings`` explains anything unexpected (e.g. the fallback).
    """

    assignment: dict[int, str]
    source: str
    fallback: bool = False
    warnings: list[str] = field(default_factory=list)

    def ids(self, split: str) -> list[int]:
        """Sorted sequence ids of one split."""
        return sorted(i for i, s in self.assignment.items() if s == split)


def read_split_file(path: Path) -> dict[int, str]:
    """Read a user split file.

    Format: one ``<seq_id> <train|val|test>`` per line, separated by spaces, tabs or a comma;
    ``#`` starts a comment; blank lines are ignored. An unknown split word, a bad id or an id
    listed twice with different splits raises :class:`FredError` naming ``file:line``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise FredError(f"{path}: cannot read split file ({exc.strerror or exc})") from exc
    out: dict[int, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise FredError(f"{path}:{lineno}: expected '<seq_id> <train|val|test>', got {raw.strip()!r}")
        sid, word = parts
        try:
            seq_id = int(sid)
        except ValueError:
            raise FredError(f"{path}:{lineno}: bad sequence id {sid!r}") from None
        if seq_id < 0:
            raise FredError(f"{path}:{lineno}: bad sequence id {sid!r}")
        word = word.lower()
        if word not in SPLIT_NAMES:
            raise FredError(f"{path}:{lineno}: unknown split {parts[1]!r} (expected train, val or test)")
        if out.get(seq_id, word) != word:
            raise FredError(f"{path}:{lineno}: sequence {seq_id} already assigned to {out[seq_id]}")
        out[seq_id] = word
    return out


def _pick(ids: list[int], n: int, rng: np.random.Generator) -> set[int]:
    if n <= 0 or not ids:
        return set()
    chosen = rng.choice(len(ids), size=min(n, len(ids)), replace=False)
    return {ids[i] for i in chosen.tolist()}


def _carve_val(train: list[int], val_fraction: float, seed: int) -> set[int]:
    """Deterministic ~``val_fraction`` of the train sequences (>= 1 when >= 2 train sequences)."""
    n_train = len(train)
    if val_fraction <= 0 or n_train < 2:
        return set()
    n_val = min(n_train - 1, max(1, round(val_fraction * n_train)))
    return _pick(sorted(train), n_val, np.random.default_rng(seed))


def plan_splits(
    seq_ids: list[int], split: str = "canonical", val_fraction: float = 0.1, seed: int = 0
) -> SplitPlan:
    """Assign every sequence id to ``train``, ``val`` or ``test``.

    ``split`` is ``canonical`` or ``challenging`` (the official FRED test lists; all other ids are
    train) or the path of a split file (see :func:`read_split_file`; sequences it does not list
    are train, with a warning). Validation is carved from train by whole sequences,
    deterministically for ``seed``, unless a split file names val sequences itself.

    When an official list selects no test sequence or leaves no train sequence (ids that are
    not FRED ids, e.g. a small synthetic tree), a deterministic sequence-level split with about
    20% test sequences is used instead and ``fallback``/``warnings`` say so.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(set(int(i) for i in seq_ids))
    warnings: list[str] = []
    if split in _OFFICIAL:
        test_ids = _OFFICIAL[split]
        test = [i for i in ids if i in test_ids]
        train = [i for i in ids if i not in test_ids]
        source = split
        fallback = not test or not train
        if fallback and ids:
            rng = np.random.default_rng(seed)
            n_test = max(1, round(FALLBACK_TEST_FRACTION * len(ids))) if len(ids) >= 2 else 0
            test_set = _pick(ids, n_test, rng)
            test = [i for i in ids if i in test_set]
            train = [i for i in ids if i not in test_set]
            what = "every" if any(i in test_ids for i in ids) else "no"
            warnings.append(
                f"the official {split} test list selects {what}"
                f" sequence of the {len(ids)} found; using a deterministic sequence-level split"
                f" instead (seed {seed}): test = {test}"
            )
            source = "fallback"
        assignment = {i: "train" for i in train}
        assignment.update({i: "test" for i in test})
        explicit_val = False
    else:
        path = Path(split)
        if not path.is_file():
            raise FredError(
                f"unknown split {split!r}: expected 'canonical', 'challenging' or the path of a split file"
            )
        listed = read_split_file(path)
        source = str(path.absolute())
        fallback = False
        assignment = {}
        unlisted = []
        for i in ids:
            if i in listed:
                assignment[i] = listed[i]
            else:
                assignment[i] = "train"
                unlisted.append(i)
        if unlisted:
            warnings.append(f"{path}: {len(unlisted)} sequence(s) not listed, used for train: {unlisted}")
        missing = sorted(set(listed) - set(ids))
        if missing:
            warnings.append(f"{path}: {len(missing)} listed sequence(s) not found in the tree: {missing}")
        explicit_val = any(s == "val" for s in assignment.values())
    if not explicit_val:
        train = [i for i, s in assignment.items() if s == "train"]
        for i in _carve_val(train, val_fraction, seed):
            assignment[i] = "val"
    return SplitPlan(
        assignment={i: assignment[i] for i in sorted(assignment)},
        source=source,
        fallback=fallback,
        warnings=warnings,
    )


def assign_splits(
    seq_ids: list[int], split: str = "canonical", val_fraction: float = 0.1, seed: int = 0
) -> dict[int, str]:
    """Sequence id -> ``train`` | ``val`` | ``test``; see :func:`plan_splits` (which also gives warnings).

    ``split``: ``canonical``, ``challenging`` or the path of a split file with lines
    ``<seq_id> <train|val|test>`` (``#`` comments allowed; an unknown word or bad id raises
    :class:`FredError` naming ``file:line``).
    """
    return plan_splits(seq_ids, split, val_fraction, seed).assignment
