"""COCO metrics through faster-coco-eval: equality with pycocotools, edge cases, matching and F1."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest

from fredfusion.eval.coco_metrics import (
    STAT_NAMES,
    CocoEvaluator,
    coco_map,
    f1_optimal,
    match_detections,
    pr_curve,
)

CATS = [{"id": 1, "name": "drone"}]


def _gt(images: list[int], anns: list[tuple[int, list[float]]], **extra: dict) -> dict:
    return {
        "images": [{"id": i, "width": 1280, "height": 720} for i in images],
        "annotations": [
            {
                "id": k + 1,
                "image_id": iid,
                "category_id": 1,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for k, (iid, box) in enumerate(anns)
        ],
        "categories": CATS,
        **extra,
    }


def _det(iid: int, box: list[float], score: float) -> dict:
    return {"image_id": iid, "category_id": 1, "bbox": box, "score": score}


def _random_case(seed: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    images = list(range(1, 11))
    anns, dets = [], []
    for iid in images[:-2]:  # the last two images have no gt
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(6, 140, 2)  # small, medium and a few large-ish boxes
            x, y = rng.uniform(0, 1280 - w), rng.uniform(0, 720 - h)
            anns.append((iid, [x, y, w, h]))
            if rng.random() < 0.75:  # otherwise a miss
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                box = [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]
                dets.append(_det(iid, box, float(rng.random())))
    for iid in images:  # false positives, also on images without gt
        for _ in range(int(rng.integers(0, 3))):
            w, h = rng.uniform(5, 90, 2)
            dets.append(_det(iid, [rng.uniform(0, 1150), rng.uniform(0, 620), w, h], float(rng.random())))
    gt = _gt(images, anns)
    gt["annotations"][3]["iscrowd"] = 1  # one crowd region as well
    return gt, dets


def _pycocotools(gt: dict, dets: list[dict]) -> object:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_pycocotools(seed: int) -> None:
    gt, dets = _random_case(seed)
    ref = _pycocotools(gt, dets)
    res = coco_map(gt, dets)
    assert 0 < res.stats["mAP50"] < 1  # non-trivial case
    assert list(res.stats)[:12] == list(STAT_NAMES)
    for name, value in zip(STAT_NAMES, ref.stats):
        assert res.stats[name] == pytest.approx(float(value), abs=1e-6), name
    np.testing.assert_allclose(res.precision, ref.eval["precision"], atol=1e-6)
    np.testing.assert_allclose(res.recall, ref.eval["recall"], atol=1e-6)


def test_inputs_not_modified_and_repeatable() -> None:
    gt, dets = _random_case(3)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    first = coco_map(gt, dets).stats
    assert gt == gt_before and dets == dets_before
    assert coco_map(gt, dets).stats == first


def test_perfect_detections_give_one() -> None:
    anns = [(1, [10.0, 20.0, 30.0, 15.0]), (1, [300.0, 200.0, 60.0, 40.0]), (2, [500.0, 100.0, 120.0, 110.0])]
    gt = _gt([1, 2, 3], anns)
    dets = [_det(iid, box, 0.9) for iid, box in anns]
    res = coco_map(gt, dets)
    for name in ("mAP50_95", "mAP50", "mAP75", "APs", "APm", "APl", "AR10", "AR100"):
        assert res.stats[name] == pytest.approx(1.0), name
    assert res.stats["AR1"] == pytest.approx(2 / 3)  # image 1 has two boxes


def test_annotation_id_zero_is_fine() -> None:
    gt = _gt([1], [(1, [10.0, 10.0, 20.0, 20.0])])
    gt["annotations"][0]["id"] = 0
    assert coco_map(gt, [_det(1, [10.0, 10.0, 20.0, 20.0], 0.5)]).stats["mAP50"] == pytest.approx(1.0)


def test_no_detections_and_no_gt() -> None:
    gt = _gt([1, 2], [(1, [10.0, 10.0, 20.0, 20.0])])
    res = coco_map(gt, [])
    assert res.stats["mAP50"] == 0.0 and res.stats["mAP50_95"] == 0.0 and res.stats["AR100"] == 0.0
    assert res.stats["APm"] == -1.0  # no medium gt box: undefined as in COCO
    empty = coco_map(_gt([1], []), [_det(1, [1.0, 1.0, 5.0, 5.0], 0.3)])
    assert empty.stats["mAP50"] == -1.0 and empty.stats["AR100"] == -1.0
    assert coco_map(_gt([], []), []).stats["mAP50"] == -1.0


def test_false_positive_on_background_image_halves_ap() -> None:
    # FP (0.95) on an image without gt ranks above the only TP (0.9): precision 0.5 at every recall.
    gt = _gt([1, 2], [(1, [100.0, 100.0, 40.0, 30.0])])
    dets = [_det(1, [100.0, 100.0, 40.0, 30.0], 0.9), _det(2, [10.0, 10.0, 40.0, 30.0], 0.95)]
    assert coco_map(gt, dets).stats["mAP50"] == pytest.approx(0.5)
    assert coco_map(gt, dets, image_ids=[1]).stats["mAP50"] == pytest.approx(1.0)


def test_image_subset_equals_restricted_inputs() -> None:
    gt, dets = _random_case(4)
    subset = [1, 2, 5, 9]
    sub_gt = dict(gt)
    sub_gt["images"] = [i for i in gt["images"] if i["id"] in subset]
    sub_gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in subset]
    sub_dets = [d for d in dets if d["image_id"] in subset]
    a = coco_map(gt, dets, image_ids=subset).stats
    b = coco_map(sub_gt, sub_dets).stats
    assert a == pytest.approx(b)
    assert a != pytest.approx(coco_map(gt, dets).stats)


def test_max_side_bins() -> None:
    # 20x5 box: COCO "small" by area (100 px²) and in the 16-32 bin by its longer side.
    gt = _gt([1], [(1, [100.0, 100.0, 20.0, 5.0]), (1, [300.0, 300.0, 70.0, 40.0])])
    dets = [_det(1, [100.0, 100.0, 20.0, 5.0], 0.8)]  # the 70x40 box is missed
    ev = CocoEvaluator(gt, dets)
    side = ev.evaluate(size="max_side")
    assert side.area_labels == ("all", "<16", "16-32", "32-64", ">=64")
    assert side.ap(0.5, "16-32") == pytest.approx(1.0)
    assert side.ap(0.5, ">=64") == pytest.approx(0.0)
    assert side.ap(0.5, "<16") == -1.0 and side.stats["AP_32-64"] == -1.0
    area = ev.evaluate()  # the default COCO ranges are unchanged by the side run
    assert area.stats["APs"] == pytest.approx(1.0) and area.stats["APm"] == pytest.approx(0.0)
    # bins are half-open: a 16 px side is in 16-32, not <16
    edge = coco_map(_gt([1], [(1, [0.0, 0.0, 16.0, 8.0])]), [], size="max_side")
    assert edge.ap(0.5, "<16") == -1.0 and edge.ap(0.5, "16-32") == 0.0


def test_ignore_annotations_are_not_false_positives() -> None:
    gt = _gt([1], [(1, [10.0, 10.0, 30.0, 30.0]), (1, [200.0, 200.0, 30.0, 30.0])])
    dets = [_det(1, [10.0, 10.0, 30.0, 30.0], 0.6), _det(1, [200.0, 200.0, 30.0, 30.0], 0.9)]
    # without the second gt box the detection on it is a false positive ranked first
    only_first = dict(gt, annotations=gt["annotations"][:1])
    assert CocoEvaluator(only_first, dets).evaluate().ap(0.5) == pytest.approx(0.5)
    # as an ignore region it counts neither way
    ev = CocoEvaluator(gt, dets)
    assert ev.evaluate(ignore_ann_index=[1]).ap(0.5) == pytest.approx(1.0)
    assert ev.gt_annotations[1]["iscrowd"] == 0  # restored after the run
    # a missed ignore region costs no recall: 51 of 101 recall points without ignoring
    ev = CocoEvaluator(gt, dets[:1])
    assert ev.evaluate().ap(0.5) == pytest.approx(51 / 101)
    assert ev.evaluate(ignore_ann_index=[1]).ap(0.5) == pytest.approx(1.0)


def test_bad_input_errors() -> None:
    gt = _gt([1], [(1, [10.0, 10.0, 20.0, 20.0])])
    with pytest.raises(ValueError, match="image_id 7"):
        coco_map(gt, [_det(7, [1.0, 1.0, 2.0, 2.0], 0.5)])
    with pytest.raises(ValueError, match=r"detection #0.*bbox"):
        coco_map(gt, [_det(1, [1.0, 2.0], 0.5)])
    with pytest.raises(ValueError, match="categories"):
        coco_map({"images": [], "annotations": []}, [])
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_map(gt, [], image_ids=[1, 99])
    bad = copy.deepcopy(gt)
    bad["annotations"][0]["image_id"] = 5
    with pytest.raises(ValueError, match="annotation #0 refers to image_id 5"):
        coco_map(bad, [])


def test_matching_and_f1_hand_computed() -> None:
    boxes = [[0.0, 0.0, 10.0, 10.0], [100.0, 0.0, 10.0, 10.0], [200.0, 0.0, 10.0, 10.0]]
    gt = _gt([1, 2], [(1, boxes[0]), (1, boxes[1]), (2, boxes[2])])
    dets = [
        _det(1, boxes[0], 0.9),  # TP
        _det(1, [500.0, 500.0, 10.0, 10.0], 0.8),  # FP
        _det(1, [101.0, 0.0, 10.0, 10.0], 0.7),  # TP (IoU 0.82)
        _det(1, [0.0, 0.0, 10.0, 10.0], 0.6),  # duplicate of a taken gt: FP
        _det(2, [203.0, 0.0, 10.0, 10.0], 0.5),  # TP (IoU 0.538)
        _det(2, [206.0, 0.0, 10.0, 10.0], 0.4),  # IoU 0.25 < 0.5: FP
    ]
    m = match_detections(gt, dets, iou_thr=0.5)
    assert m.det_scores.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert m.det_tp.tolist() == [True, False, True, False, True, False]
    assert m.gt_match_score.tolist() == [0.9, 0.7, 0.5]
    c = pr_curve(m)
    np.testing.assert_allclose(c["precision"], [1, 0.5, 2 / 3, 0.5, 0.6, 0.5])
    np.testing.assert_allclose(c["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    best = f1_optimal(m)
    assert best["conf"] == 0.5 and best["f1"] == pytest.approx(0.75)
    assert (best["precision"], best["recall"], best["tp"], best["fp"], best["fn"]) == (0.6, 1.0, 3, 2, 0)
    # at IoU 0.75 the third TP is lost
    assert match_detections(gt, dets, iou_thr=0.75).det_tp.tolist() == [
        True,
        False,
        True,
        False,
        False,
        False,
    ]


def test_matching_crowd_and_ties() -> None:
    gt = _gt([1], [(1, [0.0, 0.0, 100.0, 100.0]), (1, [300.0, 300.0, 10.0, 10.0])])
    gt["annotations"][0]["iscrowd"] = 1
    dets = [_det(1, [10.0, 10.0, 20.0, 20.0], 0.9), _det(1, [300.0, 300.0, 10.0, 10.0], 0.9)]
    m = match_detections(gt, dets)
    assert m.num_gt == 1
    assert m.det_ignored.tolist() == [True, False] and m.det_tp.tolist() == [False, True]
    best = f1_optimal(m)
    assert best["f1"] == pytest.approx(1.0) and best["conf"] == 0.9
    none = f1_optimal(match_detections(gt, []))
    assert none["f1"] == 0.0 and none["fn"] == 1 and none["conf"] == 1.0
    # no true positive: the threshold keeps only the most confident detection(s)
    misses = [_det(1, [600.0, 600.0, 10.0, 10.0], s) for s in (0.2, 0.7, 0.7, 0.4)]
    worst = f1_optimal(match_detections(gt, misses))
    assert (worst["conf"], worst["f1"], worst["fp"], worst["fn"]) == (0.7, 0.0, 2, 1)
