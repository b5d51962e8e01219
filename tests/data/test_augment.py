"""Tests for batched augmentation: geometry shared by both modalities, boxes, letterbox, HSV, and a
training step without host synchronisation."""

from __future__ import annotations

import colorsys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fredfusion.data.augment import (
    INVALID_ROW,
    AugmentConfig,
    _cyclic_partners,
    _Draw,
    _hsv_jitter,
    _rows_ok,
    augment_batch,
    hsv_to_rgb,
    letterbox_batch,
    letterbox_params,
    rgb_to_hsv,
    target_rows,
    valid_targets,
)
from fredfusion.data.blanking import blank_boxes, blank_frames, keep_masks, spared_parts
from fredfusion.model.loss import YoloLoss

H_IN, W_IN = 72, 128
OUT = (64, 128)
GREY = 114 / 255

NO_AUG = dict(
    mosaic=False, mixup=False, translate=0.0, scale=0.0, fliplr=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0
)


def rect_batch(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One filled rectangle per image: red in RGB, green in event; class = source image index.

    Rectangles keep >= 10 px from the image border so tiles of a mosaic never touch each other's.
    """
    rgb = torch.zeros((b, 3, H_IN, W_IN), dtype=torch.uint8)
    event = torch.zeros_like(rgb)
    rows = []
    for i in range(b):
        x1, y1 = 12 + (17 * i) % 50, 10 + (9 * i) % 24
        x2, y2 = x1 + 22 + 6 * (i % 3), y1 + 14 + 4 * (i % 2)
        rgb[i, 0, y1:y2, x1:x2] = 255
        event[i, 1, y1:y2, x1:x2] = 255
        rows.append([i, i, x1, y1, x2, y2])
    return rgb, event, torch.tensor(rows, dtype=torch.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vmax(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


def pixel_centres(out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(out_hw[0], dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(out_hw[1], dtype=torch.float32).view(1, -1) + 0.5
    return xs, ys


def inside(box: torch.Tensor, margin: float, out_hw: tuple[int, int]) -> torch.Tensor:
    """Pixels whose centres lie at least ``margin`` inside ``box`` (negative margin: grown box)."""
    xs, ys = pixel_centres(out_hw)
    x1, y1, x2, y2 = box.tolist()
    return (xs >= x1 + margin) & (xs <= x2 - margin) & (ys >= y1 + margin) & (ys <= y2 - margin)


def check_targets_valid(
    t: torch.Tensor, b: int, out_hw: tuple[int, int], min_size: float, rows: int | None = None
) -> torch.Tensor:
    """Check the layout of augmented targets (``rows`` rows: boxes sorted by image, then invalid
    rows) and every box; return the rows that hold a box."""
    assert t.dim() == 2 and t.shape[1] == 6 and t.dtype == torch.float32
    if rows is not None:
        assert t.shape[0] == rows
    v = valid_targets(t)
    n = v.shape[0]
    assert torch.equal(t[:n], v)  # boxes first
    assert torch.equal(t[n:], torch.tensor(INVALID_ROW).expand(t.shape[0] - n, 6))
    idx = v[:, 0]
    assert torch.equal(idx, idx.round()) and bool((idx >= 0).all()) and bool((idx < b).all())
    assert bool((v[:, 2] >= 0).all()) and bool((v[:, 3] >= 0).all())
    assert bool((v[:, 4] <= out_hw[1]).all()) and bool((v[:, 5] <= out_hw[0]).all())
    assert bool((v[:, 4] - v[:, 2] >= min_size).all()) and bool((v[:, 5] - v[:, 3] >= min_size).all())
    assert torch.equal(idx, idx.sort().values)
    return v


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alignment_mosaic_flip_scale(seed: int) -> None:
    b = 6
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(mosaic_prob=1.0 if seed == 0 else 0.5, mixup=False, hsv_h=0, hsv_s=0, hsv_v=0)
    g = torch.Generator().manual_seed(seed)
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=g)
    assert out_rgb.shape == (b, 3, *OUT) and out_ev.shape == (b, 3, *OUT)
    assert out_rgb.dtype == torch.float32 and out_rgb.is_contiguous() and out_ev.is_contiguous()
    assert float(out_rgb.min()) >= 0 and float(out_rgb.max()) <= 1
    t = check_targets_valid(t, b, OUT, cfg.min_box_size, rows=4 * b)
    assert t.shape[0] > 0
    # red - green in RGB is the rectangle coverage (fill grey and background cancel), green in event
    rgb_mask = out_rgb[:, 0] - out_rgb[:, 1]
    ev_mask = out_ev[:, 1]
    torch.testing.assert_close(rgb_mask, ev_mask, atol=1e-5, rtol=0)
    assert float(out_ev[:, 0].abs().max()) < 1e-6 and float(out_ev[:, 2].abs().max()) < 1e-6
    for row in t:
        i = int(row[0])
        core = inside(row[2:], 1.0, OUT)
        ring = inside(row[2:], -3.0, OUT) & ~inside(row[2:], -1.0, OUT)
        if core.any():
            assert float(rgb_mask[i][core].min()) > 0.999
            assert float(ev_mask[i][core].min()) > 0.999
        assert vmax(ev_mask[i][ring]) < 1e-3
    if seed == 0:  # every sample is a mosaic: some boxes come from other images of the batch
        assert bool((t[:, 0] != t[:, 1]).any())


def test_alignment_with_mixup_and_rotation() -> None:
    b = 5
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(mosaic_prob=0.7, mixup_prob=1.0, degrees=20, shear=5, hsv_h=0, hsv_s=0, hsv_v=0)
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(3))
    check_targets_valid(t, b, OUT, cfg.min_box_size, rows=8 * b)
    torch.testing.assert_close(out_rgb[:, 0] - out_rgb[:, 1], out_ev[:, 1], atol=1e-5, rtol=0)


def test_mixup_blends_both_modalities_with_same_lambda() -> None:
    b = 4
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(
        mosaic=False, mixup_prob=1.0, translate=0, scale=0, fliplr=0, hsv_h=0, hsv_s=0, hsv_v=0
    )
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(5))
    t = check_targets_valid(t, b, OUT, cfg.min_box_size, rows=2 * b)
    lb_rgb, lb_ev, lb_t, _, _ = letterbox_batch(rgb, event, OUT, targets)
    for i in range(b):
        rows = t[t[:, 0] == i]
        assert rows.shape[0] == 2  # own box and the partner's box
        classes = sorted(int(c) for c in rows[:, 1])
        assert i in classes
        j = classes[0] if classes[1] == i else classes[1]
        assert j != i
        for row in rows:  # boxes equal the letterboxed boxes of their source image
            torch.testing.assert_close(row[2:], lb_t[int(row[1]), 2:])
        lams = []
        for out, lb in ((out_rgb, lb_rgb), (out_ev, lb_ev)):
            d = lb[i] - lb[j]
            lam = float(((out[i] - lb[j]) * d).sum() / (d * d).sum())
            torch.testing.assert_close(out[i], lam * lb[i] + (1 - lam) * lb[j], atol=1e-5, rtol=0)
            lams.append(lam)
        assert abs(lams[0] - lams[1]) < 1e-5
        assert 0.2 < lams[0] < 0.8  # Beta(32, 32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_rows_follow_the_blended_images(seed: int) -> None:
    """Each sample holds its own box plus, only when its image is a blend, the box of the image blended
    in (found from the pixels); every image is blended into at most one sample."""
    b = 7
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(**{**NO_AUG, "mixup": True, "mixup_prob": 0.5})
    _, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(seed))
    t = check_targets_valid(t, b, OUT, cfg.min_box_size, rows=2 * b)
    _, lb_ev, lb_t, _, _ = letterbox_batch(rgb, event, OUT, targets)
    lenders = []
    for i in range(b):
        expected = [lb_t[i]]
        if not torch.allclose(out_ev[i], lb_ev[i], atol=1e-5):
            fits = []
            for j in range(b):
                d = lb_ev[i] - lb_ev[j]
                if j == i or float((d * d).sum()) == 0:
                    continue
                lam = float(((out_ev[i] - lb_ev[j]) * d).sum() / (d * d).sum())
                if torch.allclose(out_ev[i], lam * lb_ev[i] + (1 - lam) * lb_ev[j], atol=1e-4):
                    fits.append(j)
            assert len(fits) == 1
            lenders.append(fits[0])
            expected.append(lb_t[fits[0]])
        rows = t[t[:, 0] == i]
        expected = torch.stack(expected)
        expected[:, 0] = i
        torch.testing.assert_close(rows[rows[:, 1].argsort()], expected[expected[:, 1].argsort()])
    assert 0 < len(lenders) < b and len(set(lenders)) == len(lenders)


def test_mosaic_tiles_show_the_right_images() -> None:
    b = 4
    rgb_levels = [20, 70, 170, 230]
    ev_levels = [200, 40, 90, 140]
    rgb = torch.tensor(rgb_levels, dtype=torch.uint8).view(b, 1, 1, 1).expand(b, 3, H_IN, W_IN).contiguous()
    event = torch.tensor(ev_levels, dtype=torch.uint8).view(b, 1, 1, 1).expand(b, 3, H_IN, W_IN).contiguous()
    targets = torch.tensor([[i, i, 10, 8, 118, 64] for i in range(b)], dtype=torch.float32)
    # no zoom, no shift: the output window (144 canvas px wide) around a Mosaic centre in [64, 192]
    # always crosses the vertical tile border at x = 128, so every output shows >= 2 images
    cfg = AugmentConfig(mosaic_prob=1.0, mixup=False, scale=0.0, translate=0.0, hsv_h=0, hsv_s=0, hsv_v=0)
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(7))
    t = check_targets_valid(t, b, OUT, cfg.min_box_size, rows=4 * b)
    seen_other = False
    for row in t:
        i, k = int(row[0]), int(row[1])
        seen_other |= i != k
        core = inside(row[2:], 1.5, OUT)
        if core.any():
            torch.testing.assert_close(
                out_rgb[i][:, core],
                torch.full_like(out_rgb[i][:, core], rgb_levels[k] / 255),
                atol=1e-5,
                rtol=0,
            )
            torch.testing.assert_close(
                out_ev[i][:, core], torch.full_like(out_ev[i][:, core], ev_levels[k] / 255), atol=1e-5, rtol=0
            )
    assert seen_other
    # each output shows several source images
    assert all(
        len(set((out_rgb[i, 0] * 255).round().int().unique().tolist()) & set(rgb_levels)) >= 2
        for i in range(b)
    )


@pytest.mark.parametrize("b", [1, 2, 3])
def test_small_batches_mosaic_with_replacement(b: int) -> None:
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(mosaic_prob=1.0, mixup_prob=1.0)
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(b))
    assert out_rgb.shape == (b, 3, *OUT) and out_ev.shape == (b, 3, *OUT)
    check_targets_valid(t, b, OUT, cfg.min_box_size, rows=b * 4 * (2 if b > 1 else 1))
    assert bool(torch.isfinite(out_rgb).all()) and bool(torch.isfinite(out_ev).all())


def test_boxes_clipped_and_small_or_mostly_clipped_dropped() -> None:
    rgb, event, _ = rect_batch(2)
    targets = torch.tensor(
        [
            [0, 0, 40, 20, 41, 21],  # 1x1: too small
            [0, 0, 40, 20, 50, 21.5],  # 10x1.5: too thin
            [0, 0, -60, 10, 4, 30],  # keeps 4/64 of its area
            [1, 0, -10, 10, 20, 30],  # clipped to x1 = 0, keeps 2/3
            [1, 0, 100, 50, 140, 90],  # clipped at the right and bottom
            [1, 0, 30, 30, 40, 40],  # untouched
        ],
        dtype=torch.float32,
    )
    cfg = AugmentConfig(**NO_AUG)
    _, _, t = augment_batch(rgb, event, targets, (H_IN, W_IN), cfg, generator=gen(0))
    expected = torch.tensor(
        [[1, 0, 0, 10, 20, 30], [1, 0, 100, 50, 128, 72], [1, 0, 30, 30, 40, 40]], dtype=torch.float32
    )
    # the dropped boxes stay as invalid rows at the end: the row count is that of the input
    torch.testing.assert_close(t[:3], expected, atol=1e-4, rtol=0)
    assert torch.equal(t[3:], torch.tensor([INVALID_ROW] * 3))
    torch.testing.assert_close(valid_targets(t), expected, atol=1e-4, rtol=0)
    # min_box_size is measured at the output size: half-size output halves the boxes
    targets = torch.tensor([[0, 0, 40, 20, 43, 23], [0, 0, 60, 20, 64, 24]], dtype=torch.float32)
    _, _, t = augment_batch(rgb, event, targets, (36, 64), cfg)
    torch.testing.assert_close(
        t, torch.tensor([[0, 0, 30, 10, 32, 12], INVALID_ROW], dtype=torch.float32), atol=1e-4, rtol=0
    )


def test_letterbox_pixels_and_boxes_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 3, H_IN, W_IN), dtype=torch.uint8, generator=g)
    event = torch.randint(0, 256, (3, 3, H_IN, W_IN), dtype=torch.uint8, generator=g)
    xy = torch.rand((7, 2), generator=g) * torch.tensor([100.0, 50.0])
    boxes = torch.cat([xy, xy + torch.tensor([20.0, 15.0])], 1)
    targets = torch.cat([torch.tensor([0, 0, 1, 1, 2, 2, 2.0]).view(-1, 1), torch.zeros(7, 1), boxes], 1)
    # taller output: scale 1, 12 rows of padding above and below, pixels copied
    lr, le, lt, (px, py), s = letterbox_batch(rgb, event, (96, 128), targets)
    assert (px, py, s) == (0.0, 12.0, 1.0)
    torch.testing.assert_close(lr[:, :, 12:84], rgb.float() / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(le[:, :, 12:84], event.float() / 255, atol=1e-5, rtol=0)
    assert torch.equal(lr[:, :, :12], torch.full_like(lr[:, :, :12], GREY))
    assert torch.equal(lr[:, :, 84:], torch.full_like(lr[:, :, 84:], GREY))
    assert float(le[:, :, :12].abs().max()) == 0 and float(le[:, :, 84:].abs().max()) == 0
    torch.testing.assert_close(lt[:, 2:], boxes + torch.tensor([0.0, 12, 0, 12]))
    # half size: each output pixel is the mean of a 2x2 block
    lr, le, lt, (px, py), s = letterbox_batch(rgb, event, (36, 64), targets)
    assert (px, py, s) == (0.0, 0.0, 0.5)
    torch.testing.assert_close(lr, F.avg_pool2d(rgb.float(), 2) / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(lt[:, 2:], boxes / 2)
    # non-integer scale: boxes map back exactly with (x - pad) / scale
    lr, le, lt, (px, py), s = letterbox_batch(rgb, event, OUT, targets)
    assert (s, px, py) == letterbox_params((H_IN, W_IN), OUT)
    assert s == pytest.approx(64 / 72) and px == 7.0 and py == 0.0
    back = (lt[:, 2:] - torch.tensor([px, py, px, py])) / s
    torch.testing.assert_close(back, boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(lt[:, :2], targets[:, :2])
    assert torch.equal(lr[:, :, :, :6], torch.full_like(lr[:, :, :, :6], GREY))
    assert float(le[:, :, :, :6].abs().max()) == 0
    # no targets, single modality
    lr, le, lt, _, _ = letterbox_batch(None, event, OUT)
    assert lr is None and lt is None and le.shape == (3, 3, *OUT)


def test_special_off_equals_letterbox() -> None:
    rgb, event, targets = rect_batch(4)
    cfg = AugmentConfig(
        mosaic_prob=1.0, mixup_prob=1.0, **{k: v for k, v in NO_AUG.items() if k not in ("mosaic", "mixup")}
    )
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, special=False)
    lb_rgb, lb_ev, lb_t, _, _ = letterbox_batch(rgb, event, OUT, targets)
    torch.testing.assert_close(out_rgb, lb_rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_ev, lb_ev, atol=1e-6, rtol=0)
    torch.testing.assert_close(t, lb_t, atol=1e-4, rtol=0)
    # horizontal flip mirrors the letterboxed image and its boxes (pad_x = 0 at 96x128)
    cfg.fliplr = 1.0
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, (96, 128), cfg, special=False)
    lb_rgb, lb_ev, lb_t, _, _ = letterbox_batch(rgb, event, (96, 128), targets)
    torch.testing.assert_close(out_rgb, lb_rgb.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out_ev, lb_ev.flip(-1), atol=1e-6, rtol=0)
    mirrored = torch.stack(
        [lb_t[:, 0], lb_t[:, 1], 128 - lb_t[:, 4], lb_t[:, 3], 128 - lb_t[:, 2], lb_t[:, 5]], 1
    )
    torch.testing.assert_close(t, mirrored, atol=1e-4, rtol=0)


def test_rotated_boxes_contain_their_rectangles() -> None:
    rgb, event, targets = rect_batch(4)
    cfg = AugmentConfig(**{**NO_AUG, "degrees": 40.0, "scale": 0.3})
    _, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(11))
    t = check_targets_valid(t, 4, OUT, cfg.min_box_size, rows=4)
    mask = out_ev[:, 1]
    for i in range(4):
        rows = t[t[:, 0] == i]
        covered = torch.zeros(OUT, dtype=torch.bool)
        for row in rows:
            covered |= inside(row[2:], -1.0, OUT)
        if rows.shape[0]:
            assert vmax(mask[i][~covered]) < 1e-3
        # a kept box holds a good part of its rectangle
        for row in rows:
            assert float(mask[i][inside(row[2:], 0.0, OUT)].mean()) > 0.3


def test_determinism_with_seeded_generator() -> None:
    rgb, event, targets = rect_batch(6)
    cfg = AugmentConfig(degrees=5.0)
    a = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(42))
    b = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(42))
    c = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(43))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_hsv_changes_rgb_only() -> None:
    g = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (3, 3, H_IN, W_IN), dtype=torch.uint8, generator=g)
    event = torch.randint(0, 256, (3, 3, H_IN, W_IN), dtype=torch.uint8, generator=g)
    targets = torch.zeros((0, 6))
    cfg = AugmentConfig(**{**NO_AUG, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4})
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(2))
    lb_rgb, lb_ev, _, _, _ = letterbox_batch(rgb, event, OUT)
    torch.testing.assert_close(out_ev, lb_ev, atol=1e-6, rtol=0)
    assert float((out_rgb - lb_rgb).abs().mean()) > 0.01
    assert float(out_rgb.min()) >= 0 and float(out_rgb.max()) <= 1
    assert t.shape == (0, 6)


def test_hsv_conversions_against_colorsys_and_hand_values() -> None:
    x = torch.rand((2, 3, 4, 5), generator=gen(0))
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5])  # grey
    x[0, :, 0, 1] = 0.0  # black
    x[1, :, 1, 1] = torch.tensor([1.0, 1.0, 0.0])  # two channels at max
    hsv = rgb_to_hsv(x)
    flat_rgb = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    flat_hsv = hsv.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    for rgb_px, hsv_px in zip(flat_rgb, flat_hsv):
        assert hsv_px == pytest.approx(list(colorsys.rgb_to_hsv(*rgb_px)), abs=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=1e-6, rtol=0)
    # fused jitter == adjust in HSV space
    gains = torch.tensor([[0.3, 1.4, 0.7], [-0.2, 0.5, 1.3]])
    gv = gains.view(2, 3, 1, 1)
    ref = hsv_to_rgb(
        torch.cat(
            [
                torch.remainder(hsv[:, :1] + gv[:, :1], 1.0),
                (hsv[:, 1:2] * gv[:, 1:2]).clamp(0, 1),
                (hsv[:, 2:] * gv[:, 2:]).clamp(0, 1),
            ],
            1,
        )
    )
    torch.testing.assert_close(_hsv_jitter(x, gains), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(_hsv_jitter(x, torch.tensor([[0.0, 1.0, 1.0]] * 2)), x, atol=1e-6, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    cases = {
        (1 / 3, 1.0, 1.0): [0.0, 1.0, 0.0],  # hue +120 degrees: green
        (0.0, 1.0, 0.5): [0.5, 0.0, 0.0],  # half value
        (0.0, 0.0, 1.0): [1.0, 1.0, 1.0],  # no saturation: white
        (0.0, 0.5, 1.0): [1.0, 0.5, 0.5],  # half saturation
    }
    for g, expected in cases.items():
        out = _hsv_jitter(red, torch.tensor([g]))
        assert out.view(3).tolist() == pytest.approx(expected, abs=1e-6)


def test_single_modality_matches_pair() -> None:
    rgb, event, targets = rect_batch(5)
    cfg = AugmentConfig(mosaic_prob=0.6, mixup_prob=0.6)
    pr, pe, pt = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(9))
    r, e, t = augment_batch(rgb, None, targets, OUT, cfg, generator=gen(9))
    assert e is None
    torch.testing.assert_close(r, pr, atol=1e-6, rtol=0)
    assert torch.equal(t, pt)
    r, e, t = augment_batch(None, event, targets, OUT, cfg, generator=gen(9))
    assert r is None
    torch.testing.assert_close(e, pe, atol=1e-6, rtol=0)
    assert torch.equal(t, pt)


def test_samples_without_mosaic_match_a_batch_without_mosaic() -> None:
    """In a Mosaic batch, the samples not drawn for Mosaic sample their own image with grey padding
    (empty canvas tiles = fill) exactly as with Mosaic switched off; the random draws are the same."""
    b = 6
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(mosaic_prob=0.5, mixup=False, degrees=5, hsv_h=0, hsv_s=0, hsv_v=0)
    on = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(2))
    off = augment_batch(rgb, event, targets, OUT, replace(cfg, mosaic=False), generator=gen(2))
    same = [
        i
        for i in range(b)
        if torch.allclose(on[0][i], off[0][i], atol=1e-4) and torch.allclose(on[1][i], off[1][i], atol=1e-4)
    ]
    assert 0 < len(same) < b
    assert any(bool(((on[0][i] - GREY).abs() < 1e-6).any()) for i in same)  # padding is visible
    t_on, t_off = valid_targets(on[2]), valid_targets(off[2])
    for i in range(b):
        rows_on, rows_off = t_on[t_on[:, 0] == i], t_off[t_off[:, 0] == i]
        if i in same:
            torch.testing.assert_close(rows_on, rows_off, atol=1e-3, rtol=0)
        else:  # a Mosaic sample shows (and has boxes of) other images
            assert bool((rows_on[:, 1] != i).any())


def test_channels_last_views_give_the_same_batch() -> None:
    """The loader passes store frames (B, h, w, 3) as permuted (B, 3, h, w) views."""
    rgb, event, targets = rect_batch(5)
    cfg = AugmentConfig(mosaic_prob=0.6, mixup_prob=0.6, degrees=5)
    ref = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(8))
    views = [x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for x in (rgb, event)]
    assert not views[0].is_contiguous()
    got = augment_batch(*views, targets, OUT, cfg, generator=gen(8))
    for x, y in zip(got, ref):
        assert torch.equal(x, y)


def test_empty_targets() -> None:
    rgb, event, _ = rect_batch(4)
    out_rgb, _, t = augment_batch(
        rgb, event, torch.zeros((0, 6)), OUT, AugmentConfig(mosaic_prob=1, mixup_prob=1)
    )
    assert out_rgb.shape == (4, 3, *OUT) and t.shape == (0, 6)


def test_bad_input_raises_clear_errors() -> None:
    rgb, event, targets = rect_batch(2)
    cfg = AugmentConfig()
    with pytest.raises(ValueError, match="both None"):
        augment_batch(None, None, targets, OUT, cfg)
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(rgb.float(), event, targets, OUT, cfg)
    with pytest.raises(ValueError, match="differ"):
        augment_batch(rgb, event[:, :, :36], targets, OUT, cfg)
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        augment_batch(rgb[:, :1], None, targets, OUT, cfg)
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        augment_batch(rgb, event, targets[:, :5], OUT, cfg)
    with pytest.raises(ValueError, match="image indices"):
        augment_batch(rgb, event, targets + torch.tensor([5.0, 0, 0, 0, 0, 0]), OUT, cfg)
    with pytest.raises(ValueError, match="out_hw"):
        augment_batch(rgb, event, targets, (0, 128), cfg)
    with pytest.raises(ValueError, match="image indices"):
        letterbox_batch(rgb, event, OUT, targets - torch.tensor([1.0, 0, 0, 0, 0, 0]))


# ------------------------------------------------------------------------------------------------
# static target layout and no host synchronisation

STRIDES = (8, 16, 32)
ANCHORS = [[[4.0, 4.0], [8.0, 6.0], [12.0, 16.0]], [[16.0, 12.0], [24.0, 24.0], [32.0, 20.0]],
           [[40.0, 40.0], [60.0, 30.0], [80.0, 60.0]]]  # fmt: skip


def _fake_cuda_step(
    b: int, m: int, cfg: AugmentConfig, special: bool, dropout: float = 0.0, region: str = "image"
) -> dict:
    """One training step (augment_batch, the blanking of missing / dropped modalities with modality
    dropout ``dropout`` of whole frames or, ``region`` boxes, of boxes less random parts, YoloLoss)
    on fake CUDA tensors: shapes only, no data.

    Under ``FakeTensorMode`` every op that needs a tensor's values on the host (``.item()``,
    ``bool(t)``, ``nonzero``, boolean-mask indexing, ...) raises, so this runs only if the step
    never synchronises and every shape is known without data. Copies between host and device (which
    also make the host wait) are recorded. Autograd cannot run on fake CUDA tensors, so the loss
    backward runs on same-shaped fake CPU tensors.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class HostDeviceCopies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.on, self.copies = False, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.on and func in (aten._to_copy.default, aten.copy_.default):
                src, dst = (args[1], args[0]) if func is aten.copy_.default else (args[0], out)
                if src.device.type != dst.device.type:
                    self.copies.append(f"{func}: {src.device} -> {dst.device} {tuple(src.shape)}")
            return out

    with FakeTensorMode(), HostDeviceCopies() as log:
        dev = torch.device("cuda")
        rgb = torch.empty((b, 3, 36, 64), dtype=torch.uint8, device=dev)
        event = torch.empty((b, 3, 36, 64), dtype=torch.uint8, device=dev)
        targets = torch.empty((m, 6), device=dev)
        present = torch.empty((b, 2), dtype=torch.bool, device=dev)
        loss_fn = YoloLoss(torch.tensor(ANCHORS), STRIDES, 1)
        head = torch.zeros((1, 3, 1, 1, 6), device=dev, requires_grad=True)

        def step() -> tuple:
            r, e, t = augment_batch(rgb, event, targets, OUT, cfg, special=special)
            keep = keep_masks(present, b, dropout, None, dev)
            if region == "boxes":
                whole = keep_masks(present, b, 0.0, None, dev)
                spared = spared_parts(len(t), None, dev)
                r, e = blank_boxes(*blank_frames(r, e, whole), whole & ~keep, t, spared=spared)
            else:
                r, e = blank_frames(r, e, keep)
            preds = [F.avg_pool2d(r + e, s).mean(1)[:, None, :, :, None] * head for s in STRIDES]
            loss, parts = loss_fn(preds, t)
            return r, e, t, loss, parts

        loss_fn._constants(targets.device)  # the loss copies its anchors to a new device once
        log.on = True
        r, e, t, loss, parts = step()
        log.on = False
        head_cpu = torch.zeros((1, 3, 1, 1, 6), requires_grad=True)
        preds_cpu = [torch.empty((b, 1, OUT[0] // s, OUT[1] // s, 1)) * head_cpu for s in STRIDES]
        loss_cpu, _ = loss_fn(preds_cpu, torch.empty(t.shape))
        loss_cpu.backward()
        return {
            "rgb": (tuple(r.shape), r.device.type),
            "event": tuple(e.shape),
            "targets": (tuple(t.shape), t.device.type),
            "loss": (tuple(loss.shape), tuple(parts.shape), loss.device.type),
            "grad": tuple(head_cpu.grad.shape),
            "copies": log.copies,
        }


@pytest.mark.parametrize(
    ("special", "mosaic", "mixup", "copies", "dropout", "region"),
    # every branch: with / without Mosaic and MixUp, with / without modality dropout (frames, boxes)
    [
        (True, True, True, 8, 0.0, "image"),
        (False, True, True, 1, 0.0, "image"),
        (True, True, True, 8, 0.3, "image"),
        (True, True, True, 8, 0.3, "boxes"),
    ],
)
def test_train_step_never_syncs_and_has_static_shapes(
    special: bool, mosaic: bool, mixup: bool, copies: int, dropout: float, region: str
) -> None:
    b, m = 6, 5
    cfg = AugmentConfig(mosaic=mosaic, mixup=mixup, mosaic_prob=0.5, mixup_prob=0.5, degrees=10, shear=2)
    got = _fake_cuda_step(b, m, cfg, special, dropout, region)
    assert target_rows(m, b, cfg, special) == m * copies
    assert got == {
        "rgb": ((b, 3, *OUT), "cuda"),
        "event": (b, 3, *OUT),
        "targets": ((m * copies, 6), "cuda"),
        "loss": ((), (4,), "cuda"),  # box, obj, cls, dfl
        "grad": (1, 3, 1, 1, 6),
        "copies": [],
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_runs_with_sync_debug_mode_error() -> None:
    dev = torch.device("cuda")
    rgb, event, targets = (x.to(dev) for x in rect_batch(6))
    gen = torch.Generator(device=dev).manual_seed(0)
    loss_fn = YoloLoss(torch.tensor(ANCHORS), STRIDES, 1)
    head = torch.zeros((1, 3, 1, 1, 6), device=dev, requires_grad=True)
    cfg = AugmentConfig(mosaic_prob=0.5, mixup_prob=0.5, degrees=10)

    def step() -> torch.Tensor:
        r, e, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen)
        preds = [F.avg_pool2d(r + e, s).mean(1)[:, None, :, :, None] * head for s in STRIDES]
        loss, _ = loss_fn(preds, t)
        loss.backward()
        return t

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_targets_valid(t.cpu(), 6, OUT, cfg.min_box_size, rows=8 * 6)


@pytest.mark.parametrize("b", [1, 2, 3, 4, 7])
def test_partner_maps_are_permutations(b: int) -> None:
    own = torch.arange(b)
    for seed in range(3):
        fwd, inv = _cyclic_partners(_Draw(gen(seed), torch.device("cpu")), b, 3)
        assert fwd.shape == inv.shape == (3, b)
        for k in range(3):  # each image is partner k of exactly one sample
            assert torch.equal(fwd[k].sort().values, own)
            assert torch.equal(fwd[k][inv[k]], own) and torch.equal(inv[k][fwd[k]], own)
        if b == 1:
            assert torch.equal(fwd, torch.zeros((3, 1), dtype=torch.long))
        else:
            assert bool((fwd != own).all())  # partners are other images
        if b > 3:
            assert all(len(set(fwd[:, s].tolist())) == 3 for s in range(b))  # and all different


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_visible_rectangle_has_a_box(seed: int) -> None:
    """Mosaic tiles from other images bring their boxes: nothing visible is left without a box."""
    b = 6
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(
        mosaic_prob=1.0 if seed == 0 else 0.6, mixup=False, degrees=10, hsv_h=0, hsv_s=0, hsv_v=0,
        min_box_size=0.0, min_box_area_ratio=0.0,
    )  # fmt: skip
    _, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(seed))
    t = check_targets_valid(t, b, OUT, 0.0, rows=4 * b)
    sources = set()
    for i in range(b):
        covered = torch.zeros(OUT, dtype=torch.bool)
        for row in t[t[:, 0] == i]:
            covered |= inside(row[2:], -1.0, OUT)
            sources.add(int(row[1]))
        assert vmax(out_ev[i, 1][~covered]) < 0.5
    assert len(sources) == b


def test_invalid_rows_in_and_out() -> None:
    rgb, event, targets = rect_batch(3)
    placeholder = torch.tensor([INVALID_ROW, [1, -1, 10, 10, 30, 30], [7, -1, 0, 0, 5, 5]])
    mixed = torch.cat([targets[:1], placeholder, targets[1:]])
    # letterbox: same rows in the same order, placeholders as INVALID_ROW
    _, _, lt, _, _ = letterbox_batch(rgb, event, OUT, mixed)
    _, _, ref, _, _ = letterbox_batch(rgb, event, OUT, targets)
    assert lt.shape == (6, 6)
    assert torch.equal(lt[1:4], torch.tensor([INVALID_ROW] * 3))
    assert torch.equal(torch.cat([lt[:1], lt[4:]]), ref)
    # augment: placeholders add only invalid rows
    cfg = AugmentConfig(mosaic_prob=0.7, mixup_prob=0.7)
    _, _, t = augment_batch(rgb, event, mixed, OUT, cfg, generator=gen(4))
    _, _, t_ref = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(4))
    assert t.shape == (6 * 8, 6) and t_ref.shape == (3 * 8, 6)
    assert torch.equal(valid_targets(t), valid_targets(t_ref))


def test_rows_ok_marks_rows_a_device_batch_cannot_check() -> None:
    t = torch.tensor(
        [
            [0, 0, 1, 1, 5, 5],
            [2, 3, 1, 1, 5, 5],
            [3, 0, 1, 1, 5, 5],  # image index out of range for a batch of 3
            [-1, 0, 1, 1, 5, 5],
            [1.5, 0, 1, 1, 5, 5],  # not a whole number
            [float("nan"), 0, 1, 1, 5, 5],
            [1, -1, 1, 1, 5, 5],  # placeholder class
            [1, float("nan"), 1, 1, 5, 5],
        ]
    )
    assert _rows_ok(t, 3).tolist() == [True, True, False, False, False, False, False, False]


def test_loss_is_the_same_without_the_invalid_rows() -> None:
    """A consumer that drops the invalid rows (valid_targets) gets the same loss as the training step."""
    rgb, event, targets = rect_batch(4)
    _, _, t = augment_batch(rgb, event, targets, OUT, AugmentConfig(mosaic_prob=0.8), generator=gen(1))
    v = valid_targets(t)
    assert 0 < v.shape[0] < t.shape[0]
    loss_fn = YoloLoss(torch.tensor(ANCHORS), STRIDES, 1)
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn((4, 3, OUT[0] // s, OUT[1] // s, 6), generator=g) for s in STRIDES]
    loss_all, parts_all = loss_fn(preds, t)
    loss_valid, parts_valid = loss_fn(preds, v)
    assert loss_all.item() == pytest.approx(loss_valid.item(), rel=1e-6)
    torch.testing.assert_close(parts_all, parts_valid)


def test_valid_targets_and_target_rows() -> None:
    t = torch.tensor([[0, 0, 1, 1, 5, 5], INVALID_ROW, [1, 0, 2, 2, 6, 6]])
    assert torch.equal(valid_targets(t), t[[0, 2]])
    assert valid_targets(torch.zeros((0, 6))).shape == (0, 6)
    with pytest.raises(ValueError, match=r"\(K, 6\)"):
        valid_targets(torch.zeros(4))
    cfg = AugmentConfig()
    assert target_rows(5, 4, cfg) == 40 and target_rows(5, 1, cfg) == 20
    assert target_rows(5, 4, cfg, special=False) == 5
    assert target_rows(5, 4, AugmentConfig(mosaic=False)) == 10
