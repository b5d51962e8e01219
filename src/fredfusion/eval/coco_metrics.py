"""COCO box metrics through faster-coco-eval, plus IoU-0.5 matching for PR curves and F1.

The ground truth is a COCO dict (``images``, ``annotations``, ``categories``); detections are in
the COCO results format (``image_id``, ``category_id``, ``bbox`` xywh, ``score``). Neither input is
modified: the evaluator works on copies (annotation ids are renumbered 1..n internally because
faster-coco-eval treats id 0 as "unmatched").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COCO_AREA_RANGES",
    "FRED_SIDE_RANGES",
    "STAT_NAMES",
    "CocoEvaluator",
    "CocoResult",
    "Matches",
    "coco_map",
    "f1_optimal",
    "match_detections",
    "pr_curve",
]

#: The 12 standard COCO summary numbers, in pycocotools ``stats`` order.
STAT_NAMES: tuple[str, ...] = (
    "mAP50_95",
    "mAP50",
    "mAP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

#: COCO area ranges (px² of the annotation ``area``), bounds inclusive as in COCO.
COCO_AREA_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}

#: FRED size bins on the longer box side in original pixels, half-open ``[lo, hi)``.
FRED_SIDE_RANGES: dict[str, tuple[float, float]] = {
    "<16": (0.0, 16.0),
    "16-32": (16.0, 32.0),
    "32-64": (32.0, 64.0),
    ">=64": (64.0, math.inf),
}

_MAX_DETS = (1, 10, 100)
_QUIET = logging.getLogger("fredfusion.eval.coco").debug


@dataclass
class CocoResult:
    """Result of one COCO evaluation.

    ``precision`` is COCO's ``(T, R, K, A, M)`` array (IoU thresholds, 101 recall points,
    categories, area ranges, max-dets), ``recall`` is ``(T, K, A, M)``; -1 marks undefined cells.
    """

    stats: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    area_labels: tuple[str, ...]
    max_dets: tuple[int, ...]
    image_ids: list[int] = field(default_factory=list)

    def ap(self, iou: float | None = 0.5, area: str = "all", max_dets: int = 100) -> float:
        """Mean precision at one IoU threshold (``None``: mean over 0.50:0.95) for one area range.

        Returns -1.0 where COCO leaves it undefined (no ground truth in that range).
        """
        p = self._select(self.precision, iou, area, max_dets, recall=False)
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else -1.0

    def ar(self, iou: float | None = None, area: str = "all", max_dets: int = 100) -> float:
        """Mean recall (``None``: over IoU 0.50:0.95) for one area range; -1.0 where undefined."""
        r = self._select(self.recall, iou, area, max_dets, recall=True)
        valid = r[r > -1]
        return float(valid.mean()) if valid.size else -1.0

    def pr_at(self, iou: float = 0.5, area: str = "all", category: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """COCO's interpolated precision at the 101 recall points for one IoU (max-dets 100)."""
        t = self._iou_index(iou)
        a = self._area_index(area)
        return self.rec_thrs.copy(), self.precision[t, :, category, a, -1].copy()

    def _iou_index(self, iou: float) -> int:
        hits = np.flatnonzero(np.isclose(self.iou_thrs, iou))
        if hits.size == 0:
            raise ValueError(f"IoU threshold {iou} not evaluated (have {self.iou_thrs.tolist()})")
        return int(hits[0])

    def _area_index(self, area: str) -> int:
        if area not in self.area_labels:
            raise ValueError(f"area range {area!r} not evaluated (have {list(self.area_labels)})")
        return self.area_labels.index(area)

    def _select(
        self, arr: np.ndarray, iou: float | None, area: str, max_dets: int, recall: bool
    ) -> np.ndarray:
        a = self._area_index(area)
        if max_dets not in self.max_dets:
            raise ValueError(f"max_dets {max_dets} not evaluated (have {list(self.max_dets)})")
        m = self.max_dets.index(max_dets)
        arr = arr if iou is None else arr[self._iou_index(iou) : self._iou_index(iou) + 1]
        return arr[:, :, a, m] if recall else arr[:, :, :, a, m]


def _require_coco_dict(gt: Mapping) -> None:
    if not isinstance(gt, Mapping):
        raise TypeError(f"ground truth must be a COCO dict, got {type(gt).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise ValueError(f"ground truth COCO dict lacks key(s) {missing}")
    if not gt["categories"]:
        raise ValueError("ground truth COCO dict has no categories")


def _xywh(values: object, what: str) -> list[float]:
    try:
        x, y, w, h = values  # type: ignore[misc]
        box = [float(x), float(y), float(w), float(h)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: bbox must be 4 numbers [x, y, w, h], got {values!r}") from exc
    if not (
        math.isfinite(box[0]) and math.isfinite(box[1]) and math.isfinite(box[2]) and math.isfinite(box[3])
    ):
        raise ValueError(f"{what}: bbox must be 4 finite numbers, got {values!r}")
    return box


def _copy_gt(gt: Mapping) -> tuple[dict, list[dict]]:
    """Copy gt with fresh annotation ids 1..n; returns the copy and its annotation list."""
    _require_coco_dict(gt)
    image_ids: set[int] = set()
    images = []
    for i, img in enumerate(gt["images"]):
        try:
            iid = int(img["id"])
            w, h = int(img["width"]), int(img["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ground truth image #{i} needs integer id, width, height: {exc}") from exc
        if iid in image_ids:
            raise ValueError(f"ground truth has duplicate image id {iid}")
        image_ids.add(iid)
        images.append({"id": iid, "width": w, "height": h})
    anns = []
    for i, ann in enumerate(gt["annotations"]):
        what = f"ground truth annotation #{i}"
        try:
            iid = int(ann["image_id"])
            cid = int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{what} needs integer image_id and category_id: {exc}") from exc
        if iid not in image_ids:
            raise ValueError(f"{what} refers to image_id {iid}, which is not in the images list")
        box = _xywh(ann.get("bbox"), what)
        area = float(ann["area"]) if ann.get("area") is not None else box[2] * box[3]
        anns.append(
            {
                "id": i + 1,
                "image_id": iid,
                "category_id": cid,
                "bbox": box,
                "area": area,
                "iscrowd": int(ann.get("iscrowd", 0) or 0),
            }
        )
    cats = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in gt["categories"]]
    return {"images": images, "annotations": anns, "categories": cats}, anns


def _copy_detections(detections: Iterable[Mapping], image_ids: set[int]) -> list[dict]:
    out = []
    for i, det in enumerate(detections):
        what = f"detection #{i}"
        try:
            iid = int(det["image_id"])
            cid = int(det.get("category_id", 1))
            score = float(det["score"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{what} needs image_id, category_id and score: {exc}") from exc
        if iid not in image_ids:
            raise ValueError(f"{what} refers to image_id {iid}, which is not in the ground truth")
        box = _xywh(det.get("bbox"), what)
        out.append({"image_id": iid, "category_id": cid, "bbox": box, "score": score})
    return out


class CocoEvaluator:
    """Indexes gt and detections once; evaluates any image subset, area ranges or ignore set.

    Use one instance for many breakdowns (per sequence, per drone model ...) instead of
    re-indexing the whole split for each.
    """

    def __init__(self, gt: Mapping, detections: Iterable[Mapping]) -> None:
        from faster_coco_eval import COCO

        gt_copy, self._gt_anns = _copy_gt(gt)
        self.image_ids: list[int] = sorted(img["id"] for img in gt_copy["images"])
        self._image_set = set(self.image_ids)
        dets = _copy_detections(detections, self._image_set)
        self.num_detections = len(dets)
        self._coco_gt = COCO(gt_copy, print_function=_QUIET)
        self._coco_dt = self._coco_gt.loadRes(dets)
        self._dt_anns = list(self._coco_dt.anns.values())

    @property
    def gt_annotations(self) -> list[dict]:
        """The internal gt annotation copies (ids renumbered 1..n in input order)."""
        return self._gt_anns

    def evaluate(
        self,
        image_ids: Sequence[int] | None = None,
        area_ranges: Mapping[str, tuple[float, float]] | None = None,
        size: str = "area",
        ignore_ann_index: Iterable[int] | None = None,
    ) -> CocoResult:
        """Run COCO bbox evaluation.

        Args:
            image_ids: evaluate only these images (default: all gt images).
            area_ranges: label -> (lo, hi); default COCO small/medium/large.
            size: "area" (COCO: the annotation ``area`` in px², ranges in px², bounds inclusive)
                or "max_side" (longer box side in px, ranges in px, half-open ``[lo, hi)``).
            ignore_ann_index: indices (into the gt annotation list) to treat as ignore regions
                for this run (marked crowd: detections on them count neither TP nor FP).
        """
        from faster_coco_eval import COCOeval_faster

        if size not in ("area", "max_side"):
            raise ValueError(f"size must be 'area' or 'max_side', got {size!r}")
        if image_ids is None:
            ids = self.image_ids
        else:
            ids = sorted({int(i) for i in image_ids})
            unknown = [i for i in ids if i not in self._image_set]
            if unknown:
                raise ValueError(f"image_ids not in the ground truth: {unknown[:10]}")
        if area_ranges is None:
            area_ranges = COCO_AREA_RANGES if size == "area" else FRED_SIDE_RANGES
        if size == "area":
            ranges = {k: [float(lo), float(hi)] for k, (lo, hi) in area_ranges.items()}
        else:  # squared side; upper bound nudged down so the bins are half-open
            ranges = {
                k: [float(lo) ** 2, float(np.nextafter(float(hi) ** 2, 0.0))]
                for k, (lo, hi) in area_ranges.items()
            }
        labels = ("all", *ranges.keys())
        if not ids:
            return _empty_result(labels)

        saved_area: list[tuple[dict, float]] = []
        saved_crowd: list[tuple[dict, int]] = []
        try:
            if size == "max_side":
                for ann in (*self._gt_anns, *self._dt_anns):
                    saved_area.append((ann, ann["area"]))
                    ann["area"] = max(ann["bbox"][2], ann["bbox"][3]) ** 2
            for idx in ignore_ann_index or ():
                ann = self._gt_anns[int(idx)]
                saved_crowd.append((ann, ann["iscrowd"]))
                ann["iscrowd"] = 1
            ev = COCOeval_faster(
                self._coco_gt, self._coco_dt, iouType="bbox", ranges=ranges, print_function=_QUIET
            )
            ev.params.imgIds = ids
            ev.params.maxDets = list(_MAX_DETS)
            ev.evaluate()
            ev.accumulate()
        finally:
            for ann, area in saved_area:
                ann["area"] = area
            for ann, crowd in saved_crowd:
                ann["iscrowd"] = crowd
        res = CocoResult(
            stats={},
            precision=np.asarray(ev.eval["precision"], dtype=np.float64),
            recall=np.asarray(ev.eval["recall"], dtype=np.float64),
            scores=np.asarray(ev.eval["scores"], dtype=np.float64),
            iou_thrs=np.asarray(ev.params.iouThrs, dtype=np.float64),
            rec_thrs=np.asarray(ev.params.recThrs, dtype=np.float64),
            area_labels=tuple(ev.params.areaRngLbl),
            max_dets=tuple(int(m) for m in ev.params.maxDets),
            image_ids=ids,
        )
        res.stats = _summary(res)
        return res


def _empty_result(labels: tuple[str, ...]) -> CocoResult:
    t, r, a, m = 10, 101, len(labels), len(_MAX_DETS)
    res = CocoResult(
        stats={},
        precision=-np.ones((t, r, 1, a, m)),
        recall=-np.ones((t, 1, a, m)),
        scores=-np.ones((t, r, 1, a, m)),
        iou_thrs=np.linspace(0.5, 0.95, t),
        rec_thrs=np.linspace(0.0, 1.0, r),
        area_labels=labels,
        max_dets=_MAX_DETS,
    )
    res.stats = _summary(res)
    return res


def _summary(res: CocoResult) -> dict[str, float]:
    """The COCO summary numbers; standard names when the ranges are COCO's, else AP_<label>."""
    stats = {
        "mAP50_95": res.ap(None),
        "mAP50": res.ap(0.5),
        "mAP75": res.ap(0.75),
    }
    extra = res.area_labels[1:]
    standard = extra == ("small", "medium", "large")
    for lbl in extra:
        stats[f"AP{lbl[0]}" if standard else f"AP_{lbl}"] = res.ap(None, lbl)
    for m in res.max_dets:
        stats[f"AR{m}"] = res.ar(None, "all", m)
    for lbl in extra:
        stats[f"AR{lbl[0]}" if standard else f"AR_{lbl}"] = res.ar(None, lbl)
    return stats


def coco_map(
    gt: Mapping,
    detections: Iterable[Mapping],
    image_ids: Sequence[int] | None = None,
    *,
    area_ranges: Mapping[str, tuple[float, float]] | None = None,
    size: str = "area",
) -> CocoResult:
    """COCO bbox metrics of ``detections`` against ``gt`` (optionally on a subset of images).

    ``result.stats`` holds mAP50_95, mAP50, mAP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    (floats in [0, 1], -1 where COCO leaves them undefined); ``result.precision`` is the
    ``(T, R, K, A, M)`` precision array. Detections of images outside ``image_ids`` are ignored;
    a detection of an image that is not in ``gt`` is an error.
    """
    return CocoEvaluator(gt, detections).evaluate(image_ids, area_ranges=area_ranges, size=size)


# --------------------------------------------------------------------------------------------
# Matching at one IoU threshold (for PR curves, F1-optimal confidence, error galleries)


@dataclass
class Matches:
    """Greedy COCO-style matching of detections to gt at one IoU threshold.

    Detection arrays are sorted by score (descending); ``det_index`` points back into the
    detection list. ``det_tp``: matched a non-crowd gt; ``det_ignored``: matched only a crowd
    region (neither TP nor FP). ``gt_match_score``: score of the detection that took each gt
    (-inf when none); a gt counts as found at confidence c when its match score is >= c.
    """

    det_index: np.ndarray
    det_image_ids: np.ndarray
    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_tp: np.ndarray
    det_ignored: np.ndarray
    gt_image_ids: np.ndarray
    gt_boxes: np.ndarray
    gt_crowd: np.ndarray
    gt_match_score: np.ndarray
    iou_thr: float

    @property
    def num_gt(self) -> int:
        """Number of non-crowd gt boxes."""
        return int((~self.gt_crowd).sum())


def _iou_xywh(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU matrix (len(d), len(g)) of xywh boxes; crowd columns use intersection / det area."""
    dx2, dy2 = d[:, 0] + d[:, 2], d[:, 1] + d[:, 3]
    gx2, gy2 = g[:, 0] + g[:, 2], g[:, 1] + g[:, 3]
    iw = np.clip(np.minimum(dx2[:, None], gx2[None]) - np.maximum(d[:, None, 0], g[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(dy2[:, None], gy2[None]) - np.maximum(d[:, None, 1], g[None, :, 1]), 0, None)
    inter = iw * ih
    da = (d[:, 2] * d[:, 3])[:, None]
    ga = (g[:, 2] * g[:, 3])[None]
    union = np.where(crowd[None], da, da + ga - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_detections(
    gt: Mapping,
    detections: Sequence[Mapping],
    iou_thr: float = 0.5,
    image_ids: Iterable[int] | None = None,
) -> Matches:
    """Match detections to gt boxes per image, highest score first, like COCOeval at one IoU.

    Each detection takes the unmatched non-crowd gt of highest IoU >= ``iou_thr``; failing that,
    a crowd gt with IoU >= ``iou_thr`` makes it ignored; otherwise it is a false positive.
    Unlike COCOeval there is no per-image cap of 100 detections.
    """
    _require_coco_dict(gt)
    keep = {int(i["id"]) for i in gt["images"]} if image_ids is None else {int(i) for i in image_ids}
    g_img, g_box, g_crowd = [], [], []
    for i, ann in enumerate(gt["annotations"]):
        iid = int(ann["image_id"])
        if iid in keep:
            g_img.append(iid)
            g_box.append(_xywh(ann.get("bbox"), f"ground truth annotation #{i}"))
            g_crowd.append(bool(ann.get("iscrowd", 0)))
    d_idx, d_img, d_box, d_score = [], [], [], []
    for i, det in enumerate(detections):
        iid = int(det["image_id"])
        if iid in keep:
            d_idx.append(i)
            d_img.append(iid)
            d_box.append(_xywh(det.get("bbox"), f"detection #{i}"))
            d_score.append(float(det["score"]))
    gi = np.asarray(g_img, dtype=np.int64)
    gb = np.asarray(g_box, dtype=np.float64).reshape(-1, 4)
    gc = np.asarray(g_crowd, dtype=bool)
    di = np.asarray(d_idx, dtype=np.int64)
    dimg = np.asarray(d_img, dtype=np.int64)
    db = np.asarray(d_box, dtype=np.float64).reshape(-1, 4)
    ds = np.asarray(d_score, dtype=np.float64)

    order = np.argsort(-ds, kind="stable")
    di, dimg, db, ds = di[order], dimg[order], db[order], ds[order]
    tp = np.zeros(len(ds), dtype=bool)
    ignored = np.zeros(len(ds), dtype=bool)
    gt_score = np.full(len(gi), -np.inf)

    if len(ds) and len(gi):
        g_order = np.argsort(gi, kind="stable")
        g_uniq, g_start = np.unique(gi[g_order], return_index=True)
        g_end = np.append(g_start[1:], len(g_order))
        g_slices = {int(u): g_order[s:e] for u, s, e in zip(g_uniq, g_start, g_end)}
        d_order = np.argsort(dimg, kind="stable")  # stable: score order kept inside each image
        d_uniq, d_start = np.unique(dimg[d_order], return_index=True)
        d_end = np.append(d_start[1:], len(d_order))
        for u, s, e in zip(d_uniq, d_start, d_end):
            g_sel = g_slices.get(int(u))
            if g_sel is None:
                continue
            d_sel = d_order[s:e]
            iou = _iou_xywh(db[d_sel], gb[g_sel], gc[g_sel])
            crowd = gc[g_sel]
            taken = np.zeros(len(g_sel), dtype=bool)
            for row in np.flatnonzero((iou >= iou_thr).any(axis=1)):
                cand = np.where(~crowd & ~taken, iou[row], -1.0)
                j = int(np.argmax(cand))
                if cand[j] >= iou_thr:
                    taken[j] = True
                    tp[d_sel[row]] = True
                    gt_score[g_sel[j]] = ds[d_sel[row]]
                elif (iou[row][crowd] >= iou_thr).any():
                    ignored[d_sel[row]] = True
    return Matches(di, dimg, db, ds, tp, ignored, gi, gb, gc, gt_score, float(iou_thr))


def pr_curve(matches: Matches) -> dict[str, np.ndarray]:
    """Raw precision / recall / F1 at each detection's score (scores descending)."""
    counted = ~matches.det_ignored
    scores = matches.det_scores[counted]
    tp = np.cumsum(matches.det_tp[counted])
    fp = np.cumsum(~matches.det_tp[counted])
    n_gt = matches.num_gt
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_gt if n_gt else np.zeros(len(tp))
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    return {"scores": scores, "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp}


def f1_optimal(matches: Matches) -> dict[str, float]:
    """The confidence threshold with the best F1 (ties: the lowest such threshold).

    Returns conf, f1, precision, recall, tp, fp, fn. When no detection is a true positive (F1 0
    everywhere) conf is the highest score; with no detection or no gt, conf is 1.0 and f1 0.
    """
    c = pr_curve(matches)
    n_gt = matches.num_gt
    if len(c["scores"]) == 0 or n_gt == 0:
        fp = len(c["scores"])
        return {"conf": 1.0, "f1": 0.0, "precision": 0.0, "recall": 0.0, "tp": 0, "fp": fp, "fn": n_gt}
    # a threshold keeps every detection with score >= it: only the last of equal scores counts
    last = np.append(c["scores"][1:] != c["scores"][:-1], True)
    f1 = np.where(last, c["f1"], -1.0)
    best = int(np.flatnonzero(f1 == f1.max())[-1]) if f1.max() > 0 else int(np.flatnonzero(last)[0])
    tp, fp = int(c["tp"][best]), int(c["fp"][best])
    return {
        "conf": float(c["scores"][best]),
        "f1": float(c["f1"][best]),
        "precision": float(c["precision"][best]),
        "recall": float(c["recall"][best]),
        "tp": tp,
        "fp": fp,
        "fn": n_gt - tp,
    }
