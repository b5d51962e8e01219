"""Late fusion: the detections of two single-modality models on the same images merged into one set.

The merge rule (the baseline a dual model is compared with):

- per image and category, both models' detections (each already through that model's own NMS) are
  put together and visited best score first (ties: the first model's detections first, each model's
  in its own order);
- a detection is dropped when a kept detection *of the other model* overlaps it by IoU > ``iou``
  (the NMS threshold of evaluation, ``spec.NMS_IOU`` by default); overlaps within one model were
  already settled by its own NMS and are left as they are;
- at most ``max_det`` detections per image are kept, best first; scores and boxes are unchanged.

So a drone seen by both models counts once, with the better score, and a drone seen by one model
only keeps that model's detection and score (a "max" fusion; weighted box fusion would average the
boxes and halve the score of a drone one modality does not see, which is the case late fusion is
meant to cover). Late fusion of a model with itself gives back that model's detections exactly.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fredfusion.eval.coco_metrics import coco_map
from fredfusion.eval.evaluator import EvalResult
from fredfusion.spec import NMS_IOU

__all__ = ["late_fusion", "merge_detections"]


def _xyxy(dets: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``(n, 4)`` float64 corners of COCO ``bbox`` (x, y, w, h) entries."""
    b = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def _iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(n, 4)`` corner boxes (0 where the union is empty)."""
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _merge_group(dets: list[Mapping[str, Any]], source: np.ndarray, iou: float) -> list[int]:
    """Indices into ``dets`` (one image and category, ``source`` 0 / 1 per detection) kept by the
    rule in the module notes, best first."""
    scores = np.array([float(d["score"]) for d in dets])
    order = np.argsort(-scores, kind="stable")
    overlaps = _iou_matrix(_xyxy([dets[i] for i in order])) > iou
    src = source[order]
    # suppressed[j, m]: a kept detection of model m overlaps detection j
    suppressed = np.zeros((len(order), 2), dtype=bool)
    kept: list[int] = []
    for j in range(len(order)):
        if suppressed[j, 1 - src[j]]:
            continue
        kept.append(int(order[j]))
        suppressed[overlaps[j], src[j]] = True
    return kept


def merge_detections(
    first: Sequence[Mapping[str, Any]],
    second: Sequence[Mapping[str, Any]],
    iou: float = NMS_IOU,
    max_det: int = 300,
) -> list[dict[str, Any]]:
    """Two models' COCO-format detections (``image_id``, ``category_id``, ``bbox`` xywh, ``score``)
    merged by the rule in the module notes; returned grouped by image (in first-seen order), best
    first within an image, as copies of the input entries."""
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"iou must be within [0, 1], got {iou}")
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    groups: dict[tuple[int, int], list[tuple[int, int, Mapping[str, Any]]]] = defaultdict(list)
    images: dict[int, None] = {}
    for src, dets in enumerate((first, second)):
        for k, d in enumerate(dets):
            image = int(d["image_id"])
            images.setdefault(image, None)
            groups[(image, int(d["category_id"]))].append((src, k, d))
    by_image: dict[int, list[tuple[float, int, int, Mapping[str, Any]]]] = defaultdict(list)
    for (image, _cat), members in groups.items():
        source = np.array([m[0] for m in members], dtype=np.int64)
        for j in _merge_group([m[2] for m in members], source, iou):
            src, k, d = members[j]
            by_image[image].append((-float(d["score"]), src, k, d))
    merged: list[dict[str, Any]] = []
    for image in images:
        kept = sorted(by_image[image], key=lambda row: row[:3])  # best first; ties: first model, its order
        merged.extend(dict(row[3]) for row in kept[:max_det])
    return merged


def late_fusion(
    first: EvalResult, second: EvalResult, iou: float = NMS_IOU, max_det: int = 300
) -> EvalResult:
    """The evaluation of two models' merged detections (``merge_detections``) on the images both were
    evaluated on; ValueError when they were evaluated on different images.

    ``metrics`` holds the COCO numbers of the merged set, ``images``, and ``pairs_per_s`` / ``infer_s``
    of running both models (None when either is unknown).
    """
    ids_a = sorted(int(img["id"]) for img in first.gt.get("images", []))
    ids_b = sorted(int(img["id"]) for img in second.gt.get("images", []))
    if ids_a != ids_b:
        raise ValueError(
            f"late fusion needs both models evaluated on the same images ({len(ids_a)} vs {len(ids_b)})"
        )
    merged = merge_detections(first.detections, second.detections, iou=iou, max_det=max_det)
    infer = [r.metrics.get("infer_s") for r in (first, second)]
    infer_s = sum(infer) if all(v is not None for v in infer) else None  # type: ignore[arg-type]
    metrics: dict[str, Any] = {
        "images": len(ids_a),
        "pairs_per_s": len(ids_a) / infer_s if infer_s else None,
        "infer_s": infer_s,
        "wait_s": None,
        "val_loss": None,
    }
    t0 = time.perf_counter()
    result = coco_map(first.gt, merged) if ids_a else None
    metrics.update(result.stats if result is not None else {"mAP50_95": None, "mAP50": None})
    metrics["metrics_s"] = time.perf_counter() - t0
    return EvalResult(metrics=metrics, detections=merged, gt=first.gt, coco=result)
