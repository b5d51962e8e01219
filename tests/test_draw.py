"""The drawing primitives shared by show, predict and the evaluation pictures."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fredfusion.draw import (
    GRID_GAP,
    HEADER_H,
    PAIR_SEP,
    add_caption,
    caption_bar,
    draw_boxes,
    put_label,
    rgb_copy,
    save_png,
    side_by_side,
    tile_grid,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "fredfusion"
RED = (230, 0, 0)


def _is(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (img == np.array(color, dtype=np.uint8)).all(axis=2)


def test_draw_boxes_in_place_with_colour_and_thickness() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    assert draw_boxes(img, np.array([[10.2, 5.0, 30.0, 20.0]]), RED, thickness=1, antialias=False) is img
    red = _is(img, RED)
    assert red[5, 10:31].all() and red[20, 10:31].all() and red[5:21, 10].all() and red[5:21, 30].all()
    assert red.sum() == 2 * 21 + 2 * 14  # one-pixel outline, nothing inside
    thick = draw_boxes(np.zeros((40, 60, 3), np.uint8), np.array([[10, 5, 30, 20]]), RED, 3, antialias=False)
    assert _is(thick, RED)[5:21, 9:12].all() and not _is(thick, RED)[12, 15]
    assert draw_boxes(img.copy(), np.zeros((0, 4)), RED).tolist() == img.tolist()


def test_score_labels_sit_above_the_box_or_inside_at_the_top() -> None:
    img = draw_boxes(np.zeros((60, 80, 3), np.uint8), np.array([[20, 30, 50, 50]]), RED, 1, scores=[0.5])
    rows = np.flatnonzero(_is(img, RED)[:, 21:40].any(axis=1))
    assert rows.min() < 30 - 8 and _is(img, RED)[rows.min() : 30, 20].all()  # filled label above y1
    assert (img[rows.min() : 29, 21:40] == 255).all(axis=2).any()  # white text on it
    top = draw_boxes(np.zeros((60, 80, 3), np.uint8), np.array([[20, 2, 50, 50]]), RED, 1, scores=[0.5])
    assert _is(top, RED)[2:10, 20].all()  # no room above: drawn from the top edge down


def test_put_label_anchors() -> None:
    img = np.zeros((40, 80, 3), np.uint8)
    put_label(img, "abc", (5, 30), 0.4, RED, pad=2, above=True)
    ys, xs = np.nonzero(_is(img, RED) | (img == 255).all(axis=2))
    assert ys.max() == 30 and xs.min() == 5
    img = np.zeros((40, 80, 3), np.uint8)
    put_label(img, "abc", (0, 0), 0.4, RED, pad=2)
    assert _is(img, RED)[0, 0]


def test_caption_and_side_by_side_geometry() -> None:
    a, b = np.full((10, 20, 3), 7, np.uint8), np.full((10, 20, 3), 9, np.uint8)
    body = side_by_side([a, b])
    assert body.shape == (10, 40 + PAIR_SEP, 3)
    assert (
        (body[:, :20] == 7).all()
        and (body[:, 20 : 20 + PAIR_SEP] == 255).all()
        and (body[:, -20:] == 9).all()
    )
    assert side_by_side([a, b], sep=0).shape == (10, 40, 3)
    assert side_by_side([a]).shape == a.shape
    with pytest.raises(ValueError, match="differ in shape"):
        side_by_side([a, np.zeros((11, 20, 3), np.uint8)])
    tile = add_caption(body, "hello")
    assert tile.shape == (HEADER_H + 10, body.shape[1], 3) and (tile[HEADER_H:] == body).all()
    bar = caption_bar(100, "hello")
    assert bar.shape == (HEADER_H, 100, 3) and bar[0, -1].tolist() == [30, 30, 30] and (bar > 150).any()


def test_tile_grid_clamps_columns_and_checks_tiles() -> None:
    tiles = [np.full((2, 3, 3), v, np.uint8) for v in (1, 2)]
    assert tile_grid(tiles, cols=5).shape == (2, 2 * 3 + GRID_GAP, 3)
    col = tile_grid(tiles, cols=1, gap=4)
    assert col.shape == (2 * 2 + 4, 3, 3) and (col[2:6] == 255).all() and (col[6:] == 2).all()
    with pytest.raises(ValueError, match="at least one"):
        tile_grid([], 1)
    with pytest.raises(ValueError, match="cols"):
        tile_grid(tiles, 0)


def test_rgb_copy_gives_three_channels_and_a_copy() -> None:
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    out = rgb_copy(gray)
    assert out.shape == (2, 3, 3) and (out[..., 2] == gray).all()
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb_copy(rgb)[:] = 5
    assert rgb.max() == 0


def test_save_png_round_trip_and_errors(tmp_path: Path) -> None:
    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 0] = 200  # red in RGB
    path = save_png(tmp_path / "sub" / "a.png", img)
    assert path == tmp_path / "sub" / "a.png"
    assert (cv2.imread(str(path))[..., ::-1] == img).all()
    save_png(path, img[:2])
    assert cv2.imread(str(path)).shape == (2, 5, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # no temporary file left
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        save_png(tmp_path / "file" / "b.png", img)
