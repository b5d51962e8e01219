"""The anchor-free family: published sizes, shapes, decoding, assignment, loss without host syncs."""

from __future__ import annotations

import pytest
import torch

from fredfusion.model.detector import model_info
from fredfusion.model.loss_v8 import V8Loss, V8LossConfig, _gt_table, task_aligned_assign
from fredfusion.model.postprocess import non_max_suppression
from fredfusion.model.yolov8 import REG_MAX, FusionYOLOv8

# YOLOv8 at 80 classes: parameters (model summaries) and GFLOPs at 640x640 (documentation table)
PUBLISHED = {
    "n": (3_157_200, 8.7),
    "s": (11_166_560, 28.6),
    "m": (25_902_640, 78.9),
    "l": (43_691_520, 165.2),
    "x": (68_229_648, 257.8),
}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_parameter_counts_equal_the_published_ones(size: str) -> None:
    model = FusionYOLOv8("rgb", size, num_classes=80)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[size][0]


@pytest.mark.parametrize("size", ["n", "s"])
def test_gflops_equal_the_published_ones(size: str) -> None:
    model = FusionYOLOv8("rgb", size, num_classes=80)
    assert round(model_info(model, (640, 640))["gflops"], 1) == PUBLISHED[size][1]


CASES = [("rgb", "concat"), ("event", "concat"), ("dual", "concat"), ("dual", "attention"), ("dual", "early")]


@pytest.mark.parametrize(("modality", "fusion"), CASES)
def test_forward_shapes_and_inputs(modality: str, fusion: str) -> None:
    model = FusionYOLOv8(modality, "n", fusion, num_classes=2).eval()
    x = torch.rand(2, 3, 64, 96)
    rgb, event = (x if "rgb" in model.inputs else None), (x if "event" in model.inputs else None)
    with torch.no_grad():
        maps = model(rgb, event)
        decoded = model.decode(maps)
    assert [tuple(m.shape) for m in maps] == [(2, 4 * REG_MAX + 2, 64 // s, 96 // s) for s in (8, 16, 32)]
    assert decoded.shape == (2, 8 * 12 + 4 * 6 + 2 * 3, 7)
    assert torch.equal(decoded[..., 4], torch.ones(2, decoded.shape[1]))
    if modality == "dual":
        with pytest.raises(ValueError, match="needs the event input"):
            model(x, None)


def test_decode_places_a_known_box() -> None:
    """Bins that put all mass on distance 2 (left, top) and 3 (right, bottom) strides give a box of
    those sides around the cell centre, in input pixels."""
    model = FusionYOLOv8("rgb", "n", num_classes=1)
    maps = [torch.zeros(1, 4 * REG_MAX + 1, 64 // s, 64 // s) for s in (8, 16, 32)]
    for m in maps:
        side = m[0, : 4 * REG_MAX].view(4, REG_MAX, *m.shape[2:])
        side[:, :] = -50.0
        side[0, 2] = side[1, 2] = 50.0
        side[2, 3] = side[3, 3] = 50.0
    decoded = model.decode(maps)[0]
    # first cell of P3: centre (0.5, 0.5) * 8 = (4, 4); x1 = 4 - 16, x2 = 4 + 24
    cx, cy, w, h = decoded[0, :4].tolist()
    assert (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) == pytest.approx(
        (-12.0, -12.0, 28.0, 28.0), abs=1e-4
    )
    # first cell of P5 (stride 32): centre (16, 16)
    cx, cy, w, h = decoded[8 * 8 + 4 * 4, :4].tolist()
    assert (cx - w / 2, cx + w / 2, w) == pytest.approx((16 - 64, 16 + 96, 160.0), abs=1e-4)


def test_gt_table_scatters_rows_per_image_and_drops_invalid_ones() -> None:
    targets = torch.tensor(
        [[1, 0, 1, 1, 5, 5], [-1, -1, 0, 0, 0, 0], [0, 0, 2, 2, 4, 6], [1, 0, 10, 10, 20, 30],
         [1, 0, 7, 7, 7, 9], [1, 0, 3, 3, 9, 9]], dtype=torch.float32)  # fmt: skip
    cls, box, ok = _gt_table(targets, batch=2, k=2)
    assert ok.tolist() == [[True, False], [True, True]]  # image 1's third box is beyond k; empty box dropped
    assert box[0, 0].tolist() == [2, 2, 4, 6]
    assert box[1].tolist() == [[1, 1, 5, 5], [10, 10, 20, 30]]
    assert cls[ok].tolist() == [0, 0, 0]


def test_task_aligned_assignment_by_hand() -> None:
    """Two boxes over a row of 8-px cells (centres x = 4, 12, 20, 28): only cells whose centre lies in a
    box can be positive, the topk best aligned of them are, and a cell claimed by two boxes keeps the
    one it overlaps most."""
    points = torch.tensor([[4.0 + 8 * i, 4.0 + 8 * j] for j in range(4) for i in range(4)])
    boxes = torch.cat((points - 4, points + 4), -1)[None]  # each cell predicts its own 8x8 square
    # box 0 holds the centres of cells 0, 1; box 1 those of cells 1, 2, 3
    gt_box = torch.tensor([[[0.0, 0.0, 17.0, 9.0], [8.0, 0.0, 32.0, 9.0]]])
    gt_cls, gt_ok = torch.zeros(1, 2, dtype=torch.long), torch.tensor([[True, True]])
    scores = torch.full((1, 16, 1), 0.5)
    scores[0, 2], scores[0, 3] = 0.9, 0.1
    for topk, positives in ((3, [0, 1, 2, 3]), (2, [0, 1, 2])):
        cfg = V8LossConfig(topk=topk)
        target_scores, target_box, fg = task_aligned_assign(scores, boxes, points, gt_cls, gt_box, gt_ok, cfg)
        assert fg[0].nonzero().flatten().tolist() == positives, topk
        # cell 1 lies in both: its IoU with box 0 (64 / 153) beats the one with box 1 (64 / 216)
        assert target_box[0, 1].tolist() == gt_box[0, 0].tolist()
        assert target_box[0, 2].tolist() == gt_box[0, 1].tolist()
        assert (target_scores[0, positives] > 0).all() and target_scores[0, 4:].sum() == 0
        # each box's best-aligned cell gets that box's best IoU as its class target
        assert target_scores[0, 0, 0].item() == pytest.approx(64 / 153, abs=1e-5)


def test_loss_trains_a_tiny_model_to_find_its_boxes() -> None:
    torch.manual_seed(0)
    model = FusionYOLOv8("event", "n", num_classes=1)
    loss_fn = V8Loss(model)
    x = torch.rand(2, 3, 64, 96)
    targets = torch.tensor([[0, 0, 10, 12, 34, 30], [1, 0, 40, 20, 70, 44], [-1, -1, 0, 0, 0, 0]])
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    first = None
    for _ in range(80):
        loss, parts = loss_fn(model(None, x), targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first and parts.shape == (4,) and parts[1] == 0
    with torch.no_grad():
        dets = non_max_suppression(model.decode(model(None, x)), 0.25, 0.45)
    for k, (_img, _cls, *box) in enumerate(targets[:2].tolist()):
        assert len(dets[k]), k
        best = dets[k][0, :4].tolist()
        assert best == pytest.approx(box, abs=4.0), (k, best, box)


def test_loss_makes_no_host_sync() -> None:
    """Forward and loss on fake CUDA tensors: any .item(), nonzero or data-dependent shape would raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = FusionYOLOv8("rgb", "n", num_classes=2)
        loss_fn = V8Loss(model)
        for dev in ("cuda", "cpu"):
            targets = torch.empty((9, 6), device=dev)
            head = torch.zeros((1, 4 * REG_MAX + 2, 1, 1), device=dev, requires_grad=True)
            preds = [
                torch.empty((2, 4 * REG_MAX + 2, 64 // s, 96 // s), device=dev) * head for s in (8, 16, 32)
            ]
            loss, parts = loss_fn(preds, targets)
            assert loss.shape == () and parts.shape == (4,) and loss.device.type == dev


def test_a_box_smaller_than_a_cell_gets_the_cell_that_holds_its_centre() -> None:
    """No cell centre lies inside a 3x3 px box between centres; with the cell sizes the cell holding its
    centre is a candidate (one per level), so the box is learned."""
    points = torch.tensor([[4.0 + 8 * i, 4.0] for i in range(4)])
    boxes = torch.cat((points - 4, points + 4), -1)[None]
    gt_box = torch.tensor([[[9.0, 0.5, 12.0, 3.5]]])  # centre (10.5, 2): inside cell 1 ([8, 16) x [0, 8))
    gt_cls, gt_ok = torch.zeros(1, 1, dtype=torch.long), torch.tensor([[True]])
    scores = torch.full((1, 4, 1), 0.5)
    cfg = V8LossConfig(topk=3)
    _, _, fg = task_aligned_assign(scores, boxes, points, gt_cls, gt_box, gt_ok, cfg)
    assert not fg.any()  # the published rule leaves it without a positive cell
    _, target_box, fg = task_aligned_assign(
        scores, boxes, points, gt_cls, gt_box, gt_ok, cfg, torch.full((4, 1), 8.0)
    )
    assert fg[0].tolist() == [False, True, False, False]
    assert target_box[0, 1].tolist() == gt_box[0, 0].tolist()
