"""Tests for COCO export, atomic writing and checked loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from fredfusion.data.coco import build_coco, load_coco, write_coco
from fredfusion.data.fred import FredError
from fredfusion.data.pairing import PairedImage


def image(image_id: int, status: str, boxes: list[list[float]], frame_index: int = 0) -> PairedImage:
    n = len(boxes)
    return PairedImage(
        sequence_id=7,
        frame_index=frame_index,
        time_s=0.0333331,
        pair_status=status,
        rgb_file_name=None if status == "event_only" else f"7/RGB/r{frame_index}.jpg",
        event_file_name=None if status == "rgb_only" else f"7/Event/Frames/e{frame_index}.png",
        time_diff_ms=1.25 if status == "dual" else None,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        track_ids=np.arange(1, n + 1, dtype=np.int64),
        drone_models=["DJI Mini 2"] * n,
        image_id=image_id,
    )


def sample_images() -> list[PairedImage]:
    return [
        image(10, "dual", [[490, 413, 539, 448], [0, 0, 10, 5]], 0),
        image(11, "rgb_only", [], 1),
        image(12, "event_only", [[100.5, 200.25, 120.5, 210.25]], 2),
    ]


def test_build_coco_entries() -> None:
    coco = build_coco(
        sample_images(), "train", {"fred_root": "/data/fred", "tolerance_ms": 33.0}, ann_id_start=5
    )
    assert coco["categories"] == [{"id": 1, "name": "drone"}]
    assert coco["info"] == {"fred_root": "/data/fred", "tolerance_ms": 33.0, "split": "train"}
    im0, im1, im2 = coco["images"]
    assert im0 == {
        "id": 10,
        "file_name": "7/RGB/r0.jpg",
        "width": 1280,
        "height": 720,
        "sequence_id": 7,
        "frame_index": 0,
        "time_s": 0.033333,
        "rgb_file_name": "7/RGB/r0.jpg",
        "event_file_name": "7/Event/Frames/e0.png",
        "time_diff_ms": 1.25,
        "pair_status": "dual",
    }
    assert im1["event_file_name"] is None and im1["time_diff_ms"] is None and im1["pair_status"] == "rgb_only"
    assert im2["file_name"] == "7/Event/Frames/e2.png" and im2["rgb_file_name"] is None
    a0, a1, a2 = coco["annotations"]
    assert a0 == {
        "id": 5,
        "image_id": 10,
        "bbox": [490.0, 413.0, 49.0, 35.0],
        "area": 1715.0,
        "iscrowd": 0,
        "category_id": 1,
        "track_id": 1,
        "drone_model": "DJI Mini 2",
    }
    assert a1["id"] == 6 and a1["bbox"] == [0.0, 0.0, 10.0, 5.0] and a1["track_id"] == 2
    assert a2["image_id"] == 12 and a2["bbox"] == [100.5, 200.25, 20.0, 10.0] and a2["area"] == 200.0


def test_build_coco_rejects_missing_or_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="no image id"):
        build_coco([image(-1, "dual", [])], "train", {})
    with pytest.raises(ValueError, match="duplicate image id 3"):
        build_coco([image(3, "dual", []), image(3, "dual", [])], "train", {})


def test_write_and_load_in_pycocotools(tmp_path: Path) -> None:
    path = tmp_path / "ann" / "instances_val.json"
    coco = build_coco(sample_images(), "val", {"fred_root": "/x"})
    write_coco(path, coco)
    assert [p.name for p in path.parent.iterdir()] == ["instances_val.json"]  # no temp file left
    assert load_coco(path) == json.loads(json.dumps(coco))
    api = COCO(str(path))
    assert len(api.getImgIds()) == 3 and len(api.getAnnIds()) == 3
    assert api.getAnnIds(imgIds=[10]) == [1, 2]
    assert api.loadCats(api.getCatIds()) == [{"id": 1, "name": "drone"}]


def test_write_coco_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "instances_train.json"
    write_coco(path, build_coco(sample_images(), "train", {}))
    write_coco(path, build_coco(sample_images()[:1], "train", {}))
    assert len(load_coco(path)["images"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances_train.json"]


def test_load_coco_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FredError, match="not found"):
        load_coco(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  1,\n')
    with pytest.raises(FredError, match=r"bad\.json:3: invalid JSON"):
        load_coco(bad)
    bad.write_text('{"images": [], "annotations": []}')
    with pytest.raises(FredError, match=r"bad\.json: not a COCO file .*categories"):
        load_coco(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(FredError, match="not a COCO file"):
        load_coco(bad)
    bad.write_text('{"images": [{"id": 1}], "annotations": [{"id": 1}], "categories": []}')
    with pytest.raises(FredError, match=r"annotations\[0\]"):
        load_coco(bad)
