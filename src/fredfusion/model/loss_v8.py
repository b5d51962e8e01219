"""Loss of the anchor-free family: task-aligned assignment, CIoU + distribution focal loss on boxes, BCE
on classes. Written from the published method descriptions (TOOD's task-aligned assigner; YOLOv8's
loss gains box 7.5, cls 0.5, dfl 1.5; the DFL of Generalized Focal Loss).

Assignment, per image and ground-truth box: the candidate cells are those whose centre lies inside the
box, and (a departure from the published method, for drones smaller than a cell) on each level the
cell that holds the box's centre; each candidate scores ``s**alpha * iou**beta`` (``s`` the predicted
probability of the box's class, ``iou`` of the predicted box with it); the ``topk`` best candidates are
positive; a cell claimed by several boxes keeps the one it overlaps most. A positive cell's class target
is the alignment normalised so that each box's best cell gets that box's best IoU.

Everything has static shapes and no host synchronisation: targets come as the augmentation's fixed
``(M, 6)`` rows (invalid rows with a negative class are never positive) and are scattered into a
``(B, max_boxes)`` table on the device; boxes beyond ``max_boxes`` in one image are ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fredfusion.model.loss import bbox_ciou
from fredfusion.model.yolov8 import REG_MAX, FusionYOLOv8, anchor_points

_EPS = 1e-9


@dataclass
class V8LossConfig:
    """Gains and assignment settings of the anchor-free loss."""

    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    topk: int = 10
    alpha: float = 0.5
    beta: float = 6.0
    max_boxes: int = 32
    label_smoothing: float = 0.0


def _gt_table(targets: torch.Tensor, batch: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, k)`` class, ``(B, k, 4)`` xyxy and ``(B, k)`` valid mask from ``(M, 6)`` target rows."""
    t = targets.float().nan_to_num(0.0, 0.0, 0.0)
    m = t.shape[0]
    valid = (t[:, 0] >= 0) & (t[:, 0] < batch) & (t[:, 1] >= 0) & (t[:, 4] > t[:, 2]) & (t[:, 5] > t[:, 3])
    img = torch.where(valid, t[:, 0].long().clamp(0, batch - 1), torch.full_like(t[:, 0].long(), batch))
    order = torch.sort(img * max(m, 1) + torch.arange(m, device=t.device), stable=True).indices
    img_s, rows = img[order], t[order]
    counts = torch.zeros(batch + 1, dtype=torch.long, device=t.device).scatter_add_(
        0, img_s, torch.ones_like(img_s)
    )
    rank = torch.arange(m, device=t.device) - (torch.cumsum(counts, 0) - counts)[img_s]
    ok = valid[order] & (rank < k)
    dump = batch * k  # one extra slot takes every row that is not written
    slot = torch.where(ok, img_s * k + rank.clamp(max=k - 1), torch.full_like(rank, dump))
    table = torch.zeros(batch * k + 1, 6, device=t.device)
    table.index_copy_(0, slot, torch.cat((rows[:, 1:], ok[:, None].float()), 1))
    table = table[:dump].view(batch, k, 6)
    return table[..., 0].long(), table[..., 1:5], table[..., 5] > 0


def _iou_xyxy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of broadcast ``(..., 4)`` xyxy boxes."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + _EPS)


def task_aligned_assign(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    gt_cls: torch.Tensor,
    gt_box: torch.Tensor,
    gt_ok: torch.Tensor,
    cfg: V8LossConfig,
    strides: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of every cell: class scores ``(B, A, nc)``, boxes ``(B, A, 4)`` xyxy and positives ``(B, A)``.

    ``scores`` ``(B, A, nc)`` are predicted probabilities, ``boxes`` ``(B, A, 4)`` predicted xyxy, ``points``
    ``(A, 2)`` cell centres, all in input pixels; ``gt_*`` from :func:`_gt_table`. With ``strides``
    ``(A, 1)`` (cell sizes), the cell of each level that holds a box's centre is a candidate too, so a
    box smaller than a cell (a far drone) is never left without one.
    """
    b, a, nc = scores.shape
    k = gt_cls.shape[1]
    inside = torch.cat(
        (points[None, None] - gt_box[:, :, None, :2], gt_box[:, :, None, 2:] - points[None, None]), -1
    )
    candidate = inside.amin(-1) > _EPS  # (B, k, A)
    if strides is not None:
        centre = (gt_box[..., :2] + gt_box[..., 2:]) / 2  # (B, k, 2)
        offset = (centre[:, :, None, :] - points[None, None]).abs()  # (B, k, A, 2)
        candidate = candidate | (offset < strides[None, None] / 2).all(-1)
    candidate = candidate & gt_ok[:, :, None]
    cls_index = gt_cls.clamp(0, nc - 1)[:, :, None].expand(b, k, a)
    s = scores.transpose(1, 2).gather(1, cls_index)  # (B, k, A)
    iou = _iou_xyxy(gt_box[:, :, None, :], boxes[:, None, :, :]).clamp(min=0) * candidate
    align = s.pow(cfg.alpha) * iou.pow(cfg.beta) * candidate
    top = align.topk(min(cfg.topk, a), dim=-1).indices
    positive = torch.zeros_like(align).scatter_(-1, top, 1.0) * candidate  # (B, k, A)
    # a cell claimed by several boxes keeps the one it overlaps most
    claimed = positive.sum(1, keepdim=True) > 1
    best = F.one_hot(iou.argmax(1), k).transpose(1, 2).to(positive.dtype)
    positive = torch.where(claimed, best * candidate, positive)
    fg = positive.sum(1) > 0  # (B, A)
    gt_index = positive.argmax(1)  # (B, A)
    target_box = gt_box.gather(1, gt_index[..., None].expand(b, a, 4))
    target_cls = gt_cls.gather(1, gt_index).clamp(0, nc - 1)
    align = align * positive
    norm = (align * (iou * positive).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + _EPS)).amax(1)
    target_scores = F.one_hot(target_cls, nc).float() * (norm * fg)[..., None]
    return target_scores, target_box, fg


def _cxcywh(xyxy: torch.Tensor) -> torch.Tensor:
    return torch.cat(((xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]), -1)


def _dfl(bins: torch.Tensor, points: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss ``(B, A)``: cross-entropy of each side's bins with the two bins around
    the target distance, weighted by nearness (sides averaged). Everything in strides of the cell's level."""
    ltrb = torch.cat((points - target[..., :2], target[..., 2:] - points), -1).clamp(0, REG_MAX - 1 - 0.01)
    left = ltrb.floor().long()
    w_right = ltrb - left
    logits = bins.reshape(-1, REG_MAX)
    ce_left = F.cross_entropy(logits, left.reshape(-1), reduction="none")
    ce_right = F.cross_entropy(logits, (left + 1).reshape(-1), reduction="none")
    loss = ce_left * (1 - w_right).reshape(-1) + ce_right * w_right.reshape(-1)
    return loss.view(ltrb.shape).mean(-1)


class V8Loss:
    """Loss of :class:`FusionYOLOv8` outputs against ``(M, 6)`` target rows (see the module notes)."""

    def __init__(self, model: FusionYOLOv8, cfg: V8LossConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else V8LossConfig()
        self.model = model
        self.num_classes = model.num_classes
        self.bins = torch.arange(REG_MAX, dtype=torch.float32)

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, parts)``: ``(box + cls + dfl) * batch_size`` and detached ``[box, 0, cls, dfl]`` (the
        parts of both families: box, objectness, class, DFL)."""
        device = preds[0].device
        autocast_off = (
            torch.autocast(device_type=device.type, enabled=False)
            if device.type in ("cuda", "cpu")
            else contextlib.nullcontext()
        )
        with autocast_off:
            return self._compute([p.float() for p in preds], targets.to(device))

    def _compute(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, nc = self.cfg, self.num_classes
        batch = preds[0].shape[0]
        bins, logits, shapes = self.model.split(preds)  # (B, A, 4, R), (B, A, nc)
        grid_points, stride = anchor_points(shapes, self.model.strides, logits.device, torch.float32)
        points = grid_points  # cell centres in grid units of their level
        dist = (bins.softmax(-1) * self.bins.to(logits.device)).sum(-1)  # (B, A, 4) in strides
        box_grid = torch.cat((grid_points - dist[..., :2], grid_points + dist[..., 2:]), -1)
        box_px = box_grid * stride
        gt_cls, gt_box, gt_ok = _gt_table(targets, batch, cfg.max_boxes)
        target_scores, target_box, fg = task_aligned_assign(
            logits.detach().sigmoid(), box_px.detach(), points * stride, gt_cls, gt_box, gt_ok, cfg, stride
        )
        if cfg.label_smoothing:
            target_scores = (
                target_scores * (1 - cfg.label_smoothing) + cfg.label_smoothing / (2 * nc) * fg[..., None]
            )
        total = target_scores.sum().clamp(min=1.0)
        lcls = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none").sum() / total
        weight = target_scores.sum(-1) * fg  # (B, A)
        iou = bbox_ciou(_cxcywh(box_px), _cxcywh(target_box))
        lbox = ((1.0 - iou) * weight).sum() / total
        ldfl = (_dfl(bins, grid_points, target_box / stride) * weight).sum() / total
        lbox, lcls, ldfl = lbox * cfg.box, lcls * cfg.cls, ldfl * cfg.dfl
        parts = torch.stack([lbox, torch.zeros_like(lbox), lcls, ldfl]).detach()  # no objectness term
        return (lbox + lcls + ldfl) * batch, parts
