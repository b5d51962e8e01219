"""`fredfusion show`: pair grid, dataset report, table, errors."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

import fredfusion.show as show_mod
from fredfusion.commands.show import add_parser
from fredfusion.show import (
    GRID_GAP,
    HEADER_H,
    PAIR_SEP,
    dataset_report,
    default_input_hw,
    format_report_table,
    pair_grid,
)

STORE_H, STORE_W = 72, 128  # store size of the tiny_prepared fixture
GREEN_BGR = np.array([0, 200, 0], dtype=np.uint8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _green(img_bgr: np.ndarray) -> np.ndarray:
    return (img_bgr == GREEN_BGR).all(axis=2)


@pytest.fixture
def drawn_boxes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Number of boxes given to each pair tile, in grid order."""
    counts: list[int] = []
    original = show_mod._pair_tile

    def pair_tile(rgb, event, boxes, caption):
        counts.append(len(boxes))
        return original(rgb, event, boxes, caption)

    monkeypatch.setattr(show_mod, "_pair_tile", pair_tile)
    return counts


def _assert_boxes_on_both_frames(tile: np.ndarray, width: int, boxes: int) -> None:
    """The green box outlines of the two frames of a pair tile are the same pixels, and there are some
    exactly when the tile has boxes."""
    left, right = _green(tile[:, :width]), _green(tile[:, width + PAIR_SEP :])
    assert np.array_equal(left, right)
    assert left.any() == (boxes > 0), boxes


@pytest.mark.parametrize(
    ("store_hw", "expected"),
    [
        ((72, 128), (96, 128)),
        ((180, 320), (192, 320)),
        ((270, 480), (288, 480)),
        ((360, 640), (384, 640)),
        ((720, 1280), (384, 640)),
        ((36, 64), (64, 64)),
        ((10, 20), (32, 32)),
        ((90, 150), (96, 128)),
    ],
)
def test_default_input_hw(store_hw: tuple[int, int], expected: tuple[int, int]) -> None:
    assert default_input_hw(store_hw) == expected


def test_default_input_hw_rejects_empty_store() -> None:
    with pytest.raises(ValueError, match="positive"):
        default_input_hw((0, 128))


def test_pair_grid_layout() -> None:
    tiles = [np.full((2, 3, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    grid = pair_grid(tiles, cols=2)
    assert grid.shape == (2 * 2 + GRID_GAP, 2 * 3 + GRID_GAP, 3)
    assert (grid[0:2, 0:3] == 10).all()
    assert (grid[0:2, 3 + GRID_GAP :] == 20).all()
    assert (grid[2 + GRID_GAP :, 0:3] == 30).all()
    assert (grid[2 + GRID_GAP :, 3 + GRID_GAP :] == 0).all()  # empty cell
    assert (grid[2 : 2 + GRID_GAP] == 255).all() and (grid[:, 3 : 3 + GRID_GAP] == 255).all()
    with pytest.raises(ValueError, match="same shape"):
        pair_grid([tiles[0], np.zeros((3, 3, 3), np.uint8)], cols=2)


def test_show_writes_grid_report_and_table(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], drawn_boxes: list[int]
) -> None:
    out = tmp_path / "show"
    rc = _run_cli(["show", "--data", str(tiny_prepared), "--n", "5", "--cols", "2", "--out", str(out)])
    assert rc == 0
    grid = cv2.imread(str(out / "pairs.png"))
    tile_h, tile_w = HEADER_H + STORE_H, 2 * STORE_W + PAIR_SEP
    assert grid.shape == (3 * tile_h + 2 * GRID_GAP, 2 * tile_w + GRID_GAP, 3)
    # every box is drawn on both frames of its pair: the green masks of the two halves agree
    assert len(drawn_boxes) == 5 and sum(b > 0 for b in drawn_boxes) >= 2
    for k, boxes in enumerate(drawn_boxes):
        r, c = divmod(k, 2)
        y, x = r * (tile_h + GRID_GAP) + HEADER_H, c * (tile_w + GRID_GAP)
        _assert_boxes_on_both_frames(grid[y : y + STORE_H, x : x + tile_w], STORE_W, boxes)
    report_png = cv2.imread(str(out / "report.png"))
    assert report_png is not None and report_png.shape[0] > 400 and report_png.shape[1] > 800

    printed = capsys.readouterr().out
    assert "dual%" in printed and "mean_dt_ms" in printed and "clipped" in printed
    summary = json.loads((tiny_prepared / "prepare_summary.json").read_text())
    train_rows = [s for s in summary["sequences"] if s["split"] == "train"]
    for s in train_rows:
        row = next(line for line in printed.splitlines() if line.split()[:2] == [str(s["sequence"]), "train"])
        cols = row.split()
        assert int(cols[2]) == s["images"] and int(cols[3]) == s["pairs"]
        assert float(cols[4]) == pytest.approx(100 * s["dual_rate"], abs=0.05)
        assert int(cols[7]) == s["boxes"] and int(cols[8]) == s["clipped"]
    total = next(line for line in printed.splitlines() if line.split()[0] == "all").split()
    assert int(total[2]) == sum(s["images"] for s in train_rows)
    assert int(total[8]) == sum(s["clipped"] for s in train_rows)


def test_dataset_report_numbers(tiny_prepared: Path) -> None:
    coco = json.loads((tiny_prepared / "annotations" / "instances_val.json").read_text())
    report = dataset_report(tiny_prepared, "val")
    images = coco["images"]
    dual = [img for img in images if img["rgb_file_name"] and img["event_file_name"]]
    dts = [abs(img["time_diff_ms"]) for img in dual]
    boxes = [a for a in coco["annotations"] if a["bbox"][2] > 0 and a["bbox"][3] > 0]
    tot = report["total"]
    assert (tot["images"], tot["dual"], tot["boxes"]) == (len(images), len(dual), len(boxes))
    assert tot["dual_rate"] == pytest.approx(len(dual) / len(images))
    assert tot["mean_dt_ms"] == pytest.approx(sum(dts) / len(dts))
    assert tot["max_dt_ms"] == pytest.approx(max(dts))
    assert report["boxes_per_image"].sum() == len(boxes) and len(report["boxes_per_image"]) == len(images)
    assert sorted(report["box_max_side"]) == pytest.approx(sorted(max(a["bbox"][2:]) for a in boxes))
    assert tot["images"] == tot["dual"] + tot["rgb_only"] + tot["event_only"]


def test_show_augment(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], drawn_boxes: list[int]
) -> None:
    out = tmp_path / "aug"
    argv = ["show", "--data", str(tiny_prepared), "--n", "4", "--augment", "--seed", "1", "--out", str(out)]
    assert _run_cli(argv) == 0
    grid = cv2.imread(str(out / "pairs.png"))
    h, w = default_input_hw((STORE_H, STORE_W))
    tile_h, tile_w = HEADER_H + h, 2 * w + PAIR_SEP
    assert grid.shape == (4 * tile_h + 3 * GRID_GAP, tile_w, 3)  # 4 pairs -> 1 column by default
    assert len(drawn_boxes) == 4 and sum(b > 0 for b in drawn_boxes) >= 2
    for r, boxes in enumerate(drawn_boxes):
        tile = grid[r * (tile_h + GRID_GAP) + HEADER_H : r * (tile_h + GRID_GAP) + tile_h]
        _assert_boxes_on_both_frames(tile, w, boxes)
    assert "augmented" in capsys.readouterr().out


def test_show_augment_input_shape(tiny_prepared: Path, tmp_path: Path) -> None:
    argv = ["show", "--data", str(tiny_prepared), "--n", "2", "--augment", "--input-shape", "64", "96"]
    assert _run_cli([*argv, "--cols", "2", "--out", str(tmp_path)]) == 0
    grid = cv2.imread(str(tmp_path / "pairs.png"))
    assert grid.shape == (HEADER_H + 64, 2 * (2 * 96 + PAIR_SEP) + GRID_GAP, 3)


def test_show_errors(tiny_prepared: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _run_cli(["show", "--data", str(missing), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"instances_nosplit\.json"):
        _run_cli(["show", "--data", str(tiny_prepared), "--split", "nosplit", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--n"):
        _run_cli(["show", "--data", str(tiny_prepared), "--n", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--input-shape"):
        argv = ["show", "--data", str(tiny_prepared), "--augment", "--input-shape", "0", "64"]
        _run_cli([*argv, "--out", str(tmp_path / "o")])


def test_report_summary_missing_or_broken(tiny_prepared: Path, tmp_path: Path) -> None:
    copy = tmp_path / "prepared"
    shutil.copytree(tiny_prepared / "annotations", copy / "annotations")
    report = dataset_report(copy, "train")
    assert report["summary_path"] is None and report["total"]["clipped"] is None
    assert format_report_table(report).splitlines()[-1].split()[-1] == "-"
    (copy / "prepare_summary.json").write_text('{"sequences": [\n  {"sequence": 0,\n')
    with pytest.raises(ValueError, match=r"prepare_summary\.json.*line 3"):
        dataset_report(copy, "train")
    (copy / "prepare_summary.json").write_text('{"sequences": [{"clipped": 1}]}')
    with pytest.raises(ValueError, match="entry 0"):
        dataset_report(copy, "train")
