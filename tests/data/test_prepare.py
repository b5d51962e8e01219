"""End-to-end test of the prepare pipeline on a tiny tree of real 64x36 images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from fredfusion.data.coco import load_coco
from fredfusion.data.fred import FredError
from fredfusion.data.prepare import detect_frame_size, gc_paused, prepare, store_size

W, H = 64, 36


def write_jpg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((H, W, 3), value, np.uint8))


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((H, W, 3), value, np.uint8))


def make_sequence(
    seq_dir: Path, rgb_ms: list[int], event_us: list[int], ann: str | None, bad_event: int | None = None
) -> None:
    sid = seq_dir.name
    for k, ms in enumerate(rgb_ms):
        write_jpg(seq_dir / "RGB" / f"Video_{sid}_10_00_{ms / 1000:09.6f}.jpg", 40 + k)
    for k, us in enumerate(event_us):
        path = seq_dir / "Event" / "Frames" / f"Video_{sid}_frame_{us}.png"
        if k == bad_event:
            path.write_bytes(b"this is not a png")
        else:
            write_png(path, 100 + k)
    if ann is not None:
        (seq_dir / "coordinates.txt").write_text(ann)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "fred"
    # seq 0: 34 ms RGB gaps, one extra event frame at the end; a clipped box and a malformed line
    make_sequence(
        root / "0",
        [0, 34, 68, 102],
        [33333, 66666, 99999, 133332, 166665],
        "0.033333: 10, 5, 20, 15, 1, DJI Mini 2\n"
        "0.099999: 60, 30, 70, 40, 1, DJI Mini 2\n"
        "0.166665: 1, 1, 5, 5, 2\n"
        "bad line\n",
    )
    # seq 1: no annotation file (background), event frame 1 is not an image
    make_sequence(root / "1", [0, 33, 66], [33333, 66666, 99999], None, bad_event=1)
    # seq 8 in the official layout, with an unrecognised file name
    make_sequence(root / "test" / "8", [0, 33], [33333, 66666], "0.066666: 30, 10, 40, 20, 4, DJI Mini 3\n")
    write_jpg(root / "test" / "8" / "RGB" / "notes.jpg", 0)
    return root


def test_prepare_end_to_end(tree: Path, tmp_path: Path) -> None:
    split_file = tmp_path / "split.txt"
    split_file.write_text("0 train\n1 val\n8 test\n")
    out = tmp_path / "out"
    lines: list[str] = []
    summary = prepare(tree, out, split=str(split_file), imgsz=32, progress=False, log=lines.append)

    # files written
    for name in ("train", "val", "test"):
        assert (out / "annotations" / f"instances_{name}.json").is_file()
    assert (out / "store" / "manifest.json").is_file()
    saved = json.loads((out / "prepare_summary.json").read_text())
    assert saved["splits"] == summary.splits and saved["overall"] == summary.overall

    # per-sequence rows
    rows = {r["sequence"]: r for r in summary.sequences}
    r0 = rows[0]
    assert (r0["split"], r0["rgb_frames"], r0["event_frames"], r0["pairs"]) == ("train", 4, 5, 4)
    assert (r0["unpaired_rgb"], r0["unpaired_event"]) == (0, 1)
    assert r0["dual_rate"] == pytest.approx(4 / 5)
    assert r0["avg_tdiff_ms"] == pytest.approx((0 + 0.667 + 1.334 + 2.001) / 4, abs=1e-6)
    assert r0["max_tdiff_ms"] == pytest.approx(2.001, abs=1e-6)
    assert (r0["boxes"], r0["clipped"], r0["malformed"]) == (3, 1, 1)
    assert rows[1]["pairs"] == 3 and rows[1]["boxes"] == 0 and rows[1]["excluded_bad"] == 1
    assert rows[8]["split"] == "test" and rows[8]["pairs"] == 2
    o = summary.overall
    assert (o["rgb_frames"], o["event_frames"], o["pairs"], o["unpaired_event"], o["boxes"]) == (
        9,
        10,
        9,
        1,
        4,
    )
    assert o["dual_rate"] == pytest.approx(9 / 10)

    # split totals: the bad frame's image is excluded from val
    assert summary.splits["train"]["images"] == 5 and summary.splits["train"]["boxes"] == 3
    assert summary.splits["train"]["dual_share"] == pytest.approx(4 / 5)
    assert summary.splits["val"]["images"] == 2 and summary.splits["val"]["boxes"] == 0
    assert summary.splits["test"]["images"] == 2 and summary.splits["test"]["boxes"] == 1
    assert [(i, Path(p).name) for i, p, _ in summary.bad_frames] == [(7, "Video_1_frame_66666.png")]

    # COCO files
    val = load_coco(out / "annotations" / "instances_val.json")
    assert [im["id"] for im in val["images"]] == [6, 8]
    train = COCO(str(out / "annotations" / "instances_train.json"))
    assert sorted(train.getImgIds()) == [1, 2, 3, 4, 5] and len(train.getAnnIds()) == 3
    img2 = train.loadImgs([3])[0]
    assert (img2["width"], img2["height"], img2["sequence_id"], img2["frame_index"]) == (W, H, 0, 2)
    assert img2["rgb_file_name"] == "0/RGB/Video_0_10_00_00.068000.jpg"
    assert img2["event_file_name"] == "0/Event/Frames/Video_0_frame_99999.png"
    ann = train.loadAnns(train.getAnnIds(imgIds=[3]))[0]
    assert ann["bbox"] == [60.0, 30.0, 4.0, 6.0] and ann["track_id"] == 1  # clipped to 64x36
    last = train.loadImgs([5])[0]
    assert last["pair_status"] == "event_only" and last["rgb_file_name"] is None
    assert last["file_name"] == "0/Event/Frames/Video_0_frame_166665.png"
    info = train.dataset["info"]
    assert info["fred_root"] == str(tree.absolute()) and info["split"] == "train"
    assert (info["tolerance_ms"], info["stride"], info["store_width"], info["store_height"]) == (
        33.0,
        1,
        32,
        18,
    )
    test = load_coco(out / "annotations" / "instances_test.json")
    assert test["images"][0]["rgb_file_name"].startswith("test/8/RGB/")
    ann_ids = [
        a["id"]
        for f in ("train", "val", "test")
        for a in load_coco(out / "annotations" / f"instances_{f}.json")["annotations"]
    ]
    assert len(set(ann_ids)) == len(ann_ids) == 4

    # problems and printed table
    text = "\n".join(lines)
    assert "no annotation file" in text and "notes.jpg" in text and "coordinates.txt:4: malformed" in text
    assert "bad frame, image 7 excluded" in text
    assert any(line.split()[:4] == ["all", "9", "10", "9"] for line in text.splitlines())  # overall row
    assert summary.store["built_shards"] == 3

    # a re-run on the unchanged tree reuses the store and gives the same result
    again = prepare(tree, out, split=str(split_file), imgsz=32, progress=False, log=lambda s: None)
    assert again.store["reused_shards"] == 3 and again.store["built_shards"] == 0
    assert again.splits == summary.splits and again.bad_frames == summary.bad_frames


def test_prepare_zipped_and_empty_roots(tmp_path: Path) -> None:
    root = tmp_path / "fred"
    (root / "train").mkdir(parents=True)
    with pytest.raises(FredError, match="no sequence folders"):
        prepare(root, tmp_path / "out", progress=False, log=lambda s: None)
    (root / "train" / "5.zip").write_bytes(b"PK")
    (root / "6.zip").write_bytes(b"PK")
    with pytest.raises(FredError, match=r"unzip these first: .*5\.zip, .*6\.zip"):
        prepare(root, tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_detect_frame_size_and_store_size(tree: Path) -> None:
    assert detect_frame_size([tree / "1", tree / "0"]) == (W, H)
    assert detect_frame_size([tree / "missing"]) is None
    assert store_size(640) == (640, 360) and store_size(32, (W, H)) == (32, 18)
    with pytest.raises(ValueError, match="imgsz"):
        store_size(0)


def test_gc_paused_restores_state() -> None:
    import gc

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as it was
    finally:
        gc.enable()
