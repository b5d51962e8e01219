"""Late fusion: the merge rule on a hand-worked case, fusion of a model with itself, and
``fredfusion eval --late-event`` (a report from an rgb and an event model; wrong pairs are one line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fredfusion.cli import main
from fredfusion.eval.coco_metrics import coco_map
from fredfusion.eval.evaluator import EvalResult
from fredfusion.eval.late_fusion import late_fusion, merge_detections


def _det(image: int, x: float, score: float, y: float = 0.0, size: float = 10.0, cat: int = 1) -> dict:
    return {"image_id": image, "category_id": cat, "bbox": [x, y, size, size], "score": score}


def test_merge_against_a_hand_worked_case() -> None:
    # image 1, all boxes 10x10 on one row; IoU of boxes shifted by d px: (10 - d) / (10 + d)
    a1, a2, a3 = _det(1, 0, 0.9), _det(1, 20, 0.5), _det(1, 2, 0.4)
    b1, b2, b3, b4 = _det(1, 1, 0.8), _det(1, 20, 0.7), _det(1, 50, 0.1, y=50, size=5), _det(1, 6, 0.95)
    other_class = _det(1, 1, 0.85, cat=2)
    only_b = _det(2, 3, 0.3)
    merged = merge_detections([a1, a2, a3, other_class], [b1, b2, b3, b4, only_b], iou=0.45)
    # b4 0.95 kept (IoU 0.25 with a1, 0.43 with a3: under 0.45)
    # a1 0.90 kept; other_class 0.85 kept (another category: never merged)
    # b1 0.80 dropped: IoU 9/11 = 0.82 with the kept a1 (of the other model)
    # b2 0.70 kept; a2 0.50 dropped: IoU 1 with the kept b2
    # a3 0.40 kept: it overlaps a1 (same model: its own NMS decided) and b1 (dropped: it suppresses nothing)
    # b3 0.10 kept: no overlap; image 2 keeps b's only detection
    assert merged == [b4, a1, other_class, b2, a3, b3, only_b]
    assert merge_detections([a1, a2, a3], [b1, b2, b3, b4], iou=0.45, max_det=2) == [b4, a1]
    # a lower threshold: b4 (IoU 0.25 with a1, 0.43 with a3) now drops both a1 and a3
    assert merge_detections([a1, a3], [b4], iou=0.2) == [b4]


def _random_detections(rng: np.random.Generator, images: int = 6) -> list[dict]:
    """Detections of one model: overlapping boxes of one model, tied scores, two categories."""
    dets = []
    for image in range(1, images + 1):
        for _ in range(int(rng.integers(0, 25))):
            x, y, w, h = rng.uniform(0, 60, 2).round(3).tolist() + rng.uniform(2, 20, 2).round(3).tolist()
            score = float(rng.choice([0.5, 0.25, round(float(rng.uniform(0.001, 1.0)), 5)]))
            dets.append(
                {
                    "image_id": image,
                    "category_id": int(rng.integers(1, 3)),
                    "bbox": [x, y, w, h],
                    "score": score,
                }
            )
    return dets


def _gt(images: int = 6) -> dict:
    rng = np.random.default_rng(1)
    anns = []
    for image in range(1, images + 1):
        for _ in range(2):
            x, y = rng.uniform(0, 60, 2).round(1).tolist()
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image,
                    "category_id": 1,
                    "bbox": [x, y, 10.0, 8.0],
                    "area": 80.0,
                    "iscrowd": 0,
                }
            )
    images_ = [{"id": i, "width": 100, "height": 100} for i in range(1, images + 1)]
    return {
        "images": images_,
        "annotations": anns,
        "categories": [{"id": 1, "name": "drone"}, {"id": 2, "name": "x"}],
    }


def test_late_fusion_of_a_model_with_itself_is_the_model() -> None:
    gt = _gt()
    dets = _random_detections(np.random.default_rng(0))
    for k, ann in enumerate(gt["annotations"][::2]):  # half of the drones found, one a little off
        x, y, w, h = ann["bbox"]
        dets.append(
            {"image_id": ann["image_id"], "category_id": 1, "bbox": [x + k % 3, y, w, h], "score": 0.3}
        )
    by_image = sorted(dets, key=lambda d: d["image_id"])
    expected = []
    for image in dict.fromkeys(d["image_id"] for d in dets):
        expected += sorted((d for d in by_image if d["image_id"] == image), key=lambda d: -d["score"])
    assert merge_detections(dets, [dict(d) for d in dets]) == expected
    alone = EvalResult(metrics={"infer_s": 1.0}, detections=dets, gt=gt, coco=coco_map(gt, dets))
    fused = late_fusion(alone, alone)
    assert fused.metrics["mAP50"] > 0
    for key, value in alone.coco.stats.items():
        assert fused.metrics[key] == value, key


def test_late_fusion_needs_the_same_images() -> None:
    gt = _gt()
    fewer = {**gt, "images": gt["images"][:3]}
    with pytest.raises(ValueError, match="same images"):
        late_fusion(EvalResult({}, [], gt), EvalResult({}, [], fewer))
    with pytest.raises(ValueError, match="iou"):
        merge_detections([], [], iou=1.5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained rgb, event and dual checkpoints (YOLO-n)."""
    from fredfusion.engine.checkpoint import save_checkpoint
    from fredfusion.model import build_model
    from fredfusion.model.weights import model_meta

    root = tmp_path_factory.mktemp("late")
    paths = {}
    for modality in ("rgb", "event", "dual"):
        torch.manual_seed(0)
        model = build_model(modality, "n")
        paths[modality] = root / f"{modality}.pth"
        save_checkpoint(
            {"meta": model_meta(model), "model": model.state_dict(), "config": {}}, paths[modality]
        )
    return paths


@pytest.mark.usefixtures("one_thread")
def test_eval_late_event_writes_the_merged_report(
    checkpoints: dict[str, Path], tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "late"
    argv = ["eval", "--weights", str(checkpoints["rgb"]), "--late-event", str(checkpoints["event"])]
    argv += ["--data", str(tiny_prepared), "--imgsz", "128", "--conf", "0.005", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rgb alone: mAP50" in printed and "event alone: mAP50" in printed and "late fusion of" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["images"] == 16 and "conditions" in saved
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) > 0 and all(d["score"] >= 0.005 for d in detections)


@pytest.mark.parametrize(
    ("weights", "late", "named"),
    [
        ("rgb", "rgb", "--late-event"),  # two rgb models
        ("event", "event", "--weights"),
        ("dual", "event", "--weights"),
        ("rgb", "missing", "missing.pth"),
    ],
)
def test_eval_late_event_refuses_a_wrong_pair_in_one_line(
    checkpoints: dict[str, Path],
    tiny_prepared: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    weights: str,
    late: str,
    named: str,
) -> None:
    path = checkpoints.get(late, tmp_path / "missing.pth")
    argv = [
        "eval",
        "--weights",
        str(checkpoints[weights]),
        "--late-event",
        str(path),
        "--data",
        str(tiny_prepared),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fredfusion eval: error: ") and named in err[0]
