"""PreparedDataset: filtering, boxes in store pixels, store read and decoding fallback."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.frames import BadFrameError
from fredfusion.data.store import FrameRecord, build_store

SRC_W, SRC_H = 128, 72
W, H = 64, 36
# image id -> (sequence id, has rgb, has event, time_diff_ms)
IMAGES = {
    1: (3, True, True, 2.0),
    2: (3, True, True, -4.0),
    3: (3, True, False, None),
    4: (5, True, True, 6.0),
    5: (5, False, True, None),
    6: (5, True, True, 0.0),
}
# image id -> COCO boxes [x, y, w, h] in source pixels
BOXES = {1: [[10, 20, 30, 40], [0, 0, 128, 72]], 3: [[2, 4, 6, 8]], 5: [[100, 50, 20, 10], [5, 5, 0, 4]]}


def make_prepared(root: Path, store: bool = True) -> Path:
    """Write a tiny FRED-like tree, a COCO train split and (optionally) its frame store."""
    fred = root / "fred"
    images: list[dict[str, Any]] = []
    records = []
    for iid, (seq, has_rgb, has_event, tdiff) in IMAGES.items():
        rgb_name = f"{seq}/RGB/f{iid}.jpg" if has_rgb else None
        event_name = f"{seq}/Event/Frames/f{iid}.png" if has_event else None
        rng = np.random.default_rng(iid)
        for name in (rgb_name, event_name):
            if name is not None:
                (fred / name).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(fred / name), rng.integers(0, 256, (SRC_H, SRC_W, 3), dtype=np.uint8))
        status = "dual" if has_rgb and has_event else ("rgb_only" if has_rgb else "event_only")
        images.append(
            {
                "id": iid,
                "file_name": rgb_name or event_name,
                "width": SRC_W,
                "height": SRC_H,
                "sequence_id": seq,
                "frame_index": iid,
                "time_s": iid / 30,
                "rgb_file_name": rgb_name,
                "event_file_name": event_name,
                "time_diff_ms": tdiff,
                "pair_status": status,
            }
        )
        records.append(
            FrameRecord(
                iid,
                seq,
                fred / rgb_name if rgb_name else None,
                fred / event_name if event_name else None,
                (SRC_W, SRC_H),
            )
        )
    annotations = [
        {
            "id": k,
            "image_id": iid,
            "bbox": b,
            "category_id": 1,
            "track_id": 1,
            "area": b[2] * b[3],
            "iscrowd": 0,
        }
        for k, (iid, b) in enumerate((i, b) for i, bs in BOXES.items() for b in bs)
    ]
    coco = {
        "info": {"fred_root": str(fred), "store_width": W, "store_height": H},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "drone"}],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco, indent=1))
    if store:
        build_store(root / "store", records, W, H, progress=False)
    return root


def _ref(path: Path) -> np.ndarray:
    img = cv2.resize(cv2.imread(str(path)), (W, H), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("modality", "pairs", "expected"),
    [
        ("dual", "required", [1, 2, 4, 6]),
        ("rgb", "required", [1, 2, 3, 4, 6]),
        ("event", "required", [1, 2, 4, 5, 6]),
        ("rgb", "dual", [1, 2, 4, 6]),
        ("event", "dual", [1, 2, 4, 6]),
        ("dual", "any", [1, 2, 3, 4, 5, 6]),
        ("rgb", "any", [1, 2, 3, 4, 5, 6]),
    ],
)
def test_filtering(tmp_path: Path, modality: str, pairs: str, expected: list[int]) -> None:
    ds = PreparedDataset(make_prepared(tmp_path, store=False), "train", modality=modality, pairs=pairs)
    assert ds.ids.tolist() == expected
    assert ds.ids.dtype == np.int64
    assert [img["id"] for img in ds.images] == expected
    assert len(ds) == len(expected)


def test_attributes_boxes_and_summary(tmp_path: Path) -> None:
    ds = PreparedDataset(make_prepared(tmp_path), "train", modality="rgb", pairs="any")
    assert ds.store_hw == (H, W) and ds.orig_hw == (SRC_H, SRC_W)
    assert ds.scale == pytest.approx(0.5)
    assert np.allclose(ds.boxes_for(1), [[5, 10, 20, 30], [0, 0, 64, 36]])
    assert np.allclose(ds.boxes_for(5), [[50, 25, 60, 30]])  # the zero-width box is dropped
    assert ds.boxes_for(2).shape == (0, 4) and ds.boxes_for(2).dtype == np.float32
    assert ds.sequence_of(5) == 5 and ds.sequence_of(1) == 3
    with pytest.raises(KeyError, match="image id 99 is not in split 'train'"):
        ds.boxes_for(99)
    assert ds.pairing_summary() == {
        "images": 6,
        "dual": 4,
        "dual_rate": pytest.approx(4 / 6),
        "avg_tdiff_ms": pytest.approx(3.0),
    }
    assert PreparedDataset(tmp_path, "train", max_images=2).ids.tolist() == [1, 6]
    assert PreparedDataset(tmp_path, "train", max_images=3).ids.tolist() == [1, 4, 6]


def test_load_from_store(tmp_path: Path) -> None:
    root = make_prepared(tmp_path)
    fred = root / "fred"
    ds = PreparedDataset(root, "train", modality="dual", pairs="any")
    batch = ds.load([5, 1, 3])
    assert batch.ids.tolist() == [5, 1, 3] and batch.ids.dtype == np.int64
    assert batch.rgb.shape == batch.event.shape == (3, H, W, 3)
    assert batch.has_rgb.tolist() == [False, True, True]
    assert batch.has_event.tolist() == [True, True, False]
    assert not batch.rgb[0].any() and not batch.event[2].any()
    assert np.array_equal(batch.rgb[1], _ref(fred / "3/RGB/f1.jpg"))
    assert np.array_equal(batch.event[0], _ref(fred / "5/Event/Frames/f5.png"))
    assert np.allclose(batch.boxes[0], [[50, 25, 60, 30]])
    assert np.allclose(batch.boxes[1], [[5, 10, 20, 30], [0, 0, 64, 36]])
    assert np.allclose(batch.boxes[2], [[1, 2, 4, 6]])
    rgb_only = PreparedDataset(root, "train", modality="rgb").load([3, 1])
    assert rgb_only.has_event.tolist() == [False, False] and not rgb_only.event.any()
    assert np.array_equal(rgb_only.rgb[1], batch.rgb[1])


def test_fallback_without_store_equals_store_read(tmp_path: Path) -> None:
    root = make_prepared(tmp_path)
    with_store = PreparedDataset(root, "train", pairs="any").load([6, 5, 1, 3])
    shutil.rmtree(root / "store")
    ds = PreparedDataset(root, "train", pairs="any")
    with pytest.warns(RuntimeWarning, match="decoding frames from"):
        decoded = ds.load([6, 5, 1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.load([2])  # warns once only
    assert np.array_equal(decoded.rgb, with_store.rgb)
    assert np.array_equal(decoded.event, with_store.event)
    bufs = {m: np.full((2, H, W, 3), 9, np.uint8) for m in ("rgb", "event")}
    into = ds.load([5, 1], out=bufs)
    assert into.rgb is bufs["rgb"] and np.array_equal(into.rgb, with_store.rgb[[1, 2]])
    assert decoded.has_rgb.tolist() == with_store.has_rgb.tolist()


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"instances_val\.json.*fredfusion prepare"):
        PreparedDataset(tmp_path, "val")
    with pytest.raises(ValueError, match="modality"):
        PreparedDataset(tmp_path, "val", modality="depth")
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "instances_test.json"
    bad.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(ValueError, match=r"instances_test\.json \(line 2"):
        PreparedDataset(tmp_path, "test")
    bad.write_text(json.dumps({"images": [{"id": 1, "width": 4, "height": 4}]}))
    with pytest.raises(ValueError, match="image entry 0 lacks 'sequence_id'"):
        PreparedDataset(tmp_path, "test")

    root = make_prepared(tmp_path / "p")
    (root / "store" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete frame store"):
        PreparedDataset(root, "train")
    root = make_prepared(tmp_path / "q")
    ds = PreparedDataset(root, "train")
    (root / "store" / "seq_5.rgb.u8").unlink()
    ds.load([1, 2])
    with pytest.raises(FileNotFoundError, match=r"seq_5\.rgb\.u8"):
        ds.load([4])


def test_skip_bad_images_from_a_damaged_store_and_on_the_decoding_path(tmp_path: Path) -> None:
    root = make_prepared(tmp_path)
    fred, shard = root / "fred", root / "store" / "seq_5.rgb.u8"
    with open(shard, "r+b") as f:  # sequence 5 (images 4, 5, 6) damaged after prepare
        f.truncate(0)
    ds = PreparedDataset(root, "train", pairs="any", skip_bad=True)
    expected = f"0 bytes, expected {3 * W * H * 3} (truncated or rewritten after prepare)"
    assert ds.damaged_images() == [
        (4, str(shard), expected),
        (5, str(shard), expected),
        (6, str(shard), expected),
    ]
    batch = ds.load([1, 5, 3])
    assert batch.bad.tolist() == [False, True, False]
    assert batch.problems == [(5, str(shard), expected)]
    assert not batch.rgb[1].any() and not batch.event[1].any()  # its intact event frame is dropped too
    assert batch.boxes[1].shape == (0, 4) and np.allclose(batch.boxes[2], [[1, 2, 4, 6]])
    assert batch.has_event.tolist() == [True, False, False]
    assert np.array_equal(batch.rgb[0], _ref(fred / "3/RGB/f1.jpg"))
    with pytest.raises(OSError, match=r"seq_5\.rgb\.u8: 0 bytes"):
        ds.load([5], skip_bad=False)
    assert not PreparedDataset(root, "train").load([1, 2]).bad.any()

    # decoding path: a deleted and a corrupt source frame
    shutil.rmtree(root / "store")
    (fred / "3/RGB/f1.jpg").unlink()
    (fred / "3/RGB/f2.jpg").write_bytes(b"not an image")
    ds = PreparedDataset(root, "train", pairs="any", skip_bad=True)
    with pytest.warns(RuntimeWarning, match="decoding frames from"):
        batch = ds.load([1, 4, 2])
    assert batch.bad.tolist() == [True, False, True]
    assert batch.problems == [
        (1, str(fred / "3/RGB/f1.jpg"), "missing file"),
        (2, str(fred / "3/RGB/f2.jpg"), "not an image (cannot decode)"),
    ]
    assert not batch.rgb[[0, 2]].any() and not batch.event[[0, 2]].any()
    assert batch.boxes[0].shape == (0, 4)
    assert np.array_equal(batch.rgb[1], _ref(fred / "5/RGB/f4.jpg"))
    assert np.array_equal(batch.event[1], _ref(fred / "5/Event/Frames/f4.png"))
    with pytest.raises(BadFrameError, match=r"f1\.jpg: missing file"):
        ds.load([1], skip_bad=False)
