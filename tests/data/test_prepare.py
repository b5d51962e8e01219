"""End-to-end test of the prepare pipeline on a tiny tree of real 64x36 images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from fredfusion.data import frames as frames_mod
from fredfusion.data import prepare as prepare_mod
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
        "bad line\n"
        "0.099999: 61, 30, 70, 40, 1, DJI Mini 2\n",  # track 1 again at 0.099999: dropped
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
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [out / "prepare_summary.json", *(out / "annotations").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path  # not mkstemp's 0600

    # per-sequence rows
    rows = {r["sequence"]: r for r in summary.sequences}
    r0 = rows[0]
    assert (r0["split"], r0["rgb_frames"], r0["event_frames"], r0["pairs"]) == ("train", 4, 5, 4)
    assert (r0["unpaired_rgb"], r0["unpaired_event"]) == (0, 1)
    assert r0["dual_rate"] == pytest.approx(4 / 5)
    assert r0["avg_tdiff_ms"] == pytest.approx((0 + 0.667 + 1.334 + 2.001) / 4, abs=1e-6)
    assert r0["max_tdiff_ms"] == pytest.approx(2.001, abs=1e-6)
    assert (r0["boxes"], r0["clipped"], r0["malformed"], r0["duplicates"]) == (3, 1, 1, 1)
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
    assert "coordinates.txt:5: repeats line 2 (same time 0.099999 and track id 1); dropped" in text
    assert summary.overall["duplicates"] == 1
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
    # one odd frame first in line does not decide the size of the tree
    odd = tree / "0" / "RGB" / "Video_0_09_00_00.000000.jpg"
    assert cv2.imwrite(str(odd), np.zeros((2 * H, 2 * W, 3), np.uint8))
    assert detect_frame_size([tree / "0", tree / "1"]) == (W, H)
    assert detect_frame_size([tree / "0"], samples=1) == (2 * W, 2 * H)
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


def _bad_frame_tree(root: Path) -> dict[str, tuple[str, str]]:
    """Sequence 0 with one bad frame of each kind; returns kind -> (file name, reason fragment)."""
    seq = root / "0"
    rgb_ms = [0, 33, 67, 100, 133, 167, 200, 233, 267, 300]
    event_us = [33333 * (k + 1) for k in range(len(rgb_ms))]
    make_sequence(seq, rgb_ms, event_us, "0.033333: 10, 5, 20, 15, 1, DJI Mini 2\n")
    make_sequence(root / "1", [0, 33, 67], [33333, 66666, 99999], "0.033333: 1, 1, 9, 9, 1\n")
    rgb = sorted((seq / "RGB").iterdir())
    event = sorted((seq / "Event" / "Frames").iterdir(), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    full_jpg, full_png = rgb[9].read_bytes(), event[9].read_bytes()
    rgb[1].write_bytes(b"")
    rgb[2].write_bytes(full_jpg[: len(full_jpg) // 2])
    event[3].write_bytes(full_png[: len(full_png) // 2])
    event[4].write_text("this is not an image\n")
    assert cv2.imwrite(str(rgb[5]), np.zeros((2 * H, 2 * W, 3), np.uint8))
    assert cv2.imwrite(str(event[6]), np.zeros((H, W, 3), np.uint16))
    return {
        "zero": (rgb[1].name, "zero-byte file"),
        "truncated_jpg": (rgb[2].name, "truncated JPEG"),
        "truncated_png": (event[3].name, "truncated PNG"),
        "not_image": (event[4].name, "not an image"),
        "wrong_size": (rgb[5].name, f"wrong size {2 * W}x{2 * H} (expected {W}x{H})"),
        "deep": (event[6].name, "unsupported pixel type uint16"),
        "channels": (rgb[7].name, "wrong channel count 2"),
        "deleted": (event[8].name, "missing file"),
    }


def test_prepare_reports_and_excludes_every_bad_frame_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "fred"
    bad = _bad_frame_tree(root)
    gray = root / "1" / "Event" / "Frames" / "Video_1_frame_33333.png"
    assert cv2.imwrite(str(gray), np.full((H, W), 9, np.uint8))  # grayscale: converted, not bad
    rgba = root / "1" / "Event" / "Frames" / "Video_1_frame_66666.png"
    assert cv2.imwrite(str(rgba), np.full((H, W, 4), 9, np.uint8))  # alpha dropped, not bad

    # a frame that decodes to 2 channels (no real JPEG/PNG does: OpenCV gives 1, 3 or 4)
    real_decode = cv2.imdecode
    two_channel = bad["channels"][0]

    def decode(buf: np.ndarray, flags: int) -> np.ndarray | None:
        img = real_decode(buf, flags)
        if img is not None and img.ndim == 3 and int(img[0, 0, 0]) == 40 + 7 and buf.size > 100:
            return img[:, :, :2]
        return img

    monkeypatch.setattr(frames_mod.cv2, "imdecode", decode)
    # a frame deleted after the scan, before the store build reads it
    real_build = prepare_mod.build_store

    def build_after_delete(*args, **kwargs):  # type: ignore[no-untyped-def]
        (root / "0" / "Event" / "Frames" / bad["deleted"][0]).unlink()
        return real_build(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "build_store", build_after_delete)
    split_file = tmp_path / "split.txt"
    split_file.write_text("0 train\n1 val\n")
    lines: list[str] = []
    out = tmp_path / "out"
    summary = prepare(root, out, split=str(split_file), imgsz=32, progress=False, log=lines.append)

    reported = {Path(p).name: (image_id, reason) for image_id, p, reason in summary.bad_frames}
    assert len(summary.bad_frames) == len(bad) == len(reported)
    for kind, (name, fragment) in bad.items():
        assert name in reported, kind
        assert fragment in reported[name][1], (kind, reported[name])
    assert two_channel in reported
    bad_ids = {image_id for image_id, _ in reported.values()}
    train = load_coco(out / "annotations" / "instances_train.json")
    kept_ids = {im["id"] for im in train["images"]}
    assert not bad_ids & kept_ids
    assert len(kept_ids) == 10 - len(bad)  # 10 pairs, less the bad ones
    assert all(a["image_id"] in kept_ids for a in train["annotations"])
    row = next(r for r in summary.sequences if r["sequence"] == 0)
    assert row["excluded_bad"] == len(bad) and summary.splits["train"]["excluded_bad"] == len(bad)
    assert summary.splits["val"]["images"] == 3  # gray and RGBA event frames are fine
    text = "\n".join(lines)
    for name, _ in bad.values():
        assert f"excluded: {root.absolute() / '0'}" in text and name in text
    saved = json.loads((out / "prepare_summary.json").read_text())
    assert {Path(b["path"]).name for b in saved["bad_frames"]} == set(reported)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_prepare_excludes_unreadable_frame(tmp_path: Path) -> None:
    root = tmp_path / "fred"
    make_sequence(root / "0", [0, 33, 67], [33333, 66666, 99999], "")
    frame = sorted((root / "0" / "RGB").iterdir())[1]
    frame.chmod(0)
    try:
        summary = prepare(root, tmp_path / "out", imgsz=32, progress=False, log=lambda _m: None)
    finally:
        frame.chmod(0o644)
    assert [(Path(p).name, r) for _, p, r in summary.bad_frames] == [
        (frame.name, "unreadable (Permission denied)")
    ]


def test_prepare_carries_conditions(tree: Path, tmp_path: Path) -> None:
    from fredfusion.data.conditions import write_conditions

    write_conditions(tree / "0", ["night", "small"], scenario="night+small")  # side file: wins
    (tree / "1" / "conditions.json").write_text("{broken")  # a problem; no condition
    split_file = tmp_path / "split.txt"
    split_file.write_text("0 train\n1 val\n8 test\n")
    out = tmp_path / "out"
    lines: list[str] = []
    summary = prepare(tree, out, split=str(split_file), imgsz=32, progress=False, log=lines.append)
    expected = {0: ["night", "small"], 1: [], 8: ["canonical"]}  # 8: FRED's canonical test list
    assert {r["sequence"]: r["conditions"] for r in summary.sequences} == expected
    saved = json.loads((out / "prepare_summary.json").read_text())
    assert {r["sequence"]: r["conditions"] for r in saved["sequences"]} == expected
    for split in ("train", "val", "test"):
        images = load_coco(out / "annotations" / f"instances_{split}.json")["images"]
        assert images and all(im["conditions"] == expected[im["sequence_id"]] for im in images)
    text = "\n".join(lines)
    assert "conditions (sequences): night 1, small 1, canonical 1" in text
    assert "1/conditions.json: not a JSON file" in text and "sequence 1 gets no condition" in text
