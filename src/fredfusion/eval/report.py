"""Breakdowns of an evaluation and the files of ``fredfusion eval``: JSON, PR curve, error gallery, tables.

Breakdown choices:

- per sequence / per pair status: COCO AP50 on the images of that group.
- per drone model: the images of every sequence in which that model appears (background frames
  included, so false alarms count); boxes of other models in those images are ignore regions
  (marked crowd: a detection on them is neither TP nor FP).
- by size: COCO small / medium / large AP50 (annotation area) from the overall precision array,
  and FRED bins on the longer box side in original pixels (``<16``, ``16-32``, ``32-64``,
  ``>=64``, half-open) through COCO's area-range mechanism applied to ``max_side**2``.
- per condition (``data.conditions``: the synthetic scenarios' parts, FRED's canonical and
  challenging test lists): COCO AP50 and AP50:95 on the images of that condition; an image counts
  under each condition of its sequence. Empty when the images carry no ``conditions`` (a folder
  prepared before they were recorded).

AP values are -1 where COCO leaves them undefined (no gt box in the group), except per condition,
where they are None (metrics.json ``conditions``, read by other tools). ``gt_boxes`` counts
non-crowd boxes.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fredfusion.data.conditions import sort_conditions
from fredfusion.draw import save_png, tile_grid
from fredfusion.eval.coco_metrics import (
    COCO_AREA_RANGES,
    FRED_SIDE_RANGES,
    CocoEvaluator,
    coco_map,
    f1_optimal,
    match_detections,
    pr_curve,
)
from fredfusion.eval.evaluator import EvalResult
from fredfusion.eval.plots import error_tile, plot_pr_curve
from fredfusion.files import write_json_atomic
from fredfusion.spec import FRAME_KINDS

__all__ = ["breakdowns", "compare_table", "format_table", "write_report"]

_WORST = 10
_GALLERY_MAX_FP = 20  # false positives drawn per gallery image (highest scores)


def _group_key(value: Any) -> str:
    return "unknown" if value is None else str(value)


def _sort_keys(keys: Sequence[str]) -> list[str]:
    def key(k: str) -> tuple[int, float, str]:
        try:
            return (0, float(k), k)
        except ValueError:
            return (1, 0.0, k)

    return sorted(keys, key=key)


@dataclass
class _Selection:
    """The evaluated images and their annotations, with the counts every group reports."""

    ev: CocoEvaluator
    img_ids: list[int]
    anns: list[dict]  # the evaluator's copies, same order as gt["annotations"]
    models: list[Any]  # drone model of each annotation (None when unknown)
    sel_ann: list[int]  # indices of the annotations on the evaluated images
    boxes_of: dict[int, int]  # non-crowd boxes per image
    dets_of: dict[int, int]  # detections per image

    def counts(self, ids: Sequence[int]) -> dict[str, int]:
        """gt boxes, images and detections of the images ``ids``."""
        return {
            "gt_boxes": int(sum(self.boxes_of[i] for i in ids)),
            "images": len(ids),
            "detections": int(sum(self.dets_of[i] for i in ids)),
        }


def _select(gt: Mapping, detections: Sequence[Mapping], imgs: list[Mapping]) -> _Selection:
    ev = CocoEvaluator(gt, detections)
    img_ids = [int(img["id"]) for img in imgs]
    if len(set(img_ids)) != len(img_ids):
        raise ValueError("breakdowns: duplicate image ids in images")
    anns = ev.gt_annotations
    selected = set(img_ids)
    sel_ann = [k for k, a in enumerate(anns) if a["image_id"] in selected]
    boxes_of: dict[int, int] = defaultdict(int)
    for k in sel_ann:
        if not anns[k]["iscrowd"]:
            boxes_of[anns[k]["image_id"]] += 1
    dets_of: dict[int, int] = defaultdict(int)
    for d in detections:
        dets_of[int(d["image_id"])] += 1
    models = [orig.get("drone_model") for orig in gt["annotations"]]
    return _Selection(ev, img_ids, anns, models, sel_ann, boxes_of, dets_of)


def _per_drone_model(sel: _Selection, seq_of: dict[int, str], by_seq: dict[str, list[int]]) -> dict:
    """AP50 per drone model on the images of the sequences it flies in, other models' boxes ignored."""
    anns, models = sel.anns, sel.models
    per_model: dict[str, dict[str, Any]] = {}
    for name in sorted({str(models[k]) for k in sel.sel_ann if models[k] is not None}):
        seqs = {seq_of[anns[k]["image_id"]] for k in sel.sel_ann if str(models[k]) == name}
        ids = [i for s in seqs for i in by_seq[s]]
        id_set = set(ids)
        in_group = [k for k in sel.sel_ann if anns[k]["image_id"] in id_set]
        ignore = [k for k in in_group if models[k] is None or str(models[k]) != name]
        res = sel.ev.evaluate(ids, ignore_ann_index=ignore)
        per_model[name] = {
            "AP50": res.ap(0.5),
            "gt_boxes": sum(1 for k in in_group if str(models[k]) == name and not anns[k]["iscrowd"]),
            "images": len(ids),
            "sequences": len(seqs),
        }
    return per_model


def _by_size(sel: _Selection, overall_res: Any) -> dict:
    """AP50 by COCO area range and by FRED longer-side bins."""
    noncrowd = [sel.anns[k] for k in sel.sel_ann if not sel.anns[k]["iscrowd"]]
    coco_sizes = {
        label: {
            "AP50": overall_res.ap(0.5, label),
            "gt_boxes": sum(1 for a in noncrowd if lo <= a["area"] <= hi),
        }
        for label, (lo, hi) in COCO_AREA_RANGES.items()
    }
    side_res = sel.ev.evaluate(sel.img_ids, size="max_side")
    side_sizes = {
        label: {
            "AP50": side_res.ap(0.5, label),
            "gt_boxes": sum(1 for a in noncrowd if lo <= max(a["bbox"][2], a["bbox"][3]) < hi),
        }
        for label, (lo, hi) in FRED_SIDE_RANGES.items()
    }
    return {"coco_area": coco_sizes, "max_side_px": side_sizes}


def _defined(ap: float) -> float | None:
    """A COCO AP, None where COCO leaves it undefined (-1)."""
    return ap if ap >= 0 else None


def _per_condition(sel: _Selection, imgs: list[Mapping]) -> dict:
    """AP50 and AP50:95 on the images of each condition named by the images' ``conditions`` lists."""
    by_cond: dict[str, list[int]] = defaultdict(list)
    for img in imgs:
        names = img.get("conditions")
        if isinstance(names, list | tuple):
            for name in dict.fromkeys(str(n) for n in names):
                by_cond[name].append(int(img["id"]))
    out: dict[str, dict[str, Any]] = {}
    for name in sort_conditions(by_cond):
        ids = by_cond[name]
        res = sel.ev.evaluate(ids)
        out[name] = {
            "images": len(ids),
            "boxes": sel.counts(ids)["gt_boxes"],
            "AP50": _defined(res.ap(0.5)),
            "mAP50_95": _defined(res.ap(None)),
        }
    return out


def breakdowns(gt: Mapping, detections: Sequence[Mapping], images: Sequence[Mapping] | None = None) -> dict:
    """AP50 per sequence, drone model, box size, pair status and condition; the 10 worst sequences.

    ``images`` are the COCO image dicts evaluated (``sequence_id``, ``pair_status``, ``conditions``);
    default: all of ``gt["images"]``. Returns a JSON-ready dict (see the module notes for the choices made).
    """
    imgs = list(gt["images"]) if images is None else list(images)
    sel = _select(gt, detections, imgs)

    def group_stats(ids: list[int]) -> dict[str, Any]:
        return {"AP50": sel.ev.evaluate(ids).ap(0.5), **sel.counts(ids)}

    overall_res = sel.ev.evaluate(sel.img_ids)
    overall = {"mAP50": overall_res.ap(0.5), "mAP50_95": overall_res.ap(None), **sel.counts(sel.img_ids)}
    by_seq: dict[str, list[int]] = defaultdict(list)
    by_pair: dict[str, list[int]] = defaultdict(list)
    seq_of: dict[int, str] = {}
    for img in imgs:
        iid = int(img["id"])
        seq_of[iid] = _group_key(img.get("sequence_id"))
        by_seq[seq_of[iid]].append(iid)
        by_pair[_group_key(img.get("pair_status"))].append(iid)
    per_sequence = {s: group_stats(by_seq[s]) for s in _sort_keys(list(by_seq))}
    ranked = [(s, v) for s, v in per_sequence.items() if v["gt_boxes"] > 0 and v["AP50"] >= 0]
    ranked.sort(key=lambda sv: (sv[1]["AP50"], sv[0]))
    return {
        "overall": overall,
        "per_sequence": per_sequence,
        "per_drone_model": _per_drone_model(sel, seq_of, by_seq),
        "by_size": _by_size(sel, overall_res),
        "per_pair_status": {p: group_stats(by_pair[p]) for p in sorted(by_pair)},
        "conditions": _per_condition(sel, imgs),
        "worst_sequences": [{"sequence_id": s, **v} for s, v in ranked[:_WORST]],
        "notes": {
            "AP50": "COCO AP at IoU 0.5, max 100 detections per image; -1 where a group has no gt box",
            "conditions": "images of the sequences with that condition; AP None where it has no gt box",
            "per_drone_model": "images of the sequences where the model appears; other models' boxes ignored",
            "max_side_px": "longer box side in original pixels, bins [lo, hi)",
        },
    }


# ---------------------------------------------------------------------------------------------- files


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """Replace NaN / inf floats by None so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> Path:
    return write_json_atomic(path, _clean(obj), default=_json_default)


def _load_frames(dataset: Any, ids: list[int]) -> Any:
    """dataset.load with both modalities when the dataset can (missing frames read as zeros)."""
    try:
        params = inspect.signature(dataset.load).parameters
    except (TypeError, ValueError):
        params = {}
    if "modalities" in params:
        return dataset.load(ids, modalities=FRAME_KINDS)
    return dataset.load(ids)


def _gallery(dataset: Any, gt: Mapping, matches: Any, conf: float, count: int) -> np.ndarray | None:
    """Tiles of the images with the most false positives + missed drones at confidence ``conf``."""
    fp = ~matches.det_tp & ~matches.det_ignored & (matches.det_scores >= conf)
    miss = ~matches.gt_crowd & (matches.gt_match_score < conf)
    errors: dict[int, int] = defaultdict(int)
    for iid in matches.det_image_ids[fp]:
        errors[int(iid)] += 1
    for iid in matches.gt_image_ids[miss]:
        errors[int(iid)] += 1
    if not errors:
        return None
    seq_of = {int(img["id"]): img.get("sequence_id") for img in gt["images"]}
    ranked = sorted(errors, key=lambda i: (-errors[i], i))
    # most errors first, one image per sequence before a second one from the same sequence
    seen: dict[Any, int] = defaultdict(int)
    order = []
    for iid in ranked:
        order.append((seen[seq_of.get(iid)], len(order), iid))
        seen[seq_of.get(iid)] += 1
    pick = [iid for _, _, iid in sorted(order)[:count]]
    fb = _load_frames(dataset, pick)
    store_h, store_w = (int(v) for v in dataset.store_hw)
    orig_h, orig_w = (int(v) for v in dataset.orig_hw)
    scale = np.array([store_w / orig_w, store_h / orig_h] * 2)

    def xyxy(xywh: np.ndarray) -> np.ndarray:
        b = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
        return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1) * scale

    tiles = []
    for k, iid in enumerate(pick):
        g_sel = matches.gt_image_ids == iid
        d_sel = matches.det_image_ids == iid
        fp_rows = np.flatnonzero(d_sel & fp)[:_GALLERY_MAX_FP]  # detections are sorted by score
        tiles.append(
            error_tile(
                fb.rgb[k],
                fb.event[k],
                xyxy(matches.gt_boxes[g_sel & ~miss]),
                xyxy(matches.det_boxes[fp_rows]),
                xyxy(matches.gt_boxes[g_sel & miss]),
                title=f"img {iid} seq {seq_of.get(iid)} FP {int((d_sel & fp).sum())} "
                f"miss {int((g_sel & miss).sum())} conf>={conf:.3f}",
            )
        )
    return tile_grid(tiles, cols=1)


def write_report(
    out_dir: Path, result: EvalResult, breakdowns: dict, dataset: Any = None, gallery: int = 8
) -> dict[str, Path]:
    """Write detections.json, metrics.json, pr_curve.png and (with ``dataset``) gallery.png.

    metrics.json holds ``metrics``, ``f1_optimal``, ``conditions`` (``breakdowns["conditions"]``,
    ``{}`` without conditions: name -> images, boxes, AP50, mAP50_95 as fractions or None) and the
    other ``breakdowns``. The F1-optimal confidence (from detections matched at IoU 0.5) is marked
    on the PR curve, stored in metrics.json and used to pick the gallery's false positives and
    missed drones.
    Returns name -> path of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["detections"] = _write_json(out / "detections.json", result.detections)

    matches = match_detections(result.gt, result.detections, iou_thr=0.5)
    best = f1_optimal(matches)
    curve = pr_curve(matches)
    rest = {k: v for k, v in breakdowns.items() if k != "conditions"}
    saved = {"metrics": result.metrics, "f1_optimal": best, "conditions": breakdowns.get("conditions", {})}
    files["metrics"] = _write_json(out / "metrics.json", {**saved, "breakdowns": rest})

    coco = result.coco
    if coco is None and result.gt.get("images"):
        coco = coco_map(result.gt, result.detections)
    coco_curve = coco.pr_at(0.5) if coco is not None else None
    files["pr_curve"] = plot_pr_curve(
        out / "pr_curve.png",
        np.concatenate([[0.0], curve["recall"]]),
        np.concatenate([[1.0], curve["precision"]]),
        best=best,
        coco_curve=coco_curve,
        title=f"PR at IoU 0.5  (AP50 {result.metrics.get('mAP50') or 0:.3f}, {matches.num_gt} gt boxes)",
    )

    if dataset is not None and gallery > 0:
        picture = _gallery(dataset, result.gt, matches, best["conf"], gallery)
        if picture is not None:
            files["gallery"] = save_png(out / "gallery.png", picture)
    return files


# --------------------------------------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | np.floating):
        return "-" if not math.isfinite(value) else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A Markdown table; numbers right-aligned (floats with 2 decimals), None shown as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    for k, row in enumerate(cells):
        if len(row) != len(headers):
            raise ValueError(f"row {k} has {len(row)} cells, expected {len(headers)}")
    numeric = [
        all(isinstance(row[c], int | float | np.number) or row[c] is None for row in rows) and bool(rows)
        for c in range(len(headers))
    ]
    widths = [max([len(str(h))] + [len(r[c]) for r in cells]) for c, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = [("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)]
    sep = "|" + "|".join(rule) + "|"
    return "\n".join([line([str(h) for h in headers]), sep, *(line(r) for r in cells)])


def compare_table(results: Mapping[str, EvalResult]) -> str:
    """Several evaluations side by side: mAP50, mAP50:95, AR100, APs, APm (in %) and pairs/s."""

    def pct(value: Any) -> float | None:
        if value is None or value < 0:
            return None
        return 100.0 * float(value)

    rows = []
    for name, res in results.items():
        m = res.metrics
        pps = m.get("pairs_per_s")
        rows.append(
            [
                name,
                pct(m.get("mAP50")),
                pct(m.get("mAP50_95")),
                pct(m.get("AR100")),
                pct(m.get("APs")),
                pct(m.get("APm")),
                float(pps) if pps is not None else None,
            ]
        )
    return format_table(rows, ["model", "mAP50", "mAP50:95", "AR100", "APs", "APm", "pairs/s"])
