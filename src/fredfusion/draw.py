"""Drawing on RGB uint8 images: boxes (optionally with score labels), text labels, caption bars,
side-by-side panels, grids of tiles and PNG files.

The one set of picture primitives behind ``show``, ``predict`` and the evaluation pictures. Images
are ``(H, W, 3)`` RGB uint8 arrays, boxes ``(n, 4)`` x1, y1, x2, y2 in image pixels. Imports
numpy, OpenCV and the atomic writer only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from fredfusion.files import atomic_write

__all__ = [
    "GRID_GAP",
    "HEADER_H",
    "PAIR_SEP",
    "add_caption",
    "caption_bar",
    "draw_boxes",
    "put_label",
    "rgb_copy",
    "save_png",
    "side_by_side",
    "tile_grid",
]

Color = tuple[int, int, int]

HEADER_H = 22
"""Height of the caption bar above a tile."""
PAIR_SEP = 4
"""White columns between the panels of a side-by-side tile (RGB | Event)."""
GRID_GAP = 6
"""White pixels between the tiles of a grid."""

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE: Color = (255, 255, 255)
_BAR = 30  # grey level of caption bars


def rgb_copy(frame: np.ndarray) -> np.ndarray:
    """A writable contiguous ``(H, W, 3)`` uint8 copy of ``frame`` (a gray frame gets 3 channels)."""
    img = np.asarray(frame, dtype=np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.array(img, dtype=np.uint8, order="C", copy=True)


def put_label(
    img: np.ndarray,
    text: str,
    xy: tuple[float, float],
    scale: float,
    background: Color,
    pad: int = 1,
    above: bool = False,
) -> None:
    """White ``text`` on a filled ``background`` box, in place. ``xy`` is the box's top-left corner,
    or with ``above`` its bottom-left corner (top-left again where the box would leave the image)."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    h = th + base + 2 * pad
    x, y = round(xy[0]), round(xy[1])
    if above and y - h >= 0:
        y -= h
    cv2.rectangle(img, (x, y), (x + tw + 2 * pad, y + h), background, -1)
    cv2.putText(img, text, (x + pad, y + pad + th), _FONT, scale, _WHITE, 1, cv2.LINE_AA)


def draw_boxes(
    img: np.ndarray,
    boxes: np.ndarray,
    color: Color,
    thickness: int = 2,
    scores: np.ndarray | None = None,
    antialias: bool = True,
) -> np.ndarray:
    """Draw ``(n, 4)`` boxes on ``img`` in place and return it; with ``scores`` each box gets its score
    (two decimals) in a label of its colour above it."""
    b = np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)).astype(np.int64)
    line = cv2.LINE_AA if antialias else cv2.LINE_8
    for x1, y1, x2, y2 in b.tolist():
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thickness, lineType=line)
    if scores is not None:
        scale = 0.35 * thickness + 0.05
        for (x1, y1, _, _), s in zip(b.tolist(), np.asarray(scores, dtype=np.float64).tolist()):
            put_label(img, f"{s:.2f}", (x1, y1 - 1), scale, color, above=True)
    return img


def caption_bar(width: int, text: str, height: int = HEADER_H) -> np.ndarray:
    """A dark ``height`` x ``width`` bar with ``text`` in white."""
    bar = np.full((height, width, 3), _BAR, dtype=np.uint8)
    cv2.putText(bar, text, (5, height - 7), _FONT, 0.4, _WHITE, 1, cv2.LINE_AA)
    return bar


def add_caption(body: np.ndarray, text: str) -> np.ndarray:
    """``body`` with a :func:`caption_bar` of ``text`` above it (``HEADER_H`` rows more)."""
    return np.concatenate([caption_bar(body.shape[1], text), body], axis=0)


def side_by_side(panels: Sequence[np.ndarray], sep: int = PAIR_SEP) -> np.ndarray:
    """Panels of one shape left to right with ``sep`` white columns between them."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    first = panels[0]
    if any(p.shape != first.shape for p in panels):
        shapes = " vs ".join(str(p.shape) for p in panels)
        raise ValueError(f"side-by-side panels differ in shape: {shapes}")
    gap = np.full((first.shape[0], sep, 3), 255, dtype=np.uint8)
    parts = [part for p in panels for part in (gap, p)][1:]
    return np.concatenate(parts, axis=1)


def tile_grid(tiles: Sequence[np.ndarray], cols: int, gap: int = GRID_GAP) -> np.ndarray:
    """Lay equal-sized RGB uint8 tiles out row by row, ``cols`` per row, ``gap`` white pixels between.

    Size: ``rows * th + (rows - 1) * gap`` by ``cols * tw + (cols - 1) * gap`` with ``rows =
    ceil(len(tiles) / cols)`` (``cols`` at most the number of tiles); cells without a tile stay black.
    """
    if not tiles:
        raise ValueError("tile_grid needs at least one tile")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    if any(t.shape != tiles[0].shape for t in tiles):
        raise ValueError("grid tiles must all have the same shape")
    th, tw = tiles[0].shape[:2]
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), 255, np.uint8)
    for k in range(rows * cols):
        y, x = (k // cols) * (th + gap), (k % cols) * (tw + gap)
        grid[y : y + th, x : x + tw] = tiles[k] if k < len(tiles) else 0
    return grid


def save_png(path: Path, image_rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG through a temporary file in the same folder (``.NAME.*.tmp``),
    so ``path`` is either the old file or the whole new one; OSError when it cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image_rgb, dtype=np.uint8)[..., ::-1]))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    return atomic_write(path, lambda fh: fh.write(buf.tobytes()))
