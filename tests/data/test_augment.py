"""Tests for batched augmentation: geometry shared by both modalities, boxes, letterbox, HSV."""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F

from fredfusion.data.augment import (
    AugmentConfig,
    _hsv_jitter,
    augment_batch,
    hsv_to_rgb,
    letterbox_batch,
    letterbox_params,
    rgb_to_hsv,
)

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


def check_targets_valid(t: torch.Tensor, b: int, out_hw: tuple[int, int], min_size: float) -> None:
    assert t.dim() == 2 and t.shape[1] == 6 and t.dtype == torch.float32
    idx = t[:, 0]
    assert torch.equal(idx, idx.round()) and bool((idx >= 0).all()) and bool((idx < b).all())
    assert bool((t[:, 2] >= 0).all()) and bool((t[:, 3] >= 0).all())
    assert bool((t[:, 4] <= out_hw[1]).all()) and bool((t[:, 5] <= out_hw[0]).all())
    assert bool((t[:, 4] - t[:, 2] >= min_size).all()) and bool((t[:, 5] - t[:, 3] >= min_size).all())
    assert torch.equal(idx, idx.sort().values)


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
    check_targets_valid(t, b, OUT, cfg.min_box_size)
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
    check_targets_valid(t, b, OUT, cfg.min_box_size)
    torch.testing.assert_close(out_rgb[:, 0] - out_rgb[:, 1], out_ev[:, 1], atol=1e-5, rtol=0)


def test_mixup_blends_both_modalities_with_same_lambda() -> None:
    b = 4
    rgb, event, targets = rect_batch(b)
    cfg = AugmentConfig(
        mosaic=False, mixup_prob=1.0, translate=0, scale=0, fliplr=0, hsv_h=0, hsv_s=0, hsv_v=0
    )
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(5))
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


def test_mosaic_tiles_show_the_right_images() -> None:
    b = 4
    rgb_levels = [20, 70, 170, 230]
    ev_levels = [200, 40, 90, 140]
    rgb = torch.tensor(rgb_levels, dtype=torch.uint8).view(b, 1, 1, 1).expand(b, 3, H_IN, W_IN).contiguous()
    event = torch.tensor(ev_levels, dtype=torch.uint8).view(b, 1, 1, 1).expand(b, 3, H_IN, W_IN).contiguous()
    targets = torch.tensor([[i, i, 10, 8, 118, 64] for i in range(b)], dtype=torch.float32)
    cfg = AugmentConfig(mosaic_prob=1.0, mixup=False, hsv_h=0, hsv_s=0, hsv_v=0)
    out_rgb, out_ev, t = augment_batch(rgb, event, targets, OUT, cfg, generator=gen(7))
    check_targets_valid(t, b, OUT, cfg.min_box_size)
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
    check_targets_valid(t, b, OUT, cfg.min_box_size)
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
    torch.testing.assert_close(t, expected, atol=1e-4, rtol=0)
    # min_box_size is measured at the output size: half-size output halves the boxes
    targets = torch.tensor([[0, 0, 40, 20, 43, 23], [0, 0, 60, 20, 64, 24]], dtype=torch.float32)
    _, _, t = augment_batch(rgb, event, targets, (36, 64), cfg)
    torch.testing.assert_close(
        t, torch.tensor([[0, 0, 30, 10, 32, 12]], dtype=torch.float32), atol=1e-4, rtol=0
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
    check_targets_valid(t, 4, OUT, cfg.min_box_size)
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
