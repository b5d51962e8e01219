"""Read a FRED dataset tree into a compact per-sequence index.

The reader touches file names only (``os.scandir``, no per-file ``stat``) and the annotation
text files; it never opens an image. Quirks of real copies that it handles are listed in
``shared/FRED_FORMAT.md``: flat and official (``train/``, ``test/``) layouts, zipped sequences,
``PADDED_RGB/`` preferred over ``RGB/``, ``interpolated_coordinates.txt`` preferred over
``coordinates.txt``, RGB names without the ``Video_<id>_`` prefix, event names without
``frame``, numeric ordering of event frames, optional track id and drone model columns.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

__all__ = [
    "FRAME_HEIGHT",
    "FRAME_WIDTH",
    "Annotations",
    "FredError",
    "FredScan",
    "SequenceIndex",
    "parse_annotations",
    "read_sequence",
    "scan_root",
]

FRAME_WIDTH = 1280
FRAME_HEIGHT = 720

# Names of the folders and files inside a sequence folder, in order of preference.
RGB_DIRS = ("PADDED_RGB", "RGB")
EVENT_DIR = ("Event", "Frames")
ANNOTATION_FILES = ("interpolated_coordinates.txt", "coordinates.txt")
SPLIT_DIRS = ("train", "test")

# All name patterns are used with ``fullmatch`` and ASCII digits only (``\d`` would also accept
# other Unicode digits, which ``int`` converts); digit runs are bounded so that numbers fit int64.
_SEQ_DIR_RE = re.compile(r"\d{1,9}", re.ASCII)
_ZIP_RE = re.compile(r"(\d{1,9})\.zip", re.IGNORECASE | re.ASCII)
# Video_<id>_<HH>_<MM>_<SS.ffffff>.jpg, the prefix is missing in some copies.
_RGB_RE = re.compile(
    r"(?:Video_\d+_)?(\d{1,2})_(\d{1,2})_(\d{1,2}(?:\.\d*)?)\.jpe?g", re.IGNORECASE | re.ASCII
)
# Video_<id>_frame_<t_us>.png, ``frame_`` is missing in some copies.
_EVENT_RE = re.compile(r"Video_\d+_(?:frame_)?(\d{1,18})\.png", re.IGNORECASE | re.ASCII)
# Line breaks of annotation files (line numbers count these, like an editor does).
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_MAX_EXAMPLES = 3
T = TypeVar("T", int, float)
_SECONDS_PER_DAY = 86400.0


class FredError(ValueError):
    """A FRED tree or file that cannot be used; the message names the path (and line)."""


@dataclass(frozen=True)
class FredScan:
    """Result of :func:`scan_root`.

    Attributes:
        root: the FRED root, absolute.
        sequences: sequence id -> sequence folder (absolute), sorted by id.
        zipped: ``<id>.zip`` files whose sequence has no unzipped folder, sorted by id.
        problems: non-fatal findings (e.g. the same id in two places; the first one wins).
    """

    root: Path
    sequences: dict[int, Path]
    zipped: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class SequenceIndex:
    """Everything the pipeline needs to know about one sequence, without pixels.

    File names are relative to the FRED root (POSIX separators). Times are float64 seconds:
    RGB times are seconds of the day (wall clock from the file names), event and box times are
    seconds since the recording start (the annotation clock).
    """

    seq_id: int
    seq_dir: Path
    rgb_dir: str | None
    rgb_files: list[str]
    rgb_t: np.ndarray
    event_files: list[str]
    event_t: np.ndarray
    annotation_file: str | None
    box_t: np.ndarray
    boxes: np.ndarray
    track_ids: np.ndarray
    drone_models: list[str]
    width: int = FRAME_WIDTH
    height: int = FRAME_HEIGHT
    n_clipped: int = 0
    n_dropped_empty: int = 0
    n_malformed: int = 0
    problems: list[str] = field(default_factory=list)
    n_duplicates: int = 0

    @property
    def n_boxes(self) -> int:
        """Number of valid boxes read from the annotation file."""
        return len(self.box_t)


def _rel(path: str, root: str) -> str:
    """Path of ``path`` relative to ``root`` with forward slashes."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def scan_root(root: Path) -> FredScan:
    """Find the sequence folders of a FRED tree.

    Accepts the flat layout ``<root>/<id>/`` and the official one ``<root>/train/<id>/``,
    ``<root>/test/<id>/`` (also mixed). ``<id>.zip`` files without an unzipped folder of the same
    id are listed in ``zipped``. Raises :class:`FredError` when the root does not exist or is not
    a folder.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FredError(f"{root}: FRED root not found")
    if not root.is_dir():
        raise FredError(f"{root}: FRED root is not a folder")
    sequences: dict[int, Path] = {}
    zips: dict[int, Path] = {}
    problems: list[str] = []

    def visit(folder: Path, descend: bool) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append(f"{folder}: cannot list folder ({exc.strerror or exc})")
            return
        for entry in entries:
            name = entry.name
            if _SEQ_DIR_RE.fullmatch(name) and entry.is_dir():
                seq_id = int(name)
                path = Path(entry.path)
                if seq_id in sequences:
                    problems.append(f"{path}: sequence {seq_id} also found at {sequences[seq_id]}; ignored")
                else:
                    sequences[seq_id] = path
            elif descend and name.lower() in SPLIT_DIRS and entry.is_dir():
                visit(Path(entry.path), descend=False)
            else:
                match = _ZIP_RE.fullmatch(name)
                if match:
                    zips.setdefault(int(match.group(1)), Path(entry.path))

    visit(root, descend=True)
    zipped = [zips[i] for i in sorted(zips) if i not in sequences]
    return FredScan(
        root=root,
        sequences={i: sequences[i] for i in sorted(sequences)},
        zipped=zipped,
        problems=problems,
    )


def _list_names(folder: str) -> list[str] | None:
    """File names in ``folder`` (no stat), or None when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return [entry.name for entry in it]
    except OSError:
        return None


def _report_unparsed(problems: list[str], folder: str, bad: list[str], what: str) -> None:
    if not bad:
        return
    bad.sort()
    examples = ", ".join(bad[:_MAX_EXAMPLES])
    more = ", ..." if len(bad) > _MAX_EXAMPLES else ""
    problems.append(f"{folder}: {len(bad)} file name(s) not recognised as {what} frames ({examples}{more})")


def _rgb_time(name: str) -> float | None:
    """Seconds of day of an RGB file name, or None when it is not one."""
    m = _RGB_RE.fullmatch(name)
    if m is None:
        return None
    hh, mm, ss = m.groups()
    h, mi, s = int(hh), int(mm), float(ss)
    if h > 23 or mi > 59 or s >= 61.0:
        return None
    return h * 3600.0 + mi * 60.0 + s


def _event_time(name: str) -> int | None:
    """Microseconds of an event file name, or None when it is not one."""
    m = _EVENT_RE.fullmatch(name)
    return None if m is None else int(m.group(1))


def _split_names(
    names: list[str], time_of: Callable[[str], T | None]
) -> tuple[list[str], list[T], list[str]]:
    """Split names into (kept names, their ``time_of``, names ``time_of`` does not recognise)."""
    kept: list[str] = []
    times: list[T] = []
    bad: list[str] = []
    for name in names:
        t = time_of(name)
        if t is None:
            bad.append(name)
        else:
            kept.append(name)
            times.append(t)
    return kept, times, bad


def _parse_rgb_names(names: list[str]) -> tuple[list[str], list[float], list[str]]:
    """Split RGB names into (kept names, seconds of day, unrecognised names)."""
    return _split_names(names, _rgb_time)


def _parse_event_names(names: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Split event names into (kept names, microseconds, unrecognised names)."""
    return _split_names(names, _event_time)


def _count_duplicates(sorted_t: np.ndarray) -> int:
    return int(np.count_nonzero(np.diff(sorted_t) == 0)) if len(sorted_t) > 1 else 0


def _frame_list(
    folder: str, root: str, kept: list[str], t: np.ndarray, bad: list[str], what: str, problems: list[str]
) -> tuple[str, list[str], np.ndarray]:
    """The frames of ``folder`` in time order: ``(folder relative to root, file names, sorted t)``.

    Reports the unrecognised names (hidden files aside) and frames that share a time stamp.
    """
    _report_unparsed(problems, folder, [b for b in bad if not b.startswith(".")], what)
    order = np.argsort(t, kind="stable")
    t = t[order]
    rel_dir = _rel(folder, root)
    files = [f"{rel_dir}/{kept[i]}" for i in order.tolist()]
    dup = _count_duplicates(t)
    if dup:
        problems.append(f"{folder}: {dup} {what} frame(s) share a time stamp with another frame")
    return rel_dir, files, t


def _read_rgb(seq_dir: str, root: str, problems: list[str]) -> tuple[str | None, list[str], np.ndarray]:
    chosen: tuple[str, list[str], list[float], list[str]] | None = None
    for sub in RGB_DIRS:
        candidate = os.path.join(seq_dir, sub)
        names = _list_names(candidate)
        if names is None:
            continue
        parsed = (candidate, *_parse_rgb_names(names))
        if chosen is None or (not chosen[1] and parsed[1]):
            chosen = parsed
        if parsed[1]:
            break
    if chosen is None:
        problems.append(f"{seq_dir}: no RGB folder ({' or '.join(RGB_DIRS)}); sequence has no RGB frames")
        return None, [], np.zeros(0, dtype=np.float64)
    rgb_dir, kept, times, bad = chosen
    t = np.asarray(times, dtype=np.float64)
    if len(t) and float(t.max() - t.min()) > _SECONDS_PER_DAY / 2:
        # The recording crossed midnight: times after midnight belong to the next day.
        t = np.where(t < _SECONDS_PER_DAY / 2, t + _SECONDS_PER_DAY, t)
    return _frame_list(rgb_dir, root, kept, t, bad, "RGB", problems)


def _read_events(seq_dir: str, root: str, problems: list[str]) -> tuple[list[str], np.ndarray]:
    event_dir = os.path.join(seq_dir, *EVENT_DIR)
    names = _list_names(event_dir)
    if names is None:
        problems.append(f"{event_dir}: event frame folder missing; sequence has no event frames")
        return [], np.zeros(0, dtype=np.float64)
    kept, times_us, bad = _parse_event_names(names)
    t_us = np.asarray(times_us, dtype=np.int64)
    _, files, t_us = _frame_list(event_dir, root, kept, t_us, bad, "event", problems)
    return files, t_us.astype(np.float64) / 1e6


@dataclass
class Annotations:
    """Boxes parsed from one annotation file (see :func:`parse_annotations`).

    ``n_lines`` counts the data lines (not blank, not a ``#`` comment). Every data line ends up
    in exactly one of: the kept boxes, ``n_malformed`` (unusable line), ``n_dropped_empty``
    (empty or outside the frame after clipping) or ``n_duplicates`` (repeats an earlier line);
    each line that is not kept has one ``path:line: reason`` entry in ``problems``.
    """

    box_t: np.ndarray
    boxes: np.ndarray
    track_ids: np.ndarray
    drone_models: list[str]
    n_clipped: int
    n_dropped_empty: int
    n_malformed: int
    problems: list[str]
    n_duplicates: int = 0
    n_lines: int = 0


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if math.isfinite(value) and value.is_integer() else None


_LINE_FORMAT = "expected 'time: x1, y1, x2, y2[, id, class]'"


def _parse_line(line: str) -> tuple[tuple[float, ...], int, str] | str:
    """``(time, x1, y1, x2, y2), track id, model`` of one data line, or the reason it is malformed."""
    head, sep, rest = line.partition(":")
    parts = rest.split(",", 5)
    n = len(parts)
    if not sep or n < 4:
        return f"malformed line ({_LINE_FORMAT})"
    try:
        row = (float(head), float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]))
    except ValueError:
        return "malformed line (time or coordinate is not a number)"
    track_id = -1
    model = ""
    if n >= 5:
        fifth = parts[4].strip()
        parsed = _parse_int(fifth) if fifth else None
        if parsed is not None:
            track_id = parsed
        elif n == 5:
            model = fifth  # a lone fifth column that is not an integer is the drone model
        elif fifth:
            return f"track id {fifth[:40]!r} is not an integer"
        if n == 6:
            model = parts[5].strip()
    if not _INT64_MIN <= track_id <= _INT64_MAX:
        return f"track id {str(track_id)[:40]} out of range (not an int64)"
    return row, track_id, model


def _duplicates(t: np.ndarray, track_ids: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that repeat an earlier row: same time and track id, or (no id) same time and box.

    Returns (mask of repeated rows, index of the first row of each row's group).
    """
    n = len(t)
    if n < 2:
        return np.zeros(n, dtype=bool), np.arange(n)
    has_id = track_ids >= 0
    box_key = np.where(has_id[:, None], 0.0, boxes)
    keys = (box_key[:, 3], box_key[:, 2], box_key[:, 1], box_key[:, 0], track_ids, t)
    order = np.lexsort(keys)  # stable: the first line of a group comes first
    same = np.ones(n - 1, dtype=bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    starts = np.concatenate([[True], ~same])
    first_sorted = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    first = np.empty(n, dtype=np.int64)
    first[order] = order[first_sorted]
    repeated = np.zeros(n, dtype=bool)
    repeated[order[1:]] = same
    return repeated, first


@dataclass
class _Lines:
    """The data lines of an annotation file that parsed: numbers, line numbers, ids and models."""

    rows: np.ndarray  # (n, 5) float64: time, x1, y1, x2, y2
    linenos: list[int]
    ids: list[int]
    models: list[str]
    n_malformed: int
    n_lines: int


def _parse_lines(data: bytes, issues: list[tuple[int, str]]) -> _Lines:
    """Decode ``data`` (invalid UTF-8 replaced) and parse every data line; a line that does not parse
    and a line with replaced bytes add ``(line number, reason)`` to ``issues``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        bad_utf8 = True
    else:
        bad_utf8 = False
    rows: list[tuple[float, ...]] = []
    linenos: list[int] = []
    ids: list[int] = []
    models: list[str] = []
    n_malformed = 0
    n_lines = 0
    for lineno, raw in enumerate(_LINE_BREAK_RE.split(text), start=1):
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        n_lines += 1
        if bad_utf8 and "\ufffd" in line:
            issues.append((lineno, "invalid UTF-8 bytes (replaced)"))
        parsed = _parse_line(line)
        if isinstance(parsed, str):
            n_malformed += 1
            issues.append((lineno, parsed))
            continue
        row, track_id, model = parsed
        rows.append(row)
        linenos.append(lineno)
        ids.append(track_id)
        models.append(model)
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    return _Lines(arr, linenos, ids, models, n_malformed, n_lines)


def _invalid_rows(arr: np.ndarray, linenos: list[int], issues: list[tuple[int, str]]) -> np.ndarray:
    """Mask of rows that are malformed although they parsed: NaN or infinite numbers, negative time,
    ``x2 < x1`` or ``y2 < y1``; each adds its reason to ``issues``."""
    finite = np.isfinite(arr).all(axis=1)
    negative = finite & (arr[:, 0] < 0)
    inverted = finite & ~negative & ((arr[:, 3] < arr[:, 1]) | (arr[:, 4] < arr[:, 2]))
    invalid = ~finite | negative | inverted
    for i in np.flatnonzero(invalid).tolist():
        if not finite[i]:
            reason = "NaN or infinite value"
        elif negative[i]:
            reason = f"negative time {float(arr[i, 0])}"
        else:
            reason = "x2 < x1 or y2 < y1"
        issues.append((linenos[i], reason))
    return invalid


def _clip_boxes(
    raw_boxes: np.ndarray,
    invalid: np.ndarray,
    width: int,
    height: int,
    linenos: list[int],
    issues: list[tuple[int, str]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes clipped to the frame: ``(clipped float64, clipped float32, empty mask)``; each valid box
    left empty (zero size, or outside the frame) adds its reason to ``issues``."""
    clipped = raw_boxes.copy()
    np.clip(clipped[:, 0::2], 0.0, float(width), out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0.0, float(height), out=clipped[:, 1::2])
    boxes32 = clipped.astype(np.float32)
    # Emptiness is judged on the stored float32 corners: x1 < x2 must hold after rounding too.
    empty = ~invalid & ((boxes32[:, 2] <= boxes32[:, 0]) | (boxes32[:, 3] <= boxes32[:, 1]))
    outside = (
        (raw_boxes[:, 2] <= 0)
        | (raw_boxes[:, 0] >= width)
        | (raw_boxes[:, 3] <= 0)
        | (raw_boxes[:, 1] >= height)
    )
    for i in np.flatnonzero(empty).tolist():
        where = f"outside the {width}x{height} frame" if outside[i] else "empty (zero width or height)"
        issues.append((linenos[i], f"box {where}; dropped"))
    return clipped, boxes32, empty


def _drop_repeats(
    lines: _Lines, candidates: np.ndarray, track_arr: np.ndarray, issues: list[tuple[int, str]]
) -> tuple[np.ndarray, int]:
    """The rows of ``candidates`` that do not repeat an earlier line and the number that do; each
    repeat adds its reason to ``issues``."""
    box_t, raw_boxes, linenos, ids = lines.rows[:, 0], lines.rows[:, 1:], lines.linenos, lines.ids
    repeated, first = _duplicates(box_t[candidates], track_arr[candidates], raw_boxes[candidates])
    for k in np.flatnonzero(repeated).tolist():
        i, j = int(candidates[k]), int(candidates[first[k]])
        same = f"track id {ids[i]}" if ids[i] >= 0 else "box"
        issues.append(
            (linenos[i], f"repeats line {linenos[j]} (same time {float(box_t[i])} and {same}); dropped")
        )
    return candidates[~repeated], int(np.count_nonzero(repeated))


def parse_annotations(
    data: bytes, path: str, width: int = FRAME_WIDTH, height: int = FRAME_HEIGHT
) -> Annotations:
    """Parse the bytes of a FRED ``coordinates.txt``-style file; never raises on content.

    Lines are ``time: x1, y1, x2, y2[, id[, class]]`` (a lone fifth column that is not an
    integer is taken as the class); blank lines and ``#`` comments are skipped. Boxes are
    clipped to ``[0, width] x [0, height]`` (negative coordinates become 0). Every data line
    that yields no box is reported as ``path:line: reason``: malformed lines (unparseable, NaN
    or infinite numbers, negative time, ``x2 < x1`` or ``y2 < y1``, a track id that is not an
    int64), boxes empty or outside the frame after clipping, and lines that repeat an earlier
    line (same time and track id; for lines without an id, same time and box). Several boxes
    may share a time. Invalid UTF-8 is replaced and reported. Lines are numbered as an editor
    does (``\n``, ``\r\n`` or ``\r`` end a line).
    """
    issues: list[tuple[int, str]] = []  # (line number, reason)
    lines = _parse_lines(data, issues)
    invalid = _invalid_rows(lines.rows, lines.linenos, issues)
    box_t, raw_boxes = lines.rows[:, 0], lines.rows[:, 1:]
    clipped, boxes32, empty = _clip_boxes(raw_boxes, invalid, width, height, lines.linenos, issues)
    track_arr = np.asarray(lines.ids, dtype=np.int64)
    kept_idx, n_repeated = _drop_repeats(lines, np.flatnonzero(~invalid & ~empty), track_arr, issues)

    issues.sort(key=lambda item: item[0])
    changed = np.any(clipped[kept_idx] != raw_boxes[kept_idx], axis=1)
    # Sort by time (stable: lines of one time keep their file order).
    order = kept_idx[np.argsort(box_t[kept_idx], kind="stable")]
    return Annotations(
        box_t=box_t[order],
        boxes=boxes32[order],
        track_ids=track_arr[order],
        drone_models=[lines.models[i] for i in order.tolist()],
        n_clipped=int(np.count_nonzero(changed)),
        n_dropped_empty=int(np.count_nonzero(empty)),
        n_malformed=lines.n_malformed + int(np.count_nonzero(invalid)),
        problems=[f"{path}:{ln}: {reason}" for ln, reason in issues],
        n_duplicates=n_repeated,
        n_lines=lines.n_lines,
    )


def read_sequence(
    seq_dir: Path, fred_root: Path, width: int = FRAME_WIDTH, height: int = FRAME_HEIGHT
) -> SequenceIndex:
    """Index one sequence folder: frame names and times of both modalities and the boxes.

    Never raises on bad content: missing folders, unrecognised file names, a missing annotation
    file (all frames are then background), an annotation file without box lines and bad lines
    (see :func:`parse_annotations`) end up in ``problems``. Raises
    :class:`FredError` only when ``seq_dir`` is not a folder named by an integer id.
    """
    seq_dir = Path(seq_dir).absolute()
    root = str(Path(fred_root).absolute())
    if not _SEQ_DIR_RE.fullmatch(seq_dir.name):
        raise FredError(f"{seq_dir}: a sequence folder must be named by its integer id")
    if not seq_dir.is_dir():
        raise FredError(f"{seq_dir}: sequence folder not found")
    sdir = str(seq_dir)
    problems: list[str] = []
    rgb_dir, rgb_files, rgb_t = _read_rgb(sdir, root, problems)
    event_files, event_t = _read_events(sdir, root, problems)

    ann_path = None
    for name in ANNOTATION_FILES:
        candidate = os.path.join(sdir, name)
        try:
            with open(candidate, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{candidate}: cannot read ({exc.strerror or exc})")
            continue
        ann_path = candidate
        break
    if ann_path is None:
        problems.append(
            f"{sdir}: no annotation file ({' or '.join(ANNOTATION_FILES)}); all frames are background"
        )
        ann = parse_annotations(b"", "", width, height)
    else:
        ann = parse_annotations(data, ann_path, width, height)
        problems.extend(ann.problems)
        if ann.n_lines == 0:
            problems.append(f"{ann_path}: annotation file has no box lines; all frames are background")

    return SequenceIndex(
        seq_id=int(seq_dir.name),
        seq_dir=seq_dir,
        rgb_dir=rgb_dir,
        rgb_files=rgb_files,
        rgb_t=rgb_t,
        event_files=event_files,
        event_t=event_t,
        annotation_file=_rel(ann_path, root) if ann_path else None,
        box_t=ann.box_t,
        boxes=ann.boxes,
        track_ids=ann.track_ids,
        drone_models=ann.drone_models,
        width=width,
        height=height,
        n_clipped=ann.n_clipped,
        n_dropped_empty=ann.n_dropped_empty,
        n_malformed=ann.n_malformed,
        problems=problems,
        n_duplicates=ann.n_duplicates,
    )
