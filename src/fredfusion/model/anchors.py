"""Anchor boxes: project defaults for small drones and k-means anchors fitted to a dataset.

Anchors are widths/heights in pixels of the training input, shaped ``(levels, anchors_per_level, 2)``
for the model (P3, P4, P5 rows) and ``(n, 2)`` sorted by area for the k-means helpers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# Defaults for FRED at a 640x384 training input. Drone boxes average ~25x17 px there and span roughly
# 6..120 px, always a little wider than tall (~1.45:1). The 9 anchors are a geometric ladder with a
# ~1.45x step at that aspect ratio, from 8x6 to 168x112: the average box (25x17) lands between the largest
# P3 anchor and the smallest P4 anchor (so it is supervised on two levels), the smallest boxes (~6x4) are
# within 1.5x of the first anchor, and with the usual matching threshold (ratio < 4) every box from ~2 px
# to ~670 px matches at least one anchor. The generic YOLOv5 defaults (10x13 .. 373x326) are tuned to
# COCO objects at 640x640: 3 of their 9 anchors are larger than any FRED drone and their aspect is taller
# than wide, which would waste most of the P5 capacity.
_DEFAULT_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((8.0, 6.0), (12.0, 9.0), (18.0, 12.0)),  # P3, stride 8
    ((26.0, 18.0), (38.0, 26.0), (56.0, 38.0)),  # P4, stride 16
    ((80.0, 54.0), (116.0, 78.0), (168.0, 112.0)),  # P5, stride 32
)


def default_anchors() -> torch.Tensor:
    """Return the default anchors, float32 ``(3, 3, 2)`` in input pixels (rows P3, P4, P5)."""
    return torch.tensor(_DEFAULT_ANCHORS, dtype=torch.float32)


def _as_wh(wh: np.ndarray, name: str = "wh") -> np.ndarray:
    """Validate an ``(N, 2)`` width/height array and return the boxes with both sides > 0 as float64."""
    arr = np.asarray(wh, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) (widths, heights), got {arr.shape}")
    keep = np.isfinite(arr).all(1) & (arr > 0).all(1)
    return arr[keep]


def _best_ratio(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Per box, the smallest over anchors of ``max(w/a, a/w, h/b, b/h)``; ``(N,)``."""
    r = wh[:, None, :] / anchors[None, :, :]
    metric = np.maximum(r, 1.0 / r).max(-1)
    return metric.min(1)


def anchor_recall(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> float:
    """Best possible recall: share of boxes whose best anchor ratio metric is below ``thr``.

    ``wh`` is ``(N, 2)`` box sizes in pixels; ``anchors`` any shape ending in 2 (``(9, 2)`` or
    ``(3, 3, 2)``). Boxes with a non-positive or non-finite side are ignored.
    """
    boxes = _as_wh(wh)
    anc = np.asarray(anchors, dtype=np.float64).reshape(-1, 2)
    if anc.shape[0] == 0 or not (anc > 0).all():
        raise ValueError(f"anchors must be positive widths/heights, got {anc.tolist()}")
    if boxes.shape[0] == 0:
        raise ValueError("anchor_recall needs at least one box with positive width and height")
    return float((_best_ratio(boxes, anc) < thr).mean())


def _fitness(wh: np.ndarray, anchors: np.ndarray, thr: float) -> float:
    """YOLOv5-style anchor fitness: mean best worst-side ratio, counting only ratios above ``1/thr``."""
    r = wh[:, None, :] / anchors[None, :, :]
    x = np.minimum(r, 1.0 / r).min(-1)  # worst side, in (0, 1]
    best = x.max(1)
    return float((best * (best > 1.0 / thr)).mean())


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(N, K)`` between points ``x`` and centres ``c``."""
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def _kmeans_log(x: np.ndarray, n: int, iters: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Lloyd k-means with k-means++ seeding; returns (centres, inertia)."""
    first = rng.integers(len(x))
    centres = [x[first]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, n):
        total = d2.sum()
        idx = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = np.stack(centres)
    labels = np.full(len(x), -1)
    for _ in range(iters):
        dist = _sq_dist(x, c)
        new = dist.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for k in range(n):
            members = x[labels == k]
            if len(members):
                c[k] = members.mean(0)
            else:  # empty cluster: move it to the point farthest from its centre
                far = dist[np.arange(len(x)), labels].argmax()
                c[k] = x[far]
    dist = _sq_dist(x, c)
    return c, float(dist.min(1).sum())


def kmeans_anchors(
    wh: np.ndarray,
    n: int = 9,
    thr: float = 4.0,
    iters: int = 300,
    seed: int = 0,
    *,
    restarts: int = 3,
    evolve: int = 0,
) -> tuple[np.ndarray, float]:
    """Fit ``n`` anchors to box sizes with k-means; return ``(anchors (n, 2) by area, best possible recall)``.

    ``wh`` is ``(N, 2)`` box widths/heights in pixels at training size. Clustering runs on log sizes
    (so the distance follows the size ratio used for anchor matching) over boxes with both sides
    >= 2 px, with ``restarts`` seeded k-means++ runs (the lowest inertia wins). ``evolve > 0`` then
    refines the anchors for that many generations of seeded random mutation, keeping a mutation only
    when the YOLOv5-style ratio fitness improves. Recall is computed on all boxes with positive sides.
    Deterministic for a given ``seed``. With fewer than ``n`` usable boxes and ``n == 9`` it warns and
    falls back to :func:`default_anchors`; otherwise that case raises ``ValueError``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if thr <= 1.0:
        raise ValueError(f"thr must be > 1, got {thr}")
    boxes = _as_wh(wh)
    if boxes.shape[0] == 0:
        raise ValueError("kmeans_anchors needs boxes with positive width and height, got none")
    fit_boxes = boxes[(boxes >= 2.0).all(1)]
    if len(fit_boxes) < n or len(np.unique(fit_boxes, axis=0)) < n:
        if n != 9:
            raise ValueError(
                f"kmeans_anchors needs at least {n} distinct boxes >= 2 px, got {len(fit_boxes)}"
            )
        anchors = default_anchors().numpy().reshape(-1, 2)
        warnings.warn(
            f"only {len(fit_boxes)} boxes >= 2 px: too few to fit {n} anchors, using the default anchors",
            stacklevel=2,
        )
        return anchors, anchor_recall(boxes, anchors, thr)

    rng = np.random.default_rng(seed)
    x = np.log(fit_boxes)
    best_c, best_inertia = None, np.inf
    for _ in range(max(1, restarts)):
        c, inertia = _kmeans_log(x, n, iters, rng)
        if inertia < best_inertia:
            best_c, best_inertia = c, inertia
    anchors = np.exp(best_c)

    if evolve > 0:
        fit = _fitness(fit_boxes, anchors, thr)
        for _ in range(evolve):
            factor = np.ones_like(anchors)
            while (factor == 1).all():
                mutate = rng.random(anchors.shape) < 0.9
                factor = np.clip(1.0 + mutate * rng.standard_normal(anchors.shape) * 0.1, 0.3, 3.0)
            cand = np.maximum(anchors * factor, 2.0)
            cand_fit = _fitness(fit_boxes, cand, thr)
            if cand_fit > fit:
                anchors, fit = cand, cand_fit

    anchors = anchors[np.argsort(anchors.prod(1), kind="stable")].astype(np.float32)
    return anchors, anchor_recall(boxes, anchors, thr)
