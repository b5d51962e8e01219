import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from fredfusion.model.loss import LossConfig, YoloLoss, bbox_ciou
from fredfusion.model.postprocess import decode, non_max_suppression

STRIDES = (8, 16, 32)
# hand-picked anchors (pixels) for the single-target case: one match on P3, one on P4, none on P5
HAND_ANCHORS = torch.tensor(
    [
        [[3.0, 3.0], [16.0, 16.0], [70.0, 30.0]],
        [[100.0, 100.0], [32.0, 24.0], [2.0, 2.0]],
        [[200.0, 200.0], [300.0, 300.0], [400.0, 400.0]],
    ]
)
MIXED_ANCHORS = torch.tensor(
    [
        [[4.0, 4.0], [8.0, 6.0], [12.0, 16.0]],
        [[16.0, 12.0], [24.0, 24.0], [32.0, 20.0]],
        [[40.0, 40.0], [60.0, 30.0], [80.0, 60.0]],
    ]
)


def _maps(b: int, h: int, w: int, nc: int, fill: float | None = None, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in STRIDES:
        shape = (b, 3, h // s, w // s, 5 + nc)
        out.append(torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=g))
    return out


def _positives(levels) -> list[tuple]:
    rows = []
    for lvl, lt in enumerate(levels):
        v = lt.valid
        for b, a, gy, gx, c, box in zip(
            lt.img[v].tolist(), lt.anchor[v].tolist(), lt.gy[v].tolist(), lt.gx[v].tolist(),
            lt.cls[v].tolist(), lt.tbox[v].tolist(),
        ):  # fmt: skip
            rows.append((lvl, b, a, gy, gx, c, *box))
    return rows


# ---------------------------------------------------------------------------------------------- CIoU


def test_ciou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert bbox_ciou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    # shifted by 1: IoU 2/6, centre distance 1, enclosing 3x2 -> diagonal^2 13, same aspect
    shifted = torch.tensor([[1.0, 0.0, 2.0, 2.0]])
    assert bbox_ciou(a, shifted).item() == pytest.approx(1 / 3 - 1 / 13, abs=1e-6)
    # same centre, 4x2 vs 2x2: IoU 0.5, aspect term v with alpha = v / (v + 0.5)
    wide = torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    assert bbox_ciou(a, wide).item() == pytest.approx(0.5 - v * v / (v + 0.5), abs=1e-6)
    # disjoint: IoU 0, penalty by centre distance 4 over enclosing diagonal^2 6^2 + 2^2
    far = torch.tensor([[4.0, 0.0, 2.0, 2.0]])
    assert bbox_ciou(a, far).item() == pytest.approx(-16 / 40, abs=1e-6)


# ---------------------------------------------------------------------------------------- assignment


def test_assignment_single_target_hand_computed() -> None:
    loss = YoloLoss(HAND_ANCHORS, STRIDES, num_classes=1)
    # centre (19, 13), size 16x16, in a 64x64 input
    targets = torch.tensor([[0.0, 0.0, 11.0, 5.0, 27.0, 21.0]])
    levels = loss.assign(targets, [(8, 8), (4, 4), (2, 2)], batch_size=1)
    got = sorted(_positives(levels))
    # P3: centre (2.375, 1.625) cells -> own (1, 2), left (1, 1) since x frac < .5, down (2, 2)
    # since y frac > .5; only the 16x16 anchor matches (3x3 and 70x30 are >= 4x off).
    # P4: centre (1.1875, 0.8125) -> own (0, 1), left (0, 0), down (1, 1); only the 32x24 anchor.
    expected = sorted(
        [
            (0, 0, 1, 1, 2, 0, 0.375, 0.625, 2.0, 2.0),
            (0, 0, 1, 1, 1, 0, 1.375, 0.625, 2.0, 2.0),
            (0, 0, 1, 2, 2, 0, 0.375, -0.375, 2.0, 2.0),
            (1, 0, 1, 0, 1, 0, 0.1875, 0.8125, 1.0, 1.0),
            (1, 0, 1, 0, 0, 0, 1.1875, 0.8125, 1.0, 1.0),
            (1, 0, 1, 1, 1, 0, 0.1875, -0.1875, 1.0, 1.0),
        ]
    )
    assert got == expected
    # static size: every level holds targets x anchors x 5 candidates
    assert [lt.valid.numel() for lt in levels] == [15, 15, 15]
    assert levels[1].anchor_wh[levels[1].valid].tolist() == [[2.0, 1.5]] * 3


def _reference_assign(targets, anchors, grid_shapes, batch_size, nc, anchor_t) -> list[tuple]:
    """Straightforward loop version of the YOLOv5 assignment (float32 arithmetic like the real one)."""
    f = np.float32
    rows = []
    for lvl, ((ny, nx), s) in enumerate(zip(grid_shapes, STRIDES)):
        for b, c, x1, y1, x2, y2 in targets.tolist():
            if not (0 <= b < batch_size and 0 <= c < nc and x2 > x1 and y2 > y1):
                continue
            cx, cy = (f(x1) + f(x2)) * f(0.5 / s), (f(y1) + f(y2)) * f(0.5 / s)
            w, h = (f(x2) - f(x1)) / f(s), (f(y2) - f(y1)) / f(s)
            for a, (aw, ah) in enumerate(anchors[lvl].tolist()):
                aw, ah = f(aw) / f(s), f(ah) / f(s)
                if max(w / aw, aw / w, h / ah, ah / h) >= anchor_t:
                    continue
                centres = [(cx, cy)]
                if cx % 1 < 0.5 and cx > 1:
                    centres.append((cx - f(0.5), cy))
                if cy % 1 < 0.5 and cy > 1:
                    centres.append((cx, cy - f(0.5)))
                if (nx - cx) % 1 < 0.5 and nx - cx > 1:
                    centres.append((cx + f(0.5), cy))
                if (ny - cy) % 1 < 0.5 and ny - cy > 1:
                    centres.append((cx, cy + f(0.5)))
                for px, py in centres:
                    gi = min(max(math.floor(px), 0), nx - 1)
                    gj = min(max(math.floor(py), 0), ny - 1)
                    rows.append((lvl, int(b), a, gj, gi, int(c), cx - gi, cy - gj, w, h))
    return rows


def test_assignment_matches_loop_reference() -> None:
    rng = np.random.default_rng(0)
    h, w, bsz, nc = 64, 96, 3, 2
    n = 60
    x1 = rng.integers(0, w - 4, n)
    y1 = rng.integers(0, h - 4, n)
    x2 = np.minimum(x1 + rng.integers(2, 70, n), w)
    y2 = np.minimum(y1 + rng.integers(2, 50, n), h)
    t = np.stack([rng.integers(0, bsz, n), rng.integers(0, nc, n), x1, y1, x2, y2], 1).astype(np.float32)
    bad = np.array(
        [
            [3, 0, 10, 10, 20, 20],  # image index out of range
            [0, 2, 10, 10, 20, 20],  # class out of range
            [1, 0, 10, 10, 10, 20],  # zero width
            [1, 1, 30, 10, 20, 20],  # x2 < x1
        ],
        dtype=np.float32,
    )
    targets = torch.from_numpy(np.concatenate([t, bad]))
    grids = [(h // s, w // s) for s in STRIDES]
    for anchor_t in (4.0, 2.0):
        loss = YoloLoss(MIXED_ANCHORS, STRIDES, nc, LossConfig(anchor_t=anchor_t))
        got = sorted(_positives(loss.assign(targets, grids, bsz)))
        ref = sorted(_reference_assign(targets, MIXED_ANCHORS, grids, bsz, nc, anchor_t))
        assert len(got) == len(ref) > n  # neighbour cells add positives
        assert [r[:6] for r in got] == [r[:6] for r in ref]
        np.testing.assert_allclose([r[6:] for r in got], [r[6:] for r in ref], atol=1e-6)


def test_assignment_bad_targets_shape() -> None:
    loss = YoloLoss(MIXED_ANCHORS, STRIDES, 1)
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        loss(_maps(1, 64, 64, 1), torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------- loss


def test_empty_targets_objectness_only_hand_computed() -> None:
    bsz = 2
    loss_fn = YoloLoss(MIXED_ANCHORS, STRIDES, 1)
    preds = [p.requires_grad_() for p in _maps(bsz, 64, 96, 1, fill=0.0)]
    loss, parts = loss_fn(preds, torch.zeros(0, 6))
    obj = math.log(2) * (4.0 + 1.0 + 0.4)  # BCE(0, 0) = ln 2 on every cell, times the level balance
    assert parts.tolist() == pytest.approx([0.0, obj, 0.0, 0.0], abs=1e-6)
    assert loss.item() == pytest.approx(obj * bsz, abs=1e-5)
    assert not parts.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in preds)
    # only the objectness channel receives gradient
    assert all(p.grad[..., :4].abs().sum() == 0 and p.grad[..., 5:].abs().sum() == 0 for p in preds)


def test_perfect_predictions_give_near_zero_loss() -> None:
    loss_fn = YoloLoss(HAND_ANCHORS, STRIDES, num_classes=2)
    targets = torch.tensor([[0.0, 1.0, 11.0, 5.0, 27.0, 21.0]])
    preds = _maps(1, 64, 64, 2, fill=-20.0)  # objectness and classes confidently off everywhere
    for lt, p in zip(loss_fn.assign(targets, [(8, 8), (4, 4), (2, 2)], 1), preds):
        v = lt.valid
        sxy = (lt.tbox[v, :2] + 0.5) / 2
        swh = torch.sqrt(lt.tbox[v, 2:] / lt.anchor_wh[v]) / 2
        cell = p[lt.img[v], lt.anchor[v], lt.gy[v], lt.gx[v]]
        cell[:, :4] = torch.logit(torch.cat([sxy, swh], 1))
        cell[:, 4] = 20.0
        cell[:, 6] = 20.0  # class 1
        p[lt.img[v], lt.anchor[v], lt.gy[v], lt.gx[v]] = cell
    loss, parts = loss_fn(preds, targets)
    assert loss.item() < 1e-4
    assert parts.abs().max().item() < 1e-4
    # the same predictions with the wrong class: both class logits are 20 off (BCE ~20 each, mean 20)
    # on the 2 levels with positives, times the class gain 0.5
    wrong = targets.clone()
    wrong[0, 1] = 0.0
    _, parts_wrong = loss_fn(preds, wrong)
    assert parts_wrong[2].item() == pytest.approx(2 * 0.5 * 20.0, rel=1e-3)


def test_invalid_targets_do_not_change_loss_and_grads_stay_finite() -> None:
    loss_fn = YoloLoss(MIXED_ANCHORS, STRIDES, 2, LossConfig(label_smoothing=0.1, focal_gamma=1.5))
    good = torch.tensor([[0.0, 1.0, 10.0, 8.0, 30.0, 22.0], [1.0, 0.0, 40.0, 30.0, 52.0, 40.0]])
    bad = torch.tensor(
        [
            [5.0, 0.0, 10.0, 10.0, 20.0, 20.0],
            [0.0, 7.0, 10.0, 10.0, 20.0, 20.0],
            [0.0, 0.0, 10.0, 10.0, 10.0, 10.0],
            [1.0, 0.0, float("nan"), 10.0, 20.0, 20.0],
            [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0],  # the augmentation's invalid-row marker
        ]
    )
    preds = [p.requires_grad_() for p in _maps(2, 64, 96, 2)]
    loss_good, parts_good = loss_fn(preds, good)
    loss_all, parts_all = loss_fn(preds, torch.cat([bad[:2], good, bad[2:]]))
    assert loss_all.item() == pytest.approx(loss_good.item(), rel=1e-6)
    torch.testing.assert_close(parts_all, parts_good)
    loss_all.backward()
    assert all(torch.isfinite(p.grad).all() for p in preds)


def test_loss_needs_no_values_on_the_host() -> None:
    """Assignment and loss run on fake tensors (shapes only): no ``.item()``, ``nonzero``, boolean-mask
    indexing or other data-dependent shape, so no host synchronisation on a GPU; sizes depend only on
    the number of target rows. Forward on fake CUDA tensors (autograd needs a real CUDA device),
    forward + backward on fake CPU tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m, bsz = 7, 2
    anchors = MIXED_ANCHORS.tolist()
    with FakeTensorMode():
        cfg = LossConfig(label_smoothing=0.1, focal_gamma=1.5)
        loss_fn = YoloLoss(torch.tensor(anchors), STRIDES, 2, cfg)
        for dev in ("cuda", "cpu"):
            targets = torch.empty((m, 6), device=dev)
            levels = loss_fn.assign(targets, [(8, 12), (4, 6), (2, 3)], bsz)
            assert [lt.valid.shape for lt in levels] == [(m * 3 * 5,)] * 3
            head = torch.zeros((1, 3, 1, 1, 7), device=dev, requires_grad=True)
            preds = [torch.empty((bsz, 3, 64 // s, 96 // s, 1), device=dev) * head for s in STRIDES]
            loss, parts = loss_fn(preds, targets)
            assert loss.shape == () and parts.shape == (4,) and loss.device.type == dev
            if dev == "cpu":
                loss.backward()
                assert head.grad.shape == (1, 3, 1, 1, 7)


def test_loss_under_autocast_is_float32() -> None:
    loss_fn = YoloLoss(MIXED_ANCHORS, STRIDES, 1)
    targets = torch.tensor([[0.0, 0.0, 10.0, 8.0, 30.0, 22.0]])
    preds = [p.bfloat16() for p in _maps(1, 64, 96, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = loss_fn(preds, targets)
    ref, _ = loss_fn([p.float() for p in preds], targets)
    assert loss.dtype == torch.float32 and parts.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_bad_prediction_maps() -> None:
    loss_fn = YoloLoss(MIXED_ANCHORS, STRIDES, 1)
    with pytest.raises(ValueError, match="3 prediction maps"):
        loss_fn(_maps(1, 64, 64, 1)[:2], torch.zeros(0, 6))
    with pytest.raises(ValueError, match="prediction map 0"):
        loss_fn(_maps(1, 64, 64, 2), torch.zeros(0, 6))
    with pytest.raises(ValueError, match="balance"):
        YoloLoss(MIXED_ANCHORS, STRIDES, 1, LossConfig(balance=(1.0, 1.0)))


# ------------------------------------------------------------------------------------------ overfit


class _TinyNet(nn.Module):
    """Three conv stages producing the P3/P4/P5 raw maps from a 64x64 input."""

    def __init__(self, nc: int = 1, na: int = 3) -> None:
        super().__init__()
        self.na, self.no = na, 5 + nc

        def conv(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.SiLU())

        self.stem = nn.Sequential(conv(3, 16), conv(16, 32), conv(32, 32))
        self.down4, self.down5 = conv(32, 32), conv(32, 32)
        self.heads = nn.ModuleList(nn.Conv2d(32, na * self.no, 1) for _ in STRIDES)
        for head in self.heads:
            nn.init.constant_(head.bias.view(na, self.no)[:, 4], -4.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f3 = self.stem(x)
        f4 = self.down4(f3)
        f5 = self.down5(f4)
        out = []
        for f, head in zip((f3, f4, f5), self.heads):
            b, _, h, w = f.shape
            out.append(head(f).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out


def test_tiny_net_overfits_two_images(one_thread) -> None:
    torch.manual_seed(0)
    anchors = torch.tensor(
        [[[6.0, 5.0], [10.0, 8.0], [14.0, 11.0]], [[20.0, 14.0], [28.0, 20.0], [40.0, 28.0]],
         [[56.0, 40.0], [80.0, 56.0], [112.0, 80.0]]]
    )  # fmt: skip
    targets = torch.tensor(
        [
            [0.0, 0.0, 14.0, 18.0, 34.0, 32.0],
            [1.0, 0.0, 40.0, 6.0, 52.0, 16.0],
            [1.0, 0.0, 6.0, 40.0, 28.0, 56.0],
        ]
    )
    images = torch.rand(2, 3, 64, 64) * 0.2  # dark noise with a bright rectangle per drone
    for b, _, x1, y1, x2, y2 in targets.long().tolist():
        images[b, :, y1:y2, x1:x2] = 0.9
    net = _TinyNet()
    loss_fn = YoloLoss(anchors, STRIDES, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    history = []
    for _ in range(150):
        loss, parts = loss_fn(net(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), parts[0].item()))
    # objectness targets are IoUs (soft), so the loss has an entropy floor well above 0
    assert history[-1][0] < 0.3 * history[0][0]
    assert history[-1][1] < 0.75 * history[0][1]  # box term (0.48..0.61 over seeds 0..5)
    net.eval()
    with torch.no_grad():
        preds = net(images)
    # objectness at the own cell of each target on P3 (where its best-matching anchors are)
    p3 = preds[0][..., 4].sigmoid()
    for b, _, x1, y1, x2, y2 in targets.tolist():
        gx, gy = int((x1 + x2) / 2 / 8), int((y1 + y2) / 2 / 8)
        assert p3[int(b), :, gy, gx].max() > 0.5
    assert p3[0, :, 6:, 6:].max() < 0.1  # far from every box
    dets = non_max_suppression(decode(preds, anchors, STRIDES), conf=0.25, iou=0.5)
    for b in (0, 1):
        gt = targets[targets[:, 0] == b, 2:]
        assert len(dets[b]) >= len(gt)
        assert (box_iou(gt, dets[b][:, :4]).max(1).values > 0.5).all()  # every drone found
        assert box_iou(dets[b][:1, :4], gt).max() > 0.5  # and the best detection is a drone
