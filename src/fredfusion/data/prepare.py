"""The ``fredfusion prepare`` pipeline: FRED tree -> COCO files + frame store + summary.

Steps: scan and index every sequence, pair RGB with event frames, split by sequence, assign
image ids unique over all splits, build the frame store, drop images with bad frames, read each
sequence's conditions (``data.conditions``), write ``annotations/instances_{train,val,test}.json``
(conditions per image) and ``prepare_summary.json``, and print the pairing table. Bad data
(unreadable frames, malformed annotation lines, odd file names, unusable ``conditions.json``) is
reported, never fatal; only an unusable root (missing, no sequences, zipped sequences) raises.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
from tqdm import tqdm

from fredfusion import __version__
from fredfusion.data.coco import build_coco, write_coco
from fredfusion.data.conditions import sequence_conditions, sort_conditions
from fredfusion.data.fred import (
    EVENT_DIR,
    FRAME_HEIGHT,
    FRAME_WIDTH,
    RGB_DIRS,
    FredError,
    FredScan,
    SequenceIndex,
    read_sequence,
    scan_root,
)
from fredfusion.data.pairing import (
    DUAL,
    PairedSequence,
    PairingStats,
    check_pairing_settings,
    pair_sequence,
)
from fredfusion.data.splits import SPLIT_NAMES, SplitPlan, plan_splits
from fredfusion.data.store import Codec, FrameRecord, StoreReport, build_store, parse_codecs
from fredfusion.files import write_json_atomic
from fredfusion.spec import frames_for

__all__ = [
    "MAX_PRINTED_PROBLEMS",
    "PrepareSummary",
    "detect_frame_size",
    "format_table",
    "gc_paused",
    "prepare",
    "store_size",
]

MAX_PRINTED_PROBLEMS = 20
SUMMARY_NAME = "prepare_summary.json"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block (restored afterwards).

    Indexing a full FRED tree creates about a million small long-lived objects; the repeated
    collections they trigger cost about as much as the indexing itself and free nothing.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def detect_frame_size(seq_dirs: list[Path], max_tries: int = 6, samples: int = 5) -> tuple[int, int] | None:
    """``(width, height)`` of the source frames: the most common size among a few sample frames.

    Looks at one file per frame folder (RGB folders, then event frames, sequence by sequence),
    decodes up to ``samples`` of them, and gives up after ``max_tries`` files that do not decode;
    a single odd frame (wrong size, corrupt) therefore does not decide the size of a whole tree.
    Ties go to the size seen first. None when no frame could be decoded.
    """
    sizes: list[tuple[int, int]] = []
    failures = 0
    for seq_dir in seq_dirs:
        for sub in (*RGB_DIRS, os.path.join(*EVENT_DIR)):
            folder = seq_dir / sub
            try:
                with os.scandir(folder) as it:
                    names = sorted(e.name for e in it if e.name.lower().endswith((".jpg", ".jpeg", ".png")))
            except OSError:
                continue
            if not names:
                continue
            img = cv2.imread(str(folder / names[0]), cv2.IMREAD_UNCHANGED)
            if img is not None and img.ndim >= 2:
                sizes.append((int(img.shape[1]), int(img.shape[0])))
                if len(sizes) >= samples:
                    break
            else:
                failures += 1
                if failures >= max_tries:
                    break
        if len(sizes) >= samples or failures >= max_tries:
            break
    if not sizes:
        return None
    counts = Counter(sizes)
    return max(counts, key=lambda size: (counts[size], -sizes.index(size)))


def store_size(imgsz: int, frame_size: tuple[int, int] = (FRAME_WIDTH, FRAME_HEIGHT)) -> tuple[int, int]:
    """Frame store ``(width, height)``: width ``imgsz``, height keeps the source aspect ratio."""
    if imgsz <= 0:
        raise ValueError(f"imgsz must be positive, got {imgsz}")
    return imgsz, round(imgsz * frame_size[1] / frame_size[0])


@dataclass
class PrepareSummary:
    """What ``prepare`` did; ``to_dict()`` is what ``prepare_summary.json`` holds.

    ``sequences`` has one row per sequence (keys as in the printed table plus a few more),
    ``overall`` the row over all sequences, ``splits`` per-split totals of what the COCO files
    hold (sequences, images, boxes, dual share).
    """

    fred_root: Path
    out: Path
    split: str
    split_source: str
    sequences: list[dict[str, Any]]
    overall: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bad_frames: list[tuple[int, str, str]] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)
    annotation_files: dict[str, Path] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "fred_root": str(self.fred_root),
            "out": str(self.out),
            "split": self.split,
            "split_source": self.split_source,
            "settings": self.settings,
            "sequences": self.sequences,
            "overall": self.overall,
            "splits": self.splits,
            "store": self.store,
            "annotation_files": {k: str(v) for k, v in self.annotation_files.items()},
            "bad_frames": [{"image_id": i, "path": p, "reason": r} for i, p, r in self.bad_frames],
            "warnings": self.warnings,
            "problem_count": len(self.problems),
            "problems": self.problems,
        }


def _sequence_row(seq: SequenceIndex, paired: PairedSequence, split: str) -> dict[str, Any]:
    s = paired.stats
    return {
        "sequence": seq.seq_id,
        "split": split,
        "rgb_frames": s.rgb_frames,
        "event_frames": s.event_frames,
        "pairs": s.pairs,
        "dual_rate": s.dual_rate,
        "avg_tdiff_ms": s.avg_tdiff_ms,
        "max_tdiff_ms": s.max_tdiff_ms,
        "unpaired_rgb": s.unpaired_rgb,
        "unpaired_event": s.unpaired_event,
        "boxes": seq.n_boxes,
        "clipped": seq.n_clipped,
        "malformed": seq.n_malformed,
        "dropped_empty": seq.n_dropped_empty,
        "duplicates": seq.n_duplicates,
        "unmatched_boxes": paired.unmatched_boxes,
        "images": len(paired.images),
        "excluded_bad": 0,
        "conditions": [],
    }


def _add_conditions(
    rows: dict[int, dict[str, Any]], scan: FredScan, problems: list[str], log: Callable[[str], None]
) -> None:
    """Each row's ``conditions`` (``data.conditions``: the side file, else FRED's official lists) and
    one line with the sequences per condition."""
    counts: Counter[str] = Counter()
    for seq_id, row in rows.items():
        row["conditions"] = sequence_conditions(scan.sequences[seq_id], seq_id, problems)
        counts.update(row["conditions"])
    if counts:
        per = ", ".join(f"{name} {counts[name]}" for name in sort_conditions(counts))
        log(f"conditions (sequences): {per}")


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key, header, format)
    ("sequence", "seq", "{}"),
    ("split", "split", "{}"),
    ("rgb_frames", "RGB", "{}"),
    ("event_frames", "Event", "{}"),
    ("pairs", "pairs", "{}"),
    ("dual_rate", "dual%", "{:.1f}"),
    ("avg_tdiff_ms", "avg_dt_ms", "{:.2f}"),
    ("max_tdiff_ms", "max_dt_ms", "{:.2f}"),
    ("unpaired_rgb", "unp_RGB", "{}"),
    ("unpaired_event", "unp_Event", "{}"),
    ("boxes", "boxes", "{}"),
    ("clipped", "clipped", "{}"),
    ("malformed", "malformed", "{}"),
)


def format_table(rows: list[dict[str, Any]], overall: dict[str, Any]) -> str:
    """The per-sequence pairing table with the overall row last, as text."""

    def cells(row: dict[str, Any]) -> list[str]:
        out = []
        for key, _, fmt in _COLUMNS:
            value = row.get(key, "")
            if key == "dual_rate" and isinstance(value, float):
                value *= 100.0
            out.append(fmt.format(value) if value != "" else "")
        return out

    header = [h for _, h, _ in _COLUMNS]
    body = [cells(r) for r in rows]
    last = cells(overall)
    widths = [max(len(x) for x in col) for col in zip(header, *body, last)]

    def line(parts: list[str]) -> str:
        return "  ".join(p.rjust(w) for p, w in zip(parts, widths))

    sep = "-" * len(line(header))
    return "\n".join([line(header), sep, *(line(b) for b in body), sep, line(last)])


_Indexed = list[tuple[SequenceIndex, PairedSequence]]
_OVERALL_SUMS = (
    "boxes",
    "clipped",
    "malformed",
    "dropped_empty",
    "duplicates",
    "unmatched_boxes",
    "images",
    "excluded_bad",
)


def _scan(fred_root: Path) -> FredScan:
    """The sequence folders of ``fred_root``; FredError when there are none or some are still zipped."""
    scan = scan_root(Path(fred_root))
    root = scan.root
    if scan.zipped:
        names = ", ".join(str(p) for p in scan.zipped)
        raise FredError(
            f"{root}: {len(scan.zipped)} sequence(s) are still zipped; unzip these first: {names}"
        )
    if not scan.sequences:
        raise FredError(
            f"{root}: no sequence folders found "
            "(expected <root>/<id>/ or <root>/train/<id>/, <root>/test/<id>/)"
        )
    return scan


def _frame_size(scan: FredScan, frame_size: tuple[int, int] | None, warnings: list[str]) -> tuple[int, int]:
    """``frame_size`` as ints, or read from the frames (FRED's size, with a warning, when none decodes)."""
    if frame_size is None:
        frame_size = detect_frame_size(list(scan.sequences.values()))
        if frame_size is None:
            frame_size = (FRAME_WIDTH, FRAME_HEIGHT)
            warnings.append(
                f"could not read a frame to learn the frame size; assuming {FRAME_WIDTH}x{FRAME_HEIGHT}"
            )
    frame_w, frame_h = int(frame_size[0]), int(frame_size[1])
    if frame_w <= 0 or frame_h <= 0:
        raise ValueError(f"frame_size must be positive, got {frame_size}")
    return frame_w, frame_h


def _index(
    scan: FredScan,
    frame_size: tuple[int, int],
    tolerance_ms: float,
    stride: int,
    problems: list[str],
    progress: bool,
) -> _Indexed:
    """Index and pair every readable sequence (an unreadable one is a problem); FredError when none is."""
    frame_w, frame_h = frame_size
    indexed: _Indexed = []
    for seq_id, seq_dir in tqdm(scan.sequences.items(), desc="index", unit="seq", disable=not progress):
        try:
            seq = read_sequence(seq_dir, scan.root, frame_w, frame_h)
        except (OSError, FredError) as exc:
            problems.append(f"{seq_dir}: sequence {seq_id} skipped ({exc})")
            continue
        problems.extend(seq.problems)
        indexed.append((seq, pair_sequence(seq, tolerance_ms, stride)))
    if not indexed:
        raise FredError(f"{scan.root}: no readable sequence folder")
    return indexed


def _split(
    indexed: _Indexed,
    split: str,
    val_fraction: float,
    seed: int,
    warnings: list[str],
    log: Callable[[str], None],
) -> tuple[SplitPlan, dict[str, _Indexed]]:
    """Split the sequences (see ``splits.plan_splits``), log all warnings so far, and group the
    sequences by split."""
    plan = plan_splits([s.seq_id for s, _ in indexed], split, val_fraction, seed)
    warnings.extend(plan.warnings)
    for w in warnings:
        log(f"warning: {w}")
    by_split: dict[str, _Indexed] = {s: [] for s in SPLIT_NAMES}
    for seq, paired in indexed:
        by_split[plan.assignment[seq.seq_id]].append((seq, paired))
    return plan, by_split


def _frame_records(by_split: dict[str, _Indexed], root: Path) -> list[FrameRecord]:
    """Give every image its id, unique over all splits (train, val, test; sequences by id; time order),
    and list the frames the store holds for it."""
    records: list[FrameRecord] = []
    next_id = 1
    for name in SPLIT_NAMES:
        for seq, paired in by_split[name]:
            for img in paired.images:
                img.image_id = next_id
                next_id += 1
                records.append(
                    FrameRecord(
                        image_id=img.image_id,
                        sequence_id=seq.seq_id,
                        rgb_path=root / img.rgb_file_name if img.rgb_file_name else None,
                        event_path=root / img.event_file_name if img.event_file_name else None,
                        orig_size=(seq.width, seq.height),
                    )
                )
    return records


@dataclass(frozen=True)
class StoreOptions:
    """How the frame store is built: codec per frame kind, the kinds kept, workers, device."""

    codecs: dict[str, Codec]
    kinds: tuple[str, ...]
    workers: int = 0
    device: Any = None


def _frame_store(
    store_dir: Path,
    records: list[FrameRecord],
    store_wh: tuple[int, int],
    options: StoreOptions,
    progress: bool,
    log: Callable[[str], None],
) -> StoreReport:
    """Build (or reuse) the frame store and log what it did, bad frames included."""
    store_w, store_h = store_wh
    codecs = ", ".join(f"{k} {options.codecs[k]}" for k in options.kinds)
    where = f", {options.device}" if options.device is not None else ""
    log(f"frame store {store_dir}: {len(records)} images at {store_w}x{store_h} ({codecs}{where})")
    report = build_store(
        store_dir,
        records,
        store_w,
        store_h,
        workers=options.workers,
        progress=progress,
        codecs=options.codecs,
        kinds=options.kinds,
        device=options.device,
    )
    per_pair = report.bytes_written / max(report.frames_written, 1)
    log(
        f"frame store: {report.built_shards} shard(s) built, {report.reused_shards} reused, "
        f"{report.frames_written} frames written in {report.seconds:.1f} s "
        f"({report.frames_per_s:.1f} frames/s, {report.bytes_written / 1e6:.1f} MB, "
        f"{per_pair / 1e3:.1f} KB per image)"
    )
    for image_id, path, reason in report.bad_frames:
        log(f"bad frame, image {image_id} excluded: {path}: {reason}")
    return report


def _without_bad_frames(report: StoreReport) -> dict[str, Any]:
    """The store report as a dict, its bad frames left out (the summary lists them on their own)."""
    return {k: v for k, v in asdict(report).items() if k != "bad_frames"}


def _write_annotations(
    ann_dir: Path,
    by_split: dict[str, _Indexed],
    bad_ids: set[int],
    rows: dict[int, dict[str, Any]],
    info: dict[str, Any],
    frame_size: tuple[int, int],
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """Write one COCO file per split without the images in ``bad_ids`` (counted in ``rows``), each
    image with its sequence's conditions (from ``rows``); annotation ids run on over the splits.
    Returns the per-split totals and the files."""
    split_totals: dict[str, dict[str, Any]] = {}
    annotation_files: dict[str, Path] = {}
    ann_id = 1
    for name in SPLIT_NAMES:
        images = []
        for seq, paired in by_split[name]:
            kept = [img for img in paired.images if img.image_id not in bad_ids]
            rows[seq.seq_id]["excluded_bad"] = len(paired.images) - len(kept)
            images.extend(kept)
        conditions = {seq.seq_id: rows[seq.seq_id]["conditions"] for seq, _ in by_split[name]}
        coco = build_coco(
            images, name, info, frame_size=frame_size, ann_id_start=ann_id, conditions=conditions
        )
        ann_id += len(coco["annotations"])
        path = ann_dir / f"instances_{name}.json"
        write_coco(path, coco)
        annotation_files[name] = path
        n_dual = sum(1 for img in images if img.pair_status == DUAL)
        split_totals[name] = {
            "sequences": len(by_split[name]),
            "sequence_ids": [seq.seq_id for seq, _ in by_split[name]],
            "images": len(images),
            "boxes": len(coco["annotations"]),
            "dual_share": n_dual / len(images) if images else 0.0,
            "excluded_bad": sum(rows[seq.seq_id]["excluded_bad"] for seq, _ in by_split[name]),
        }
    return split_totals, annotation_files


def _overall_row(indexed: _Indexed, seq_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The table row over all sequences: merged pairing statistics and summed counters."""
    merged = PairingStats.merge(p.stats for _, p in indexed)
    overall: dict[str, Any] = {"sequence": "all", "split": "", **merged.to_dict()}
    for key in _OVERALL_SUMS:
        overall[key] = sum(r[key] for r in seq_rows)
    return overall


def _log_report(
    log: Callable[[str], None],
    seq_rows: list[dict[str, Any]],
    overall: dict[str, Any],
    split_totals: dict[str, dict[str, Any]],
    problems: list[str],
    summary_path: Path,
) -> None:
    """Log the pairing table, one line per split and the first problems."""
    log(format_table(seq_rows, overall))
    for name in SPLIT_NAMES:
        t = split_totals[name]
        log(
            f"{name:>5}: {t['sequences']} sequences, {t['images']} images, {t['boxes']} boxes, "
            f"dual {100.0 * t['dual_share']:.1f}%"
            + (f", {t['excluded_bad']} excluded (bad frames)" if t["excluded_bad"] else "")
        )
    if problems:
        log(f"{len(problems)} problem(s) found:")
        for msg in problems[:MAX_PRINTED_PROBLEMS]:
            log(f"  {msg}")
        if len(problems) > MAX_PRINTED_PROBLEMS:
            log(f"  ... and {len(problems) - MAX_PRINTED_PROBLEMS} more (see {summary_path})")


def prepare(
    fred_root: Path,
    out: Path,
    split: str = "canonical",
    stride: int = 1,
    tolerance_ms: float = 33.0,
    imgsz: int = 640,
    workers: int = 0,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    frame_size: tuple[int, int] | None = None,
    codec: str = "auto",
    modalities: str = "dual",
    device: Any = None,
) -> PrepareSummary:
    """Prepare a FRED tree for training; see the module docstring for the steps.

    Writes ``out/store/``, ``out/annotations/instances_{train,val,test}.json`` and
    ``out/prepare_summary.json``. A re-run on an unchanged tree reuses the frame store.
    ``frame_size`` is the ``(width, height)`` of the source frames (boxes are clipped to it,
    frames of another size are bad); None reads it from the first frame found (FRED: 1280x720).
    Raises :class:`FredError` when the root is missing, holds no sequence folder, or holds
    zipped sequences without an unzipped folder ("unzip these first: ...").
    ``codec`` is a ``--codec`` value (``store.parse_codecs``), ``modalities`` which frames the store
    keeps (rgb, event or dual), ``device`` a torch device that encodes the RGB frames (None: the
    ``workers`` processes do everything).
    """
    check_pairing_settings(stride, tolerance_ms)
    options = StoreOptions(parse_codecs(codec), frames_for(modalities), workers, device)
    store_size(imgsz)  # checks imgsz before any work
    out = Path(out).expanduser().absolute()
    scan = _scan(fred_root)
    root = scan.root
    problems: list[str] = list(scan.problems)
    warnings: list[str] = []
    frame_w, frame_h = _frame_size(scan, frame_size, warnings)
    store_w, store_h = store_size(imgsz, (frame_w, frame_h))
    log(f"FRED root {root}: {len(scan.sequences)} sequence(s), frames {frame_w}x{frame_h}")
    indexed = _index(scan, (frame_w, frame_h), tolerance_ms, stride, problems, progress)

    plan, by_split = _split(indexed, split, val_fraction, seed, warnings, log)
    records = _frame_records(by_split, root)
    report = _frame_store(out / "store", records, (store_w, store_h), options, progress, log)

    rows = {seq.seq_id: _sequence_row(seq, paired, plan.assignment[seq.seq_id]) for seq, paired in indexed}
    _add_conditions(rows, scan, problems, log)
    settings = {
        "split_scheme": split,
        "stride": stride,
        "tolerance_ms": float(tolerance_ms),
        "imgsz": imgsz,
        "frame_width": frame_w,
        "frame_height": frame_h,
        "store_width": store_w,
        "store_height": store_h,
        "val_fraction": val_fraction,
        "seed": seed,
        "codecs": {k: str(options.codecs[k]) for k in options.kinds},
    }
    info = {
        "description": "FRED (Florence RGB-Event Drone dataset) prepared by fredfusion",
        "version": __version__,
        "fred_root": str(root),
        "split_source": plan.source,
        **settings,
    }
    bad_ids = {int(b[0]) for b in report.bad_frames}
    split_totals, annotation_files = _write_annotations(
        out / "annotations", by_split, bad_ids, rows, info, (frame_w, frame_h)
    )

    seq_rows = [rows[i] for i in sorted(rows)]
    overall = _overall_row(indexed, seq_rows)
    _log_report(log, seq_rows, overall, split_totals, problems, out / SUMMARY_NAME)
    summary = PrepareSummary(
        fred_root=root,
        out=out,
        split=split,
        split_source=plan.source,
        sequences=seq_rows,
        overall=overall,
        splits=split_totals,
        problems=problems,
        warnings=warnings,
        bad_frames=list(report.bad_frames),
        store={**_without_bad_frames(report), "dir": str(out / "store"), "width": store_w, "height": store_h},
        annotation_files=annotation_files,
        settings=settings,
    )
    write_json_atomic(out / SUMMARY_NAME, summary.to_dict(), indent=1)
    log(f"wrote {', '.join(str(p) for p in annotation_files.values())} and {out / SUMMARY_NAME}")
    return summary
