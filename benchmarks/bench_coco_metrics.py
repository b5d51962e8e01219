"""Time of the COCO metrics (faster-coco-eval through `fredfusion.eval.coco_metrics`) on a large split.

Builds a FRED-like split in memory: ``--images`` 1280x720 images, one drone on ``--gt-share`` of
them (small boxes, 6-120 px), and ``--dets`` detections per image (one near each drone with a
high score, the rest scattered false positives with low scores, as an evaluation at conf 0.001
leaves them). Times indexing (gt + detections) and evaluate + accumulate separately, prints
mAP50 / mAP50:95 and writes nothing.

    python benchmarks/bench_coco_metrics.py --images 100000          # the speed target: < 20 s
    python benchmarks/bench_coco_metrics.py --images 10000 --pycocotools   # reference side by side
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time

import numpy as np

from fredfusion.eval.coco_metrics import CocoEvaluator


def make_split(images: int, dets: int, gt_share: float, seed: int) -> tuple[dict, list[dict]]:
    """A COCO gt dict and a detection list of the described shape."""
    rng = np.random.default_rng(seed)
    has_gt = rng.random(images) < gt_share
    wh = rng.uniform(6, 120, (images, 2))
    xy = rng.uniform(0, 1, (images, 2)) * (np.array([1280, 720]) - wh)
    anns = [
        {"id": k + 1, "image_id": int(i) + 1, "category_id": 1, "bbox": [*xy[i], *wh[i]],
         "area": float(wh[i, 0] * wh[i, 1]), "iscrowd": 0}
        for k, i in enumerate(np.flatnonzero(has_gt))
    ]  # fmt: skip
    out = []
    jitter = rng.normal(0, 0.1, (images, 4)) * np.concatenate([wh, wh], 1)
    fp_wh = rng.uniform(5, 60, (images, max(dets - 1, 0), 2))
    fp_xy = rng.uniform(0, 1, (images, max(dets - 1, 0), 2)) * (np.array([1280, 720]) - fp_wh)
    fp_score = rng.uniform(0.001, 0.4, (images, max(dets - 1, 0)))
    for i in range(images):
        iid = i + 1
        if has_gt[i] and dets > 0:
            box = [xy[i, 0] + jitter[i, 0], xy[i, 1] + jitter[i, 1],
                   max(1.0, wh[i, 0] + jitter[i, 2]), max(1.0, wh[i, 1] + jitter[i, 3])]  # fmt: skip
            out.append({"image_id": iid, "category_id": 1, "bbox": box, "score": float(rng.uniform(0.3, 1))})
        for j in range(dets - 1):
            out.append(
                {"image_id": iid, "category_id": 1, "bbox": [*fp_xy[i, j], *fp_wh[i, j]],
                 "score": float(fp_score[i, j])}
            )  # fmt: skip
    gt = {
        "images": [
            {"id": i + 1, "width": 1280, "height": 720, "file_name": f"{i}.jpg"} for i in range(images)
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "drone"}],
    }
    return gt, out


def _pycocotools(gt: dict, dets: list[dict]) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return time.perf_counter() - t0, float(ev.stats[1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--dets", type=int, default=10, help="detections per image")
    ap.add_argument("--gt-share", type=float, default=0.9, help="share of images with a drone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pycocotools", action="store_true", help="also time pycocotools on the same data")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    gt, dets = make_split(args.images, args.dets, args.gt_share, args.seed)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = CocoEvaluator(gt, dets)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = ev.evaluate().stats
    eval_s = time.perf_counter() - t0
    report = {
        "images": args.images,
        "gt_boxes": len(gt["annotations"]),
        "detections": len(dets),
        "index_s": round(index_s, 2),
        "evaluate_s": round(eval_s, 2),
        "total_s": round(index_s + eval_s, 2),
        "mAP50": round(stats["mAP50"], 4),
        "mAP50_95": round(stats["mAP50_95"], 4),
        "split_build_s": round(build_s, 2),
    }
    if args.pycocotools:
        ref_s, ref_map50 = _pycocotools(gt, dets)
        report.update(pycocotools_s=round(ref_s, 2), pycocotools_mAP50=round(ref_map50, 4))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
