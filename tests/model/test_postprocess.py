import pytest
import torch
from torchvision.ops import box_iou, nms

from fredfusion.model.postprocess import (
    DenseDetections,
    decode,
    dense_nms,
    non_max_suppression,
    scale_boxes,
    settle,
)

STRIDES = (8, 16, 32)
ANCHORS = torch.tensor(
    [
        [[8.0, 6.0], [10.0, 8.0], [18.0, 12.0]],
        [[26.0, 18.0], [38.0, 26.0], [56.0, 38.0]],
        [[80.0, 54.0], [116.0, 78.0], [168.0, 112.0]],
    ]
)


def _maps(b: int, h: int, w: int, nc: int, fill: float = 0.0) -> list[torch.Tensor]:
    return [torch.full((b, 3, h // s, w // s, 5 + nc), fill) for s in STRIDES]


def _logit(p: float) -> float:
    return torch.logit(torch.tensor(p, dtype=torch.float64)).item()


def _decoded(rows_per_image: list[list[list[float]]], nc: int) -> torch.Tensor:
    """(B, N, 5 + nc) from rows [x1, y1, x2, y2, obj, cls_probs...]; pads with zero-objectness rows."""
    n = max(len(r) for r in rows_per_image)
    out = torch.zeros(len(rows_per_image), n, 5 + nc)
    for b, rows in enumerate(rows_per_image):
        for i, (x1, y1, x2, y2, *rest) in enumerate(rows):
            out[b, i] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, *rest])
    return out


# ------------------------------------------------------------------------------------------- decode


def test_decode_zero_logits_layout() -> None:
    b, h, w, nc = 2, 64, 96, 2
    out = decode(_maps(b, h, w, nc), ANCHORS, STRIDES)
    n = sum(3 * (h // s) * (w // s) for s in STRIDES)
    assert out.shape == (b, n, 5 + nc)
    # zero logits: centre of each cell, anchor size, all probabilities 0.5; order level, anchor, row, col
    rows = []
    for lvl, s in enumerate(STRIDES):
        for a in range(3):
            for gy in range(h // s):
                for gx in range(w // s):
                    aw, ah = ANCHORS[lvl, a].tolist()
                    rows.append([(gx + 0.5) * s, (gy + 0.5) * s, aw, ah] + [0.5] * (1 + nc))
    expected = torch.tensor(rows)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], expected)


def test_decode_known_logits_to_pixels() -> None:
    preds = _maps(1, 64, 64, 1, fill=-10.0)
    # P3, anchor 1 (10x8), cell row 2 col 3: want box centre (30, 21), size 12x9
    # x: 30 / 8 - 3 = 0.75 -> sigmoid (0.75 + 0.5) / 2; y: 21 / 8 - 2 = 0.625; w: sqrt(12 / 10) / 2
    preds[0][0, 1, 2, 3, :5] = torch.tensor(
        [_logit(0.625), _logit(0.5625), _logit(1.2**0.5 / 2), _logit(1.125**0.5 / 2), _logit(0.9)]
    )
    preds[0][0, 1, 2, 3, 5] = _logit(0.8)
    # P5, anchor 2 (168x112), cell row 1 col 0: x 0.625 -> 0.75 cell -> 24 px, y 0.5 -> 1.5 cells -> 48 px,
    # w logit 0 -> 168, h 0.75 -> 1.5^2 * 112 = 252
    preds[2][0, 2, 1, 0, :6] = torch.tensor([_logit(0.625), 0.0, 0.0, _logit(0.75), _logit(0.7), 0.0])
    out = decode(preds, ANCHORS, STRIDES)
    i = (1 * 8 + 2) * 8 + 3
    torch.testing.assert_close(out[0, i], torch.tensor([30.0, 21.0, 12.0, 9.0, 0.9, 0.8]))
    j = 3 * 8 * 8 + 3 * 4 * 4 + (2 * 2 + 1) * 2 + 0
    torch.testing.assert_close(out[0, j], torch.tensor([24.0, 48.0, 168.0, 252.0, 0.7, 0.5]))
    # round trip through NMS: only these two rows clear the threshold; score = obj * cls
    dets = non_max_suppression(out, conf=0.3, iou=0.5)
    assert len(dets) == 1
    expected = torch.tensor([[24.0, 16.5, 36.0, 25.5, 0.72, 0.0], [-60.0, -78.0, 108.0, 174.0, 0.35, 0.0]])
    torch.testing.assert_close(dets[0], expected)


def test_decode_half_input_is_float32_and_cached_grid_reused() -> None:
    preds = [p.half() for p in _maps(1, 64, 64, 1)]
    out = decode(preds, ANCHORS, STRIDES)
    assert out.dtype == torch.float32
    with torch.inference_mode():
        out2 = decode(preds, ANCHORS, STRIDES)
    torch.testing.assert_close(out, out2)
    # grid made under inference mode must not leak into autograd use
    p = [m.float().requires_grad_() for m in preds]
    decode(p, ANCHORS, STRIDES).sum().backward()
    assert p[0].grad is not None


def test_decode_bad_input() -> None:
    with pytest.raises(ValueError, match="3 maps, 2 strides"):
        decode(_maps(1, 64, 64, 1), ANCHORS, STRIDES[:2])
    with pytest.raises(ValueError, match="prediction map 0"):
        decode([torch.zeros(1, 2, 8, 8, 6), *_maps(1, 64, 64, 1)[1:]], ANCHORS, STRIDES)


# ---------------------------------------------------------------------------------------------- NMS


def test_nms_suppresses_overlaps_keeps_classes_and_images_apart() -> None:
    nc = 2
    img0 = [
        [10, 10, 30, 30, 0.9, 1.0, 0.0],  # A, class 0, score 0.9
        [11, 11, 31, 31, 0.8, 1.0, 0.0],  # overlaps A (IoU ~0.82), class 0 -> suppressed
        [11, 11, 31, 31, 0.7, 0.0, 1.0],  # same place, class 1 -> kept
        [50, 50, 60, 60, 0.6, 0.5, 0.0],  # separate, score 0.3
        [0, 0, 5, 5, 0.5, 0.001, 0.0],  # score 0.0005 < conf
    ]
    img1 = [[10, 10, 30, 30, 0.4, 1.0, 0.0]]  # same box as A in another image: kept
    dets = non_max_suppression(_decoded([img0, img1], nc), conf=0.01, iou=0.5)
    assert len(dets) == 2
    expected0 = torch.tensor(
        [[10, 10, 30, 30, 0.9, 0], [11, 11, 31, 31, 0.7, 1], [50, 50, 60, 60, 0.3, 0]], dtype=torch.float32
    )
    torch.testing.assert_close(dets[0], expected0)
    torch.testing.assert_close(dets[1], torch.tensor([[10.0, 10.0, 30.0, 30.0, 0.4, 0.0]]))
    # class-agnostic: the class-1 duplicate goes too
    agn = non_max_suppression(_decoded([img0, img1], nc), conf=0.01, iou=0.5, agnostic=True)
    assert agn[0][:, 4].tolist() == pytest.approx([0.9, 0.3])


def test_nms_matches_per_image_torchvision_nms() -> None:
    g = torch.Generator().manual_seed(0)
    b, n, nc = 3, 300, 3
    xy = torch.rand(b, n, 2, generator=g) * 200
    wh = torch.rand(b, n, 2, generator=g) * 40 + 4
    probs = torch.rand(b, n, 1 + nc, generator=g)
    decoded = torch.cat([xy, wh, probs], -1)
    for conf, iou in ((0.05, 0.5), (0.3, 0.3)):
        dets = non_max_suppression(decoded, conf=conf, iou=iou)
        for i in range(b):
            scores, cls = (probs[i, :, 1:] * probs[i, :, :1]).max(1)
            boxes = torch.cat([xy[i] - wh[i] / 2, xy[i] + wh[i] / 2], 1)
            ref = []
            for c in range(nc):
                sel = (cls == c) & (scores > conf)
                keep = nms(boxes[sel], scores[sel], iou)
                ref.append(
                    torch.cat([boxes[sel][keep], scores[sel][keep, None], cls[sel][keep, None].float()], 1)
                )
            ref = torch.cat(ref)
            ref = ref[ref[:, 4].argsort(descending=True)]
            assert len(ref) > 10
            torch.testing.assert_close(dets[i], ref)


def test_nms_max_det_and_max_nms_caps() -> None:
    # a row of 20 disjoint boxes per image with distinct scores
    rows = [[[20 * k, 0, 20 * k + 10, 10, 0.01 * (k + 1), 1.0] for k in range(20)] for _ in range(2)]
    decoded = _decoded(rows, 1)
    dets = non_max_suppression(decoded, conf=0.0, max_det=5)
    for d in dets:
        assert d[:, 4].tolist() == pytest.approx([0.2, 0.19, 0.18, 0.17, 0.16])
    # only the 3 best candidates per image enter NMS
    dets = non_max_suppression(decoded, conf=0.0, max_nms=3)
    assert [len(d) for d in dets] == [3, 3]
    assert dets[1][:, 0].tolist() == [380.0, 360.0, 340.0]


def test_nms_multi_label() -> None:
    rows = [[[0, 0, 10, 10, 1.0, 0.9, 0.6, 0.1]]]
    single = non_max_suppression(_decoded(rows, 3), conf=0.3)
    torch.testing.assert_close(single[0][:, 4:], torch.tensor([[0.9, 0.0]]))
    multi = non_max_suppression(_decoded(rows, 3), conf=0.3, multi_label=True)
    torch.testing.assert_close(multi[0][:, 4:], torch.tensor([[0.9, 0.0], [0.6, 1.0]]))


def test_nms_nothing_above_threshold() -> None:
    dets = non_max_suppression(torch.zeros(3, 50, 6), conf=0.1)
    assert [d.shape for d in dets] == [(0, 6)] * 3


def test_nms_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, N, 5 \+ nc\)"):
        non_max_suppression(torch.zeros(10, 6))


def _clustered(b: int, n: int, nc: int, seed: int) -> torch.Tensor:
    """Decoded rows with half the boxes jittered around 3 centres per image (chains of suppression) and
    no two equal scores in an image (so the order of equal scores, which no NMS promises, never counts)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, n, 2, generator=g) * torch.tensor([640.0, 384.0])
    centres = torch.rand(b, 3, 2, generator=g) * torch.tensor([640.0, 384.0])
    pick = torch.randint(0, 3, (b, n), generator=g)
    near = centres.gather(1, pick[..., None].expand(-1, -1, 2)) + torch.randn(b, n, 2, generator=g) * 6
    xy = torch.where(torch.rand(b, n, 1, generator=g) < 0.5, near, xy)
    wh = torch.rand(b, n, 2, generator=g) * 60 + 4
    ranks = torch.stack([torch.randperm(n * nc, generator=g) for _ in range(b)]).view(b, n, nc)
    probs = (ranks.float() + 1) / (n * nc + 1)  # objectness 1: every score differs
    return torch.cat([xy, wh, torch.ones(b, n, 1), probs], -1)


def _kept(d: DenseDetections) -> list[torch.Tensor]:
    rows = d.rows()
    return [rows[i][d.keep[i]] for i in range(len(rows))]


@pytest.mark.parametrize("nc", [1, 3])
@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("agnostic", [False, True])
def test_dense_nms_equals_non_max_suppression(nc: int, multi_label: bool, agnostic: bool) -> None:
    """Bit for bit the rows of the torchvision path, in its order: 4 images x 1000 candidates, enough
    for torchvision's per-class loop on a CPU (its coordinate-offset path, used for fewer boxes, rounds
    the offset coordinates)."""
    decoded = _clustered(4, 1500, nc, seed=nc + 2 * multi_label + 4 * agnostic)
    kw = dict(multi_label=multi_label, agnostic=agnostic)
    ref = non_max_suppression(decoded, 0.001, 0.45, 300, **kw)
    dense = dense_nms(decoded, 0.001, 0.45, 300, **kw)
    assert dense.keep.shape == (4, 1000) and dense.converged.dtype == torch.bool
    got = _kept(settle(dense, 0.45, 300, agnostic=agnostic))
    assert [len(r) for r in ref] == [len(r) for r in got] and all(len(r) == 300 for r in ref)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_dense_nms_unconverged_rounds_settle_to_the_same_result() -> None:
    decoded = _clustered(3, 2000, 1, seed=7)
    full = dense_nms(decoded, 0.001, 0.45, 300)
    assert bool(full.converged)
    short = dense_nms(decoded, 0.001, 0.45, 300, rounds=1)
    assert not bool(short.converged)  # overlapping candidates: the first step removes some
    settled = settle(short, 0.45, 300)
    assert bool(settled.converged) and torch.equal(settled.keep, full.keep)
    assert settle(full, 0.45, 300) is full


def test_dense_nms_in_chunks_of_images(monkeypatch: pytest.MonkeyPatch) -> None:
    from fredfusion.model import postprocess

    decoded = _clustered(3, 1200, 1, seed=11)
    whole = dense_nms(decoded)
    monkeypatch.setattr(postprocess, "_IOU_CHUNK", 1)  # one image per IoU chunk
    one_by_one = dense_nms(decoded)
    assert torch.equal(whole.keep, one_by_one.keep) and whole.keep.sum() > 0


def test_dense_nms_hand_cases_and_caps() -> None:
    nc = 2
    img0 = [
        [10, 10, 30, 30, 0.9, 1.0, 0.0],
        [11, 11, 31, 31, 0.8, 1.0, 0.0],  # suppressed by the first
        [11, 11, 31, 31, 0.7, 0.0, 1.0],  # other class: kept
        [50, 50, 60, 60, 0.6, 0.5, 0.0],
        [0, 0, 5, 5, 0.5, 0.001, 0.0],  # below conf
    ]
    img1 = [[10, 10, 30, 30, 0.4, 1.0, 0.0]]
    d = dense_nms(_decoded([img0, img1], nc), conf=0.01, iou=0.5)
    assert d.keep.tolist() == [[True, False, True, True, False], [True, False, False, False, False]]
    assert d.valid.tolist() == [[True, True, True, True, False], [True, False, False, False, False]]
    torch.testing.assert_close(_kept(d)[0], non_max_suppression(_decoded([img0, img1], nc), 0.01, 0.5)[0])
    agn = dense_nms(_decoded([img0, img1], nc), conf=0.01, iou=0.5, agnostic=True)
    assert agn.keep[0].tolist() == [True, False, False, True, False]
    rows = [[[20 * k, 0, 20 * k + 10, 10, 0.01 * (k + 1), 1.0] for k in range(20)] for _ in range(2)]
    capped = dense_nms(_decoded(rows, 1), conf=0.0, max_det=5, max_nms=8)
    assert capped.keep.shape == (2, 8) and capped.keep.sum(1).tolist() == [5, 5]
    assert _kept(capped)[1][:, 4].tolist() == pytest.approx([0.2, 0.19, 0.18, 0.17, 0.16])
    none = dense_nms(torch.zeros(3, 50, 6), conf=0.1)
    assert not none.keep.any() and bool(none.converged)
    with pytest.raises(ValueError, match=r"\(B, N, 5 \+ nc\)"):
        dense_nms(torch.zeros(10, 6))


# ------------------------------------------------------------------------------------- scale_boxes


def test_scale_boxes_hand_computed() -> None:
    # a 1280x720 frame resized by 0.5 to 640x360 and padded by 12 px top/bottom into 640x384
    dets = torch.tensor([[100.0, 12.0, 140.0, 42.0, 0.9, 0.0], [630.0, 370.0, 650.0, 380.0, 0.5, 0.0]])
    out = scale_boxes(dets, pad=(0.0, 12.0), scale=0.5)
    torch.testing.assert_close(out[0], torch.tensor([200.0, 0.0, 280.0, 60.0, 0.9, 0.0]))
    torch.testing.assert_close(out[1, :4], torch.tensor([1260.0, 716.0, 1300.0, 736.0]))
    clipped = scale_boxes(dets, pad=(0.0, 12.0), scale=0.5, clip=(1280, 720))
    torch.testing.assert_close(clipped[1, :4], torch.tensor([1260.0, 716.0, 1280.0, 720.0]))
    assert dets[0, 0].item() == 100.0  # input untouched
    assert box_iou(out[:1, :4], torch.tensor([[200.0, 0.0, 280.0, 60.0]])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scale"):
        scale_boxes(dets, (0.0, 0.0), 0.0)
