"""`fredfusion show`: a grid of RGB | Event pairs with boxes, and a report of a prepared split.

The grid shows frames from the frame store (store pixels) or, with ``augment``, the same frames
after the training augmentation (Mosaic and MixUp on), so that one can check that both modalities
stay aligned. The report reads the split's COCO file (and ``prepare_summary.json`` for clipped
boxes) and gives per-sequence numbers as a printed table and as ``report.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fredfusion.draw import (
    GRID_GAP,
    HEADER_H,
    PAIR_SEP,
    add_caption,
    draw_boxes,
    rgb_copy,
    save_png,
    side_by_side,
)
from fredfusion.draw import tile_grid as pair_grid
from fredfusion.spec import DEFAULT_INPUT_HW, FRAME_KINDS, check_hw

__all__ = [
    "BOX_COLOR",
    "GRID_GAP",
    "HEADER_H",
    "PAIR_SEP",
    "dataset_report",
    "default_input_hw",
    "format_report_table",
    "pair_grid",
    "plot_report",
    "render_pairs",
    "show",
]

BOX_COLOR = (0, 200, 0)
"""Colour of the boxes on both frames of a pair (RGB)."""


# ------------------------------------------------------------------------------------------- sizes
def default_input_hw(
    store_hw: tuple[int, int], base_hw: tuple[int, int] = DEFAULT_INPUT_HW
) -> tuple[int, int]:
    """Augmentation output size for a store of ``store_hw`` (height, width).

    ``base_hw`` when the store is at least that wide; else width = the largest multiple of 32 not
    above the store width (at least 32) and height = that width times the store aspect, rounded up
    to a multiple of 32 (128x72 -> 96x128, 320x180 -> 192x320).
    """
    sh, sw = (int(v) for v in store_hw)
    if sh <= 0 or sw <= 0:
        raise ValueError(f"store size must be positive, got {store_hw!r}")
    if sw >= base_hw[1]:
        return int(base_hw[0]), int(base_hw[1])
    w = max(32, sw // 32 * 32)
    h = max(32, math.ceil(w * sh / sw / 32) * 32)
    return h, w


# -------------------------------------------------------------------------------------------- grid
def _pair_tile(rgb: np.ndarray, event: np.ndarray, boxes: np.ndarray, caption: str) -> np.ndarray:
    """Caption bar over RGB | Event, both with the same boxes."""
    thickness = 1 if rgb.shape[1] < 400 else 2
    panels = [draw_boxes(rgb_copy(f), boxes, BOX_COLOR, thickness, antialias=False) for f in (rgb, event)]
    return add_caption(side_by_side(panels), caption)


def _default_cols(n: int) -> int:
    """Pair tiles are ~3.5:1, so about sqrt(n / 2) columns give a roughly 5:3 picture."""
    return max(1, min(n, round(math.sqrt(n / 2))))


def _open_dataset(data: Path, split: str) -> Any:
    from fredfusion.data.dataset import PreparedDataset

    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"prepared folder not found: {data}; run `fredfusion prepare` first")
    return PreparedDataset(data, split, modality="dual", pairs="any")


def render_pairs(
    data: Path,
    split: str = "train",
    n: int = 16,
    augment: bool = False,
    seed: int = 0,
    input_hw: tuple[int, int] | None = None,
    cols: int | None = None,
    dataset: Any = None,
) -> np.ndarray:
    """RGB uint8 grid of ``n`` RGB | Event pairs of ``split`` with their boxes (green).

    Images are drawn at random (``seed``) among the true pairs (all images when there is none).
    Without ``augment``: store frames and store-pixel boxes. With ``augment``: ``augment_batch``
    with the default ``AugmentConfig`` and Mosaic / MixUp on, output ``input_hw`` (default
    :func:`default_input_hw` of the store size), generator seeded with ``seed``.
    """
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    ds = dataset if dataset is not None else _open_dataset(data, split)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {ds.path} has no images")
    dual = np.flatnonzero(ds.has_rgb & ds.has_event)
    pool = dual if dual.size else np.arange(len(ds))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(pool, size=min(n, pool.size), replace=False))
    ids = ds.ids[pick]
    fb = ds.load(ids, modalities=FRAME_KINDS)
    status = {(True, True): "", (True, False): " rgb only", (False, True): " event only"}

    tiles = []
    if not augment:
        for k, image_id in enumerate(ids):
            img = ds.images[int(pick[k])]
            dt = img.get("time_diff_ms")
            dt_txt = (
                f" dt {abs(float(dt)):.1f}ms" if dt is not None and fb.has_rgb[k] and fb.has_event[k] else ""
            )
            flags = status.get((bool(fb.has_rgb[k]), bool(fb.has_event[k])), " no frame")
            cap = f"id {int(image_id)} seq {img['sequence_id']}{dt_txt} {len(fb.boxes[k])} box{flags}"
            tiles.append(_pair_tile(fb.rgb[k], fb.event[k], fb.boxes[k], cap))
    else:
        import torch

        from fredfusion.data.augment import AugmentConfig, augment_batch, valid_targets

        hw = check_hw(input_hw, "--input-shape") if input_hw else default_input_hw(ds.store_hw)
        rows = [
            np.concatenate([np.full((len(b), 1), k, np.float32), np.zeros((len(b), 1), np.float32), b], 1)
            for k, b in enumerate(fb.boxes)
        ]
        targets = torch.from_numpy(np.concatenate(rows, 0).reshape(-1, 6).astype(np.float32))
        rgb = torch.from_numpy(np.ascontiguousarray(fb.rgb)).permute(0, 3, 1, 2).contiguous()
        event = torch.from_numpy(np.ascontiguousarray(fb.event)).permute(0, 3, 1, 2).contiguous()
        gen = torch.Generator().manual_seed(int(seed))
        out_rgb, out_event, out_t = augment_batch(
            rgb, event, targets, hw, AugmentConfig(), special=True, generator=gen
        )
        assert out_rgb is not None and out_event is not None

        def to_u8(x: torch.Tensor) -> np.ndarray:
            return (x.mul(255.0).round_().clamp_(0, 255)).to(torch.uint8).permute(0, 2, 3, 1).numpy()

        a_rgb, a_event, t = to_u8(out_rgb), to_u8(out_event), valid_targets(out_t).numpy()
        for k, image_id in enumerate(ids):
            boxes = t[t[:, 0] == k, 2:6]
            cap = f"augmented, base id {int(image_id)}: {len(boxes)} box"
            tiles.append(_pair_tile(a_rgb[k], a_event[k], boxes, cap))
    return pair_grid(tiles, cols if cols is not None else _default_cols(len(tiles)))


# ------------------------------------------------------------------------------------------ report
def _read_summary(data: Path) -> tuple[dict[int, int] | None, Path]:
    """Clipped boxes per sequence from ``prepare_summary.json`` (None when the file is absent)."""
    path = Path(data) / "prepare_summary.json"
    if not path.is_file():
        return None, path
    try:
        with open(path) as f:
            summary = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in {path} (line {e.lineno}, column {e.colno}): {e.msg}") from None
    seqs = summary.get("sequences") if isinstance(summary, dict) else None
    if not isinstance(seqs, list):
        raise ValueError(f"{path}: no 'sequences' list; not a prepare summary")
    clipped: dict[int, int] = {}
    for k, entry in enumerate(seqs):
        try:
            clipped[int(entry["sequence"])] = int(entry.get("clipped", 0))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{path}: sequences entry {k} needs an integer 'sequence'") from None
    return clipped, path


def dataset_report(data: Path, split: str = "train", dataset: Any = None) -> dict[str, Any]:
    """Numbers of one split from its COCO file (and clipped boxes from ``prepare_summary.json``).

    Returns ``sequences`` (one dict per sequence: sequence, split, images, dual, rgb_only,
    event_only, dual_rate, mean_dt_ms, max_dt_ms (None without pairs), boxes, clipped (None without
    the summary)), ``total`` (same keys, sequence "all"), ``boxes_per_image`` (int array, one per
    image), ``box_max_side`` (max(w, h) of every box in original pixels), ``time_diffs`` (sequence
    -> |dt| ms of its pairs) and ``summary_path`` (the summary file or None).
    """
    ds = dataset if dataset is not None else _open_dataset(data, split)
    coco = ds.coco
    images = ds.images
    seq_of = {int(img["id"]): int(img["sequence_id"]) for img in images}
    per_image = {iid: 0 for iid in seq_of}
    sides: list[float] = []
    for ann in coco.get("annotations") or []:  # entries were validated by PreparedDataset
        iid = int(ann["image_id"])
        w, h = float(ann["bbox"][2]), float(ann["bbox"][3])
        if iid in per_image and w > 0 and h > 0:
            per_image[iid] += 1
            sides.append(max(w, h))
    clipped, summary_path = _read_summary(Path(data) if dataset is None else ds.root)

    rows: dict[int, dict[str, Any]] = {}
    diffs: dict[int, list[float]] = {}
    for img, has_r, has_e in zip(images, ds.has_rgb, ds.has_event):
        s = int(img["sequence_id"])
        row = rows.setdefault(
            s,
            {
                "sequence": s,
                "split": split,
                "images": 0,
                "dual": 0,
                "rgb_only": 0,
                "event_only": 0,
                "boxes": 0,
            },
        )
        row["images"] += 1
        row["boxes"] += per_image[int(img["id"])]
        if has_r and has_e:
            row["dual"] += 1
            if img.get("time_diff_ms") is not None:
                diffs.setdefault(s, []).append(abs(float(img["time_diff_ms"])))
        elif has_r:
            row["rgb_only"] += 1
        elif has_e:
            row["event_only"] += 1

    def finish(row: dict[str, Any], dts: list[float], clip: int | None) -> dict[str, Any]:
        row["dual_rate"] = row["dual"] / row["images"] if row["images"] else 0.0
        row["mean_dt_ms"] = float(np.mean(dts)) if dts else None
        row["max_dt_ms"] = float(np.max(dts)) if dts else None
        row["clipped"] = clip
        return row

    seqs = [
        finish(rows[s], diffs.get(s, []), None if clipped is None else clipped.get(s, 0))
        for s in sorted(rows)
    ]
    total = {"sequence": "all", "split": split}
    for key in ("images", "dual", "rgb_only", "event_only", "boxes"):
        total[key] = sum(r[key] for r in seqs)
    all_dts = [d for s in sorted(diffs) for d in diffs[s]]
    clip_total = None if clipped is None else sum(r["clipped"] for r in seqs)
    return {
        "data": str(ds.root),
        "split": split,
        "sequences": seqs,
        "total": finish(total, all_dts, clip_total),
        "boxes_per_image": np.asarray([per_image[int(img["id"])] for img in images], dtype=np.int64),
        "box_max_side": np.asarray(sides, dtype=np.float64),
        "time_diffs": {s: np.asarray(diffs.get(s, []), dtype=np.float64) for s in sorted(rows)},
        "summary_path": summary_path if clipped is not None else None,
    }


def format_report_table(report: dict[str, Any]) -> str:
    """The per-sequence table (one row per sequence, then the total) as text."""
    head = f"{'seq':>5} {'split':>6} {'images':>7} {'dual':>6} {'dual%':>6} {'mean_dt_ms':>10} "
    head += f"{'max_dt_ms':>9} {'boxes':>6} {'clipped':>7}"

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def line(r: dict[str, Any]) -> str:
        return (
            f"{r['sequence']!s:>5} {r['split']:>6} {r['images']:>7d} {r['dual']:>6d} "
            f"{100 * r['dual_rate']:>6.1f} {fmt(r['mean_dt_ms'], '.2f'):>10} {fmt(r['max_dt_ms'], '.2f'):>9} "
            f"{r['boxes']:>6d} {fmt(r['clipped'], 'd'):>7}"
        )

    rule = "-" * len(head)
    return "\n".join([head, rule, *(line(r) for r in report["sequences"]), rule, line(report["total"])])


def _seq_axis(ax: Any, seqs: Sequence[int]) -> None:
    step = max(1, math.ceil(len(seqs) / 30))
    pos = list(range(0, len(seqs), step))
    ax.set_xticks(pos)
    ax.set_xticklabels([str(seqs[p]) for p in pos], rotation=90 if len(pos) > 12 else 0, fontsize=7)
    ax.set_xlabel("sequence")


def plot_report(report: dict[str, Any], out_png: Path) -> Path:
    """Six panels: boxes per image, box size, pairs per sequence, dual rate, |dt|, clipped boxes."""
    from matplotlib.ticker import MaxNLocator

    from fredfusion.eval.plots import new_figure, save_figure

    fig = new_figure((15.0, 8.5))
    axes = [fig.add_subplot(2, 3, k + 1) for k in range(6)]
    seqs = [int(r["sequence"]) for r in report["sequences"]]
    x = np.arange(len(seqs))
    tot = report["total"]

    ax = axes[0]
    counts = report["boxes_per_image"]
    if counts.size:
        hist = np.bincount(counts)
        ax.bar(np.arange(hist.size), hist, color="tab:blue")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("boxes per image")
    ax.set_ylabel("images")
    ax.set_title(f"boxes per image ({tot['images']} images)")

    ax = axes[1]
    sides = report["box_max_side"]
    if sides.size:
        ax.hist(sides, bins=min(40, max(5, int(np.sqrt(sides.size)))), color="tab:green")
        ax.axvline(
            float(np.median(sides)), color="k", ls="--", lw=1, label=f"median {np.median(sides):.0f} px"
        )
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no boxes", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("box max side (original pixels)")
    ax.set_ylabel("boxes")
    ax.set_title(f"box size ({tot['boxes']} boxes)")

    ax = axes[2]
    parts = [("dual", "tab:blue"), ("rgb_only", "tab:orange"), ("event_only", "tab:purple")]
    bottom = np.zeros(len(seqs))
    for key, color in parts:
        vals = np.asarray([r[key] for r in report["sequences"]], dtype=np.float64)
        ax.bar(x, vals, bottom=bottom, color=color, label=key.replace("_", " "))
        bottom += vals
    ax.set_ylabel("images")
    ax.set_title("pairs per sequence")
    ax.legend(loc="upper right", fontsize=7)
    _seq_axis(ax, seqs)

    ax = axes[3]
    ax.bar(x, [100 * r["dual_rate"] for r in report["sequences"]], color="tab:blue")
    ax.axhline(100 * tot["dual_rate"], color="k", ls="--", lw=1, label=f"all {100 * tot['dual_rate']:.1f}%")
    ax.set_ylim(0, 105)
    ax.set_ylabel("dual rate (%)")
    ax.set_title("dual rate per sequence")
    ax.legend(loc="lower right", fontsize=7)
    _seq_axis(ax, seqs)

    ax = axes[4]
    mean = [r["mean_dt_ms"] if r["mean_dt_ms"] is not None else np.nan for r in report["sequences"]]
    mx = [r["max_dt_ms"] if r["max_dt_ms"] is not None else np.nan for r in report["sequences"]]
    ax.bar(x, mean, color="tab:cyan", label="mean")
    ax.plot(x, mx, "v", color="tab:red", ms=4, label="max")
    ax.set_ylabel("|time diff| (ms)")
    ax.set_title("RGB-Event time difference of pairs")
    ax.legend(loc="upper right", fontsize=7)
    _seq_axis(ax, seqs)

    ax = axes[5]
    if report["summary_path"] is None:
        ax.text(0.5, 0.5, "no prepare_summary.json", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.bar(x, [r["clipped"] for r in report["sequences"]], color="tab:red")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _seq_axis(ax, seqs)
    ax.set_ylabel("boxes")
    ax.set_title(f"clipped boxes (total {tot['clipped'] if tot['clipped'] is not None else '-'})")

    fig.suptitle(
        f"{Path(report['data']).name} / {report['split']}: {len(seqs)} sequences, {tot['images']} images, "
        f"{tot['boxes']} boxes, dual {100 * tot['dual_rate']:.1f}%"
    )
    fig.tight_layout()
    return save_figure(fig, Path(out_png))


# ------------------------------------------------------------------------------------------ driver
def show(
    data: Path,
    split: str = "train",
    n: int = 16,
    augment: bool = False,
    out: Path | None = None,
    seed: int = 0,
    input_hw: tuple[int, int] | None = None,
    cols: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``OUT/pairs.png`` and ``OUT/report.png`` (OUT default ``runs/show/<split>``), print the table.

    Returns ``{"pairs_png", "report_png", "table", "report"}``.
    """
    ds = _open_dataset(Path(data), split)
    out = Path(out) if out is not None else Path("runs/show") / split
    grid = render_pairs(
        data, split, n=n, augment=augment, seed=seed, input_hw=input_hw, cols=cols, dataset=ds
    )
    pairs_png = save_png(out / "pairs.png", grid)
    report = dataset_report(data, split, dataset=ds)
    report_png = plot_report(report, out / "report.png")
    table = format_report_table(report)
    log(f"show: {Path(data)} split {split!r}")
    log(table)
    if report["summary_path"] is None:
        log(f"note: {Path(data) / 'prepare_summary.json'} not found; clipped boxes unknown")
    what = "augmented (mosaic/mixup on) " if augment else ""
    log(f"wrote {pairs_png} ({what}{grid.shape[1]}x{grid.shape[0]}) and {report_png}")
    return {"pairs_png": pairs_png, "report_png": report_png, "table": table, "report": report}
