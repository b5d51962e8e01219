"""Pictures: PR curve, error gallery tiles, training curves, prediction previews.

Figures are drawn with matplotlib's Agg canvas created inside each function (no pyplot, no global
backend switch); images are RGB ``uint8`` arrays drawn with :mod:`fredfusion.draw`; both are written
with :func:`fredfusion.draw.save_png`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fredfusion.draw import add_caption, draw_boxes, rgb_copy, save_png, side_by_side, tile_grid
from fredfusion.spec import NMS_IOU

__all__ = [
    "COLOR_FP",
    "COLOR_GT",
    "COLOR_MISS",
    "COLOR_PRED",
    "draw_pair_preview",
    "error_tile",
    "new_figure",
    "plot_curves",
    "plot_pr_curve",
    "save_figure",
]

# RGB colours
COLOR_GT = (0, 200, 0)
COLOR_FP = (230, 0, 0)
COLOR_MISS = (255, 220, 0)
COLOR_PRED = (230, 0, 0)


def new_figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure of ``size`` inches at 100 dpi bound to an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, out_png: Path) -> Path:
    """Render ``fig`` and write it as PNG (:func:`fredfusion.draw.save_png`)."""
    fig.canvas.draw()
    return save_png(out_png, np.asarray(fig.canvas.buffer_rgba())[..., :3])


def plot_pr_curve(
    out_png: Path,
    recall: np.ndarray,
    precision: np.ndarray,
    best: Mapping[str, float] | None = None,
    coco_curve: tuple[np.ndarray, np.ndarray] | None = None,
    title: str = "precision-recall, IoU 0.5",
) -> Path:
    """Draw a PR curve; ``best`` (conf, precision, recall, f1) is marked; ``coco_curve`` = (recall,
    interpolated precision) from COCO's precision array, drawn dashed."""
    fig = new_figure((6.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    r = np.asarray(recall, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    ax.plot(r, p, color="tab:blue", lw=1.5, label="matched detections")
    if coco_curve is not None:
        cr, cp = (np.asarray(v, dtype=np.float64) for v in coco_curve)
        ok = cp > -1
        if ok.any():
            ax.plot(cr[ok], cp[ok], color="tab:gray", lw=1.0, ls="--", label="COCO interpolated")
    if best is not None and best.get("f1", 0) > 0:
        ax.plot(
            [best["recall"]],
            [best["precision"]],
            "o",
            color="tab:red",
            label=f"best F1 {best['f1']:.3f} @ conf {best['conf']:.3f}",
        )
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    return save_figure(fig, out_png)


def error_tile(
    rgb: np.ndarray,
    event: np.ndarray,
    gt_boxes: np.ndarray,
    fp_boxes: np.ndarray,
    miss_boxes: np.ndarray,
    title: str = "",
) -> np.ndarray:
    """RGB | Event side by side with gt (green), false positives (red), missed drones (yellow).

    Frames are ``(H, W, 3)`` RGB uint8, boxes x1y1x2y2 in frame pixels; returns an RGB uint8 tile.
    """
    layers = [(gt_boxes, COLOR_GT), (miss_boxes, COLOR_MISS), (fp_boxes, COLOR_FP)]
    body = side_by_side([_boxed(rgb, layers), _boxed(event, layers)])
    text = title
    if body.shape[1] >= 700 or not title:  # the legend only where it fits
        legend = "green: gt  red: false positive  yellow: missed"
        text = f"{title}   {legend}" if title else legend
    return add_caption(body, text)


def _boxed(frame: np.ndarray, layers: Sequence[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    """A copy of ``frame`` with each (boxes, colour) layer drawn in turn."""
    img = rgb_copy(frame)
    for boxes, color in layers:
        draw_boxes(img, boxes, color)
    return img


def _read_results_csv(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise ValueError(f"{path}: empty file (expected a header with an 'epoch' column)")
    header = [h.strip() for h in rows[0]]
    if "epoch" not in header:
        raise ValueError(f"{path}: line 1: no 'epoch' column in header {header}")
    cols: dict[str, list[float]] = {h: [] for h in header}
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}: line {lineno}: {len(row)} fields, header has {len(header)}")
        for h, cell in zip(header, row):
            cell = cell.strip()
            if cell == "" or cell.lower() in ("none", "nan"):
                cols[h].append(math.nan)
                continue
            try:
                cols[h].append(float(cell))
            except ValueError:
                if h == "epoch":
                    raise ValueError(f"{path}: line {lineno}: epoch {cell!r} is not a number") from None
                cols[h].append(math.nan)
    if not cols["epoch"]:
        raise ValueError(f"{path}: no data rows")
    return {h: np.asarray(v, dtype=np.float64) for h, v in cols.items()}


def plot_curves(results_csv: Path, out_png: Path) -> Path:
    """Training curves from results.csv: losses, mAP50 / mAP50_95 and lr against epoch.

    Needs an ``epoch`` column; ``train_loss``, ``val_loss``, ``mAP50``, ``mAP50_95``, ``lr`` are drawn
    when present (empty cells are gaps).
    """
    cols = _read_results_csv(Path(results_csv))
    epoch = cols["epoch"]
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "val")]),
        ("mAP", [("mAP50", "mAP50"), ("mAP50_95", "mAP50:95")]),
        ("learning rate", [("lr", "lr")]),
    ]
    fig = new_figure((12.0, 3.6))
    for k, (name, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for col, label in series:
            y = cols.get(col)
            if y is None or not np.isfinite(y).any():
                continue
            ok = np.isfinite(y)
            ax.plot(epoch[ok], y[ok], marker="o", ms=3, lw=1.3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
    fig.tight_layout()
    return save_figure(fig, Path(out_png))


def draw_pair_preview(
    model: Any,
    dataset: Any,
    ids: Sequence[int],
    input_hw: tuple[int, int],
    device: Any = "cpu",
    conf: float = 0.25,
    iou: float = NMS_IOU,
) -> np.ndarray:
    """Predictions (red) and gt (green) on RGB | Event of a few images; RGB uint8 (H, W, 3)."""
    from fredfusion.eval.evaluator import predict_frames

    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("draw_pair_preview needs at least one image id")
    fb = dataset.load(ids)
    preds = predict_frames(model, fb.rgb, fb.event, input_hw, device=device, conf=conf, iou=iou)
    tiles = []
    for k, image_id in enumerate(ids):
        layers = [(fb.boxes[k], COLOR_GT), (preds[k][:, :4], COLOR_PRED)]
        body = side_by_side([_boxed(fb.rgb[k], layers), _boxed(fb.event[k], layers)], sep=0)
        tiles.append(add_caption(body, f"image {image_id}: green gt, red predicted"))
    return tile_grid(tiles, cols=1)
