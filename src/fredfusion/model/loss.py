"""YOLOv5-style detection loss with a fully vectorized, static-shape target assignment.

Every target is expanded into ``anchors_per_level x 5`` candidates per level (each anchor, the
target's own cell and its 4 neighbour cells). A candidate is positive when the anchor matches the
box size (wh ratio < ``anchor_t``) and the neighbour lies on the near side of the target centre
(YOLOv5 offsets with ``g = 0.5``). Losses are computed for all candidates and masked with weights,
so tensor sizes depend only on the number of target rows: no Python loop over images, targets or
anchors, and no host synchronisation (only the first call on a device copies the anchors there).
Rows that hold no box (e.g. the augmentation's ``[-1, -1, 0, 0, 0, 0]`` marker: image or class out
of range, or an empty box) are never positive, so they can stay in the targets tensor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_G = 0.5  # neighbour-cell offset (YOLOv5)
# own cell, then left (x), up (y), right (x), down (y) neighbours, as offsets subtracted from the centre
_OFFSETS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))
_FOCAL_ALPHA = 0.25


@dataclass
class LossConfig:
    """Loss gains and matching settings (YOLOv5 names and defaults)."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    label_smoothing: float = 0.0
    balance: tuple = (4.0, 1.0, 0.4)
    focal_gamma: float = 0.0


@dataclass
class LevelTargets:
    """Assignment candidates of one level, all of length ``K = M * anchors_per_level * 5``.

    ``valid`` marks the positive candidates; the other rows hold harmless placeholder values
    (indices clamped into range, a unit box) so they can be evaluated and masked out.
    """

    img: torch.Tensor  # (K,) long, image index in the batch
    anchor: torch.Tensor  # (K,) long, anchor index within the level
    gy: torch.Tensor  # (K,) long, grid row
    gx: torch.Tensor  # (K,) long, grid column
    tbox: torch.Tensor  # (K, 4) float32, target cx, cy (relative to the cell corner), w, h in grid units
    cls: torch.Tensor  # (K,) long, class index
    anchor_wh: torch.Tensor  # (K, 2) float32, anchor size in grid units
    valid: torch.Tensor  # (K,) bool
    target: torch.Tensor  # (K,) long, row of the target in the ``targets`` tensor


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of matching rows of two ``(..., 4)`` tensors of ``cx, cy, w, h`` boxes; ``(...)``."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    b1x1, b1x2, b1y1, b1y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2x1, b2x2, b2y1, b2y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp(min=0) * (
        torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    c2 = cw**2 + ch**2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def _bce(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Element-wise BCE with logits, optionally focal-modulated (``gamma > 0``, alpha 0.25)."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if gamma > 0:
        p = torch.sigmoid(logits)
        p_t = target * p + (1 - target) * (1 - p)
        alpha = target * _FOCAL_ALPHA + (1 - target) * (1 - _FOCAL_ALPHA)
        loss = loss * alpha * (1.0 - p_t) ** gamma
    return loss


class YoloLoss:
    """YOLOv5 loss: CIoU box, BCE objectness with IoU targets, BCE class; vectorized assignment.

    ``anchors`` is ``(levels, anchors_per_level, 2)`` in input pixels, ``strides`` one per level.
    The class term is computed for every ``num_classes`` (for one class it trains the class
    probability that multiplies objectness in the detection score).
    """

    def __init__(
        self,
        anchors: torch.Tensor,
        strides: Sequence[int],
        num_classes: int,
        cfg: LossConfig | None = None,
    ) -> None:
        self.cfg = cfg if cfg is not None else LossConfig()
        anchors = torch.as_tensor(anchors).detach().to(dtype=torch.float32)
        if anchors.ndim != 3 or anchors.shape[-1] != 2:
            raise ValueError(
                f"anchors must have shape (levels, anchors_per_level, 2), got {tuple(anchors.shape)}"
            )
        if len(strides) != anchors.shape[0]:
            raise ValueError(f"{len(strides)} strides for {anchors.shape[0]} anchor levels")
        if len(self.cfg.balance) != anchors.shape[0]:
            raise ValueError(f"balance has {len(self.cfg.balance)} entries for {anchors.shape[0]} levels")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.strides = tuple(int(s) for s in strides)
        self.num_classes = int(num_classes)
        self.num_levels = int(anchors.shape[0])
        self.num_anchors = int(anchors.shape[1])
        self._anchors_grid = torch.stack([anchors[i] / s for i, s in enumerate(self.strides)]).cpu()
        self._const: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def place(self, device: torch.device) -> None:
        """Copy the constants to ``device`` now: before ``torch.compile`` traces the loss, as a first
        compiled call that filled their cache would be traced and compiled again at the second."""
        self._constants(torch.empty(0, device=device).device)  # the key a tensor's device gives (cuda:0)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Anchors (grid units), cell offsets and the placeholder box on ``device``, copied once."""
        if device not in self._const:
            offsets = torch.tensor(_OFFSETS, dtype=torch.float32) * _G
            unit = torch.tensor([0.5, 0.5, 1.0, 1.0])
            self._const[device] = (self._anchors_grid.to(device), offsets.to(device), unit.to(device))
        return self._const[device]

    def assign(
        self, targets: torch.Tensor, grid_shapes: Sequence[tuple[int, int]], batch_size: int
    ) -> list[LevelTargets]:
        """Build the assignment candidates of every level.

        ``targets`` is ``(M, 6)`` ``[image, class, x1, y1, x2, y2]`` in input pixels, ``grid_shapes``
        the ``(ny, nx)`` of each level. Targets with an image index outside ``[0, batch_size)``, a
        class outside ``[0, num_classes)`` or a non-positive size are never positive.
        """
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must have shape (M, 6), got {tuple(targets.shape)}")
        if len(grid_shapes) != self.num_levels:
            raise ValueError(f"{len(grid_shapes)} grid shapes for {self.num_levels} levels")
        device = targets.device
        anchors_grid, offsets, unit = self._constants(device)
        t = targets.float()
        m, na, no = t.shape[0], self.num_anchors, offsets.shape[0]
        img_f, cls_f = t[:, 0], t[:, 1]
        target_ok = (
            (img_f >= 0)
            & (img_f < batch_size)
            & (cls_f >= 0)
            & (cls_f < self.num_classes)
            & torch.isfinite(t).all(1)
            & (t[:, 4] > t[:, 2])
            & (t[:, 5] > t[:, 3])
        )
        t = t.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # rows that are not ok only need to be finite
        img = t[:, 0].clamp(0, batch_size - 1).long()
        cls = t[:, 1].clamp(0, self.num_classes - 1).long()
        shape = (m, na, no)
        img_k = img[:, None, None].expand(shape).reshape(-1)
        cls_k = cls[:, None, None].expand(shape).reshape(-1)
        anchor_k = torch.arange(na, device=device)[None, :, None].expand(shape).reshape(-1)
        target_k = torch.arange(m, device=device)[:, None, None].expand(shape).reshape(-1)

        out = []
        for i, (ny, nx) in enumerate(grid_shapes):
            stride = self.strides[i]
            anc = anchors_grid[i]  # (na, 2)
            cxy = (t[:, 2:4] + t[:, 4:6]) * (0.5 / stride)  # (m, 2) grid units
            wh = (t[:, 4:6] - t[:, 2:4]) / stride
            r = wh[:, None, :] / anc[None]  # (m, na, 2)
            match = (torch.maximum(r, 1.0 / r).amax(-1) < self.cfg.anchor_t) & target_ok[:, None]
            inv = torch.stack((nx - cxy[:, 0], ny - cxy[:, 1]), 1)  # distance to the far border
            near = (cxy % 1.0 < _G) & (cxy > 1.0)  # left / up neighbour exists
            far = (inv % 1.0 < _G) & (inv > 1.0)  # right / down neighbour exists
            off_ok = torch.cat([torch.ones_like(near[:, :1]), near, far], 1)  # (m, 5)
            valid = (match[:, :, None] & off_ok[:, None, :]).reshape(-1)
            cell = (cxy[:, None, :] - offsets[None]).floor()  # (m, 5, 2)
            gx = cell[..., 0].clamp(0, nx - 1)
            gy = cell[..., 1].clamp(0, ny - 1)
            txy = cxy[:, None, :] - torch.stack([gx, gy], -1)  # (m, 5, 2)
            tbox = torch.cat([txy, wh[:, None, :].expand(m, no, 2)], -1)  # (m, 5, 4)
            tbox = tbox[:, None].expand(m, na, no, 4).reshape(-1, 4)
            tbox = torch.where(valid[:, None], tbox, unit)
            out.append(
                LevelTargets(
                    img=img_k,
                    anchor=anchor_k,
                    gy=gy.long()[:, None].expand(shape).reshape(-1),
                    gx=gx.long()[:, None].expand(shape).reshape(-1),
                    tbox=tbox,
                    cls=cls_k,
                    anchor_wh=anc[None, :, None, :].expand(m, na, no, 2).reshape(-1, 2),
                    valid=valid,
                    target=target_k,
                )
            )
        return out

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, parts)``: ``(box + obj + cls) * batch_size`` and detached ``[box, obj, cls, 0]``
        (the parts of both families: box, objectness, class, DFL).

        ``preds`` are the raw maps ``(B, anchors_per_level, ny, nx, 5 + num_classes)`` per level;
        ``targets`` is ``(M, 6)`` ``[image, class, x1, y1, x2, y2]`` in input pixels (M may be 0).
        """
        if len(preds) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} prediction maps, got {len(preds)}")
        no = 5 + self.num_classes
        for i, p in enumerate(preds):
            if p.ndim != 5 or p.shape[1] != self.num_anchors or p.shape[-1] != no:
                raise ValueError(
                    f"prediction map {i} must have shape (B, {self.num_anchors}, ny, nx, {no}), "
                    f"got {tuple(p.shape)}"
                )
        device = preds[0].device
        bs = preds[0].shape[0]
        autocast_off = (
            torch.autocast(device_type=device.type, enabled=False)
            if device.type in ("cuda", "cpu")
            else contextlib.nullcontext()
        )
        with autocast_off:
            return self._compute([p.float() for p in preds], targets.to(device), bs)

    def _compute(
        self, preds: list[torch.Tensor], targets: torch.Tensor, bs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        nc, na = self.num_classes, self.num_anchors
        cp, cn = 1.0 - 0.5 * cfg.label_smoothing, 0.5 * cfg.label_smoothing
        levels = self.assign(targets, [tuple(p.shape[2:4]) for p in preds], bs)
        zero = preds[0].new_zeros(())
        lbox, lobj, lcls = zero, zero, zero
        class_ids = torch.arange(nc, device=targets.device)
        for i, (p, lt) in enumerate(zip(preds, levels)):
            ny, nx = p.shape[2], p.shape[3]
            flat_p = p.reshape(-1, p.shape[-1])
            idx = ((lt.img * na + lt.anchor) * ny + lt.gy) * nx + lt.gx
            ps = flat_p.index_select(0, idx)  # (K, no)
            w = lt.valid.float()
            n = w.sum().clamp(min=1.0)
            pxy = ps[:, :2].sigmoid() * 2.0 - 0.5
            pwh = (ps[:, 2:4].sigmoid() * 2.0) ** 2 * lt.anchor_wh
            iou = bbox_ciou(torch.cat([pxy, pwh], 1), lt.tbox)
            lbox = lbox + ((1.0 - iou) * w).sum() / n

            tobj = torch.zeros(flat_p.shape[0], device=p.device, dtype=p.dtype)
            tobj = tobj.scatter_reduce(
                0, idx, iou.detach().clamp(min=0) * w, reduce="amax", include_self=True
            )
            lobj = lobj + _bce(flat_p[:, 4], tobj, cfg.focal_gamma).mean() * cfg.balance[i]

            tcls = cn + (cp - cn) * (lt.cls[:, None] == class_ids[None]).float()
            lcls = lcls + (_bce(ps[:, 5:], tcls, cfg.focal_gamma).sum(1) * w).sum() / (n * nc)
        lbox, lobj, lcls = lbox * cfg.box, lobj * cfg.obj, lcls * cfg.cls
        parts = torch.stack([lbox, lobj, lcls, torch.zeros_like(lbox)]).detach()  # no DFL term
        return (lbox + lobj + lcls) * bs, parts
