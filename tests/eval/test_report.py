"""Breakdowns, report files, tables and training curves."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from fredfusion.data.dataset import FrameBatch
from fredfusion.eval.coco_metrics import coco_map
from fredfusion.eval.evaluator import EvalResult, restrict_gt
from fredfusion.eval.plots import COLOR_FP, COLOR_GT, COLOR_MISS, plot_curves
from fredfusion.eval.report import breakdowns, compare_table, format_table, write_report


def _case() -> tuple[dict, list[dict]]:
    """Three sequences.

    seq 1 (images 1, 2; DJI Mini 2): both boxes found -> AP50 1.
    seq 2 (images 3, 4; Tello): one of two found (score 0.9) -> AP50 51/101.
    seq 3 (image 5; a Mini 2 box found at 0.8 and a Tello box found at 0.95; image 6 background
    with a false positive at 0.3).
    """
    images = [
        {"id": i, "width": 1280, "height": 720, "sequence_id": s, "pair_status": p}
        for i, s, p in [
            (1, 1, "dual"),
            (2, 1, "dual"),
            (3, 2, "dual"),
            (4, 2, "rgb_only"),
            (5, 3, "dual"),
            (6, 3, "dual"),
        ]
    ]
    boxes = [
        (1, [100.0, 100.0, 40.0, 30.0], "DJI Mini 2"),  # max side 40
        (2, [200.0, 100.0, 12.0, 10.0], "DJI Mini 2"),  # max side 12
        (3, [300.0, 300.0, 20.0, 14.0], "DJI Tello EDU"),  # max side 20
        (4, [400.0, 300.0, 100.0, 80.0], "DJI Tello EDU"),  # max side 100, missed
        (5, [500.0, 500.0, 50.0, 40.0], "DJI Mini 2"),  # max side 50
        (5, [700.0, 500.0, 30.0, 20.0], "DJI Tello EDU"),  # max side 30
    ]
    anns = [
        {
            "id": k + 1,
            "image_id": iid,
            "category_id": 1,
            "bbox": b,
            "area": b[2] * b[3],
            "iscrowd": 0,
            "track_id": 1,
            "drone_model": model,
        }
        for k, (iid, b, model) in enumerate(boxes)
    ]
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "drone"}]}
    scores = {1: 0.9, 2: 0.85, 3: 0.9, 5: 0.8}
    dets = [{"image_id": iid, "category_id": 1, "bbox": b, "score": scores[iid]} for iid, b, _ in boxes[:3]]
    dets.append({"image_id": 5, "category_id": 1, "bbox": boxes[4][1], "score": 0.8})
    dets.append({"image_id": 5, "category_id": 1, "bbox": boxes[5][1], "score": 0.95})
    dets.append({"image_id": 6, "category_id": 1, "bbox": [100.0, 100.0, 200.0, 100.0], "score": 0.3})
    return gt, dets


def test_breakdowns_values_and_consistency() -> None:
    gt, dets = _case()
    b = breakdowns(gt, dets, gt["images"])
    total = b["overall"]
    assert total["gt_boxes"] == 6 and total["images"] == 6 and total["detections"] == 6
    for group in ("per_sequence", "per_pair_status"):
        assert sum(v["gt_boxes"] for v in b[group].values()) == total["gt_boxes"]
        assert sum(v["images"] for v in b[group].values()) == total["images"]
    seq = b["per_sequence"]
    assert list(seq) == ["1", "2", "3"]
    assert seq["1"]["AP50"] == pytest.approx(1.0)
    assert seq["2"]["AP50"] == pytest.approx(51 / 101)
    assert seq["2"]["gt_boxes"] == 2 and seq["3"]["images"] == 2 and seq["3"]["detections"] == 3
    # seq 3: TP 0.95, TP 0.8, FP 0.3 -> precision 1 up to recall 1
    assert seq["3"]["AP50"] == pytest.approx(1.0)
    assert [w["sequence_id"] for w in b["worst_sequences"]] == ["2", "1", "3"]
    assert b["per_pair_status"]["rgb_only"] == {"AP50": 0.0, "gt_boxes": 1, "images": 1, "detections": 0}


def test_breakdowns_drone_model_ignores_other_models() -> None:
    gt, dets = _case()
    per_model = breakdowns(gt, dets)["per_drone_model"]
    assert set(per_model) == {"DJI Mini 2", "DJI Tello EDU"}
    mini = per_model["DJI Mini 2"]
    # sequences 1 and 3 (4 images incl. the background one); the Tello box in image 5 is ignored, so the
    # detection on it (0.95) is not a false positive: all three Mini 2 boxes rank above the FP (0.3).
    assert mini["gt_boxes"] == 3 and mini["images"] == 4 and mini["sequences"] == 2
    assert mini["AP50"] == pytest.approx(1.0)
    tello = per_model["DJI Tello EDU"]
    # sequences 2 and 3: Tello boxes 3 (0.9), 4 (missed), 5b (0.95); the Mini 2 detection (0.8)
    # is on an ignored box -> 2 of 3 found with precision 1 -> 67 of 101 recall points.
    assert tello["gt_boxes"] == 3 and tello["images"] == 4
    assert tello["AP50"] == pytest.approx(67 / 101)


def test_breakdowns_sizes() -> None:
    gt, dets = _case()
    sizes = breakdowns(gt, dets)["by_size"]
    side = sizes["max_side_px"]
    assert {k: v["gt_boxes"] for k, v in side.items()} == {"<16": 1, "16-32": 2, "32-64": 2, ">=64": 1}
    assert sum(v["gt_boxes"] for v in side.values()) == 6
    assert side["<16"]["AP50"] == pytest.approx(1.0)
    assert side[">=64"]["AP50"] == pytest.approx(0.0)  # the 100x80 box is missed
    coco = sizes["coco_area"]
    # areas 1200, 120, 280, 8000, 2000, 600 px²
    assert (
        coco["small"]["gt_boxes"] == 3 and coco["medium"]["gt_boxes"] == 3 and coco["large"]["gt_boxes"] == 0
    )
    assert coco["large"]["AP50"] == -1.0
    assert coco["medium"]["AP50"] == pytest.approx(coco_map(gt, dets).ap(0.5, "medium"))


def test_breakdowns_subset_of_images() -> None:
    gt, dets = _case()
    b = breakdowns(gt, dets, [img for img in gt["images"] if img["sequence_id"] == 2])
    assert list(b["per_sequence"]) == ["2"] and b["overall"]["gt_boxes"] == 2
    assert b["overall"]["mAP50"] == pytest.approx(51 / 101)


def _independent(gt: dict, dets: list[dict], ids: list[int]) -> tuple[float, float]:
    """AP50 and AP50:95 of a COCO run on only the images ``ids`` (their gt and detections)."""
    keep = set(ids)
    res = coco_map(restrict_gt(gt, keep), [d for d in dets if d["image_id"] in keep])
    return res.ap(0.5), res.ap(None)


def test_breakdowns_per_condition() -> None:
    gt, dets = _case()
    by_seq = {1: ["day"], 2: ["night", "small"], 3: ["day", "small", "day"]}
    for img in gt["images"]:
        img["conditions"] = by_seq[img["sequence_id"]] + (["background"] if img["id"] == 6 else [])
    dets.append({"image_id": 3, "category_id": 1, "bbox": [600.0, 600.0, 30.0, 30.0], "score": 0.95})
    cond = breakdowns(gt, dets)["conditions"]
    assert list(cond) == ["day", "night", "small", "background"]
    members = {"day": [1, 2, 5, 6], "night": [3, 4], "small": [3, 4, 5, 6], "background": [6]}
    for name, ids in members.items():
        n_boxes = sum(1 for a in gt["annotations"] if a["image_id"] in ids)
        assert (cond[name]["images"], cond[name]["boxes"]) == (len(ids), n_boxes), name
    for name in ("day", "night", "small"):
        ap50, ap = _independent(gt, dets, members[name])
        assert cond[name]["AP50"] == pytest.approx(ap50) and cond[name]["mAP50_95"] == pytest.approx(ap)
    assert cond["day"]["AP50"] == pytest.approx(1.0)  # the FP (0.3) ranks below all four boxes
    # night: an FP at 0.95 above the box found at 0.9, the other box missed: 1/2 at precision 1/2
    assert cond["night"]["AP50"] == pytest.approx(51 / 101 / 2)
    assert cond["background"] == {"images": 1, "boxes": 0, "AP50": None, "mAP50_95": None}
    # a subset of the images: the conditions of those images only
    sub = breakdowns(gt, dets, [img for img in gt["images"] if img["sequence_id"] == 1])["conditions"]
    assert list(sub) == ["day"] and sub["day"]["images"] == 2


def test_no_conditions_no_breakdown(tmp_path: Path) -> None:
    gt, dets = _case()  # images without "conditions": a folder prepared before they were recorded
    b = breakdowns(gt, dets)
    assert b["conditions"] == {}
    res = EvalResult(metrics={"mAP50": 0.5}, detections=dets, gt=gt)
    saved = json.loads(write_report(tmp_path, res, b)["metrics"].read_text())
    assert saved["conditions"] == {} and "conditions" not in saved["breakdowns"]
    assert json.loads(write_report(tmp_path, res, {})["metrics"].read_text())["conditions"] == {}


class TinyDataset:
    store_hw = (72, 128)
    orig_hw = (720, 1280)
    scale = 0.1

    def load(self, ids: list[int], modalities: tuple[str, ...] | None = None) -> FrameBatch:
        n = len(ids)
        frames = np.zeros((n, 72, 128, 3), dtype=np.uint8)
        ones = np.ones(n, dtype=bool)
        return FrameBatch(np.asarray(ids), frames, frames.copy(), [np.zeros((0, 4))] * n, ones, ones)


def _has_color(img_bgr: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(img_bgr.astype(int) - np.array(rgb[::-1])).sum(-1) <= 3).any())


def test_write_report_files(tmp_path: Path) -> None:
    gt, dets = _case()
    res = EvalResult(
        metrics={**coco_map(gt, dets).stats, "images": 6, "pairs_per_s": 10.0}, detections=dets, gt=gt
    )
    b = breakdowns(gt, dets)
    files = write_report(tmp_path / "rep", res, b, dataset=TinyDataset(), gallery=3)
    assert set(files) == {"detections", "metrics", "pr_curve", "gallery"}
    assert json.loads(files["detections"].read_text()) == dets
    saved = json.loads(files["metrics"].read_text())
    assert saved["metrics"]["mAP50"] == pytest.approx(res.metrics["mAP50"])
    assert saved["conditions"] == {} and "conditions" not in saved["breakdowns"]
    assert saved["breakdowns"]["per_sequence"]["2"]["gt_boxes"] == 2
    # F1-optimal: 5 TP above the FP (0.3) and one miss -> conf 0.8, P 1, R 5/6
    best = saved["f1_optimal"]
    assert best["conf"] == 0.8 and best["recall"] == pytest.approx(5 / 6) and best["precision"] == 1.0
    pr = cv2.imread(str(files["pr_curve"]))
    assert pr is not None and pr.shape[0] > 100 and pr.shape[1] > 100
    gallery = cv2.imread(str(files["gallery"]))
    # errors at conf 0.8: the missed box of image 4 only (the FP scores 0.3)
    assert gallery is not None and gallery.shape[1] == 2 * 128 + 4
    assert _has_color(gallery, COLOR_MISS) and not _has_color(gallery, COLOR_FP)
    assert not _has_color(gallery, COLOR_GT)

    no_gallery = write_report(tmp_path / "plain", res, b)
    assert set(no_gallery) == {"detections", "metrics", "pr_curve"}


def test_write_report_gallery_false_positive(tmp_path: Path) -> None:
    gt, dets = _case()
    dets[-1]["score"] = 0.99  # the background FP now tops the ranking: best F1 keeps it
    res = EvalResult(metrics={"mAP50": 0.5}, detections=dets, gt=gt)
    files = write_report(tmp_path, res, {}, dataset=TinyDataset(), gallery=2)
    gallery = cv2.imread(str(files["gallery"]))
    assert _has_color(gallery, COLOR_FP)


def test_gallery_prefers_distinct_sequences(tmp_path: Path) -> None:
    gt, dets = _case()
    for iid, x in ((5, 900.0), (5, 1000.0), (6, 900.0), (6, 1000.0)):  # two FPs each in images 5, 6 (seq 3)
        dets.append({"image_id": iid, "category_id": 1, "bbox": [x, 100.0, 100.0, 100.0], "score": 0.99})
    # best F1 at conf 0.8; errors: image 5: 2 FP, image 6: 2 FP, image 4 (seq 2): 1 miss.
    # Two tiles: image 5, then image 4 (another sequence) before image 6.
    res = EvalResult(metrics={}, detections=dets, gt=gt)
    files = write_report(tmp_path, res, {}, dataset=TinyDataset(), gallery=2)
    gallery = cv2.imread(str(files["gallery"]))
    assert gallery.shape[0] == 2 * (22 + 72) + 6
    assert _has_color(gallery, COLOR_FP) and _has_color(gallery, COLOR_MISS)


def test_tables() -> None:
    table = format_table([["a", 1.0, None], ["bb", 12.346, 7]], ["name", "x", "n"])
    assert table.splitlines() == [
        "| name |     x | n |",
        "|------|------:|--:|",
        "| a    |  1.00 | - |",
        "| bb   | 12.35 | 7 |",
    ]
    with pytest.raises(ValueError, match="row 0"):
        format_table([["a"]], ["x", "y"])
    results = {
        "rgb": EvalResult(
            metrics={
                "mAP50": 0.7623,
                "mAP50_95": 0.4,
                "AR100": 0.5,
                "APs": -1.0,
                "APm": 0.3,
                "pairs_per_s": 321.04,
            }
        ),
        "dual": EvalResult(
            metrics={
                "mAP50": 0.8768,
                "mAP50_95": 0.4925,
                "AR100": 0.6,
                "APs": 0.2,
                "APm": 0.35,
                "pairs_per_s": 250.0,
            }
        ),
    }
    lines = compare_table(results).splitlines()
    assert lines[0].split("|")[1:-1] == [
        " model ",
        " mAP50 ",
        " mAP50:95 ",
        " AR100 ",
        "   APs ",
        "   APm ",
        " pairs/s ",
    ]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "rgb",
        "76.23",
        "40.00",
        "50.00",
        "-",
        "30.00",
        "321.04",
    ]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == [
        "dual",
        "87.68",
        "49.25",
        "60.00",
        "20.00",
        "35.00",
        "250.00",
    ]


def test_plot_curves(tmp_path: Path) -> None:
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(
        "epoch,train_loss,box_loss,val_loss,mAP50,mAP50_95,lr\n1,2.0,1.0,,,,0.01\n2,1.5,0.8,1.7,0.3,0.1,0.009\n"
    )
    out = plot_curves(csv_path, tmp_path / "curves.png")
    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] > img.shape[0] > 100
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n1,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*epoch"):
        plot_curves(bad, tmp_path / "x.png")
    bad.write_text("epoch,train_loss\n1,2\nx,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3"):
        plot_curves(bad, tmp_path / "x.png")
    bad.write_text("epoch,train_loss\n")
    with pytest.raises(ValueError, match="no data rows"):
        plot_curves(bad, tmp_path / "x.png")


def test_conditions_of_a_prepared_sample(tiny_prepared: Path) -> None:
    """The synthetic scenarios reach the breakdown through prepare; each condition's AP equals a COCO
    run on only its images."""
    from fredfusion.data.coco import load_coco
    from fredfusion.data.synth import plan_scenarios

    ann_dir = tiny_prepared / "annotations"
    parts = [load_coco(ann_dir / f"instances_{s}.json") for s in ("train", "val", "test")]
    gt = {**parts[0], "images": [im for p in parts for im in p["images"]]}
    gt["annotations"] = [a for p in parts for a in p["annotations"]]
    rng = np.random.default_rng(0)
    dets = []  # every other box found, shifted by up to 3 px, plus a false positive per 4 images
    for k, a in enumerate(gt["annotations"]):
        if k % 2 == 0:
            box = [a["bbox"][0] + float(rng.uniform(-3, 3)), a["bbox"][1], *a["bbox"][2:]]
            dets.append({"image_id": a["image_id"], "category_id": 1, "bbox": box, "score": 0.5 + k % 7 / 20})
    for im in gt["images"][::4]:
        dets.append({"image_id": im["id"], "category_id": 1, "bbox": [5.0, 5.0, 20.0, 20.0], "score": 0.6})
    cond = breakdowns(gt, dets)["conditions"]
    scenario_parts = {c for scenario in plan_scenarios(5, seed=1) for c in scenario.split("+")}
    assert set(cond) == scenario_parts
    for name, row in cond.items():
        ids = [im["id"] for im in gt["images"] if name in im["conditions"]]
        assert row["images"] == len(ids) > 0
        assert row["boxes"] == sum(1 for a in gt["annotations"] if a["image_id"] in set(ids))
        ap50, ap = _independent(gt, dets, ids)
        assert row["AP50"] == pytest.approx(ap50, abs=1e-12)
        assert row["mAP50_95"] == pytest.approx(ap, abs=1e-12)
        assert 0 < row["AP50"] < 1
