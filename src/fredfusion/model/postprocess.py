"""Decoding of raw detector maps, batched non-maximum suppression and box rescaling."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torchvision.ops import batched_nms

from fredfusion.spec import NMS_IOU


@lru_cache(maxsize=32)
def _grid(ny: int, nx: int, device: torch.device, dtype: torch.dtype, inference: bool) -> torch.Tensor:
    """Cell corner coordinates ``(1, 1, ny, nx, 2)`` as ``(x, y)``; cached per shape/device/dtype/mode."""
    ys = torch.arange(ny, device=device, dtype=dtype)
    xs = torch.arange(nx, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), -1).view(1, 1, ny, nx, 2)


def decode(preds: list[torch.Tensor], anchors: torch.Tensor, strides: Sequence[int]) -> torch.Tensor:
    """Decode raw maps into ``(B, N, 5 + nc)`` rows ``cx, cy, w, h`` (input pixels), objectness, class probs.

    ``preds`` are ``(B, A, ny, nx, 5 + nc)`` logits per level, ``anchors`` ``(levels, A, 2)`` in input
    pixels. ``xy = (sigmoid * 2 - 0.5 + cell) * stride``, ``wh = (sigmoid * 2) ** 2 * anchor``; rows are
    ordered level, anchor, row, column. Computed in float32.
    """
    if len(preds) != len(strides) or len(preds) != anchors.shape[0]:
        raise ValueError(
            f"decode got {len(preds)} maps, {len(strides)} strides and {anchors.shape[0]} anchor levels"
        )
    out = []
    inference = torch.is_inference_mode_enabled()
    for i, p in enumerate(preds):
        if p.ndim != 5 or p.shape[1] != anchors.shape[1] or p.shape[-1] < 6:
            raise ValueError(
                f"prediction map {i} must have shape (B, {anchors.shape[1]}, ny, nx, 5 + nc), "
                f"got {tuple(p.shape)}"
            )
        b, na, ny, nx, no = p.shape
        s = p.float().sigmoid()
        grid = _grid(ny, nx, s.device, s.dtype, inference)
        anc = anchors[i].to(device=s.device, dtype=s.dtype).view(1, na, 1, 1, 2)
        xy = (s[..., :2] * 2.0 - 0.5 + grid) * float(strides[i])
        wh = (s[..., 2:4] * 2.0) ** 2 * anc
        out.append(torch.cat((xy, wh, s[..., 4:]), -1).view(b, -1, no))
    return torch.cat(out, 1)


def non_max_suppression(
    decoded: torch.Tensor,
    conf: float = 0.001,
    iou: float = NMS_IOU,
    max_det: int = 300,
    max_nms: int = 1000,
    *,
    multi_label: bool = False,
    agnostic: bool = False,
) -> list[torch.Tensor]:
    """Class-aware NMS over a whole batch; returns per image ``(n, 6)`` ``[x1, y1, x2, y2, score, class]``.

    ``decoded`` is :func:`decode` output. Score = objectness x class probability (the best class, or
    every class above ``conf`` with ``multi_label``). Per image, at most ``max_nms`` highest-scoring
    candidates above ``conf`` enter one ``batched_nms`` call for the batch (group = image x classes +
    class, or image only with ``agnostic``), and at most ``max_det`` survivors are kept, best first.

    At ``conf`` 0.001 nearly every anchor of a YOLO model passes (15,120 per 384x640 image), and NMS
    costs grow with the square of its input: the default ``max_nms`` of 1000 per image cut CPU NMS from
    430 to 2.8 ms per image with mAP unchanged (docs/PERFORMANCE.md).
    """
    if decoded.ndim != 3 or decoded.shape[-1] < 6:
        raise ValueError(f"decoded must have shape (B, N, 5 + nc), got {tuple(decoded.shape)}")
    bsz, n, no = decoded.shape
    nc = no - 5
    x = decoded.float()
    scores = x[..., 5:] * x[..., 4:5]  # (B, N, nc)
    if multi_label:
        flat = scores.reshape(bsz, n * nc)
        k = min(max_nms, n * nc)
        top, top_idx = flat.topk(k, dim=1)
        box_idx, cls = top_idx // nc, top_idx % nc
    else:
        best, best_cls = scores.max(-1)
        k = min(max_nms, n)
        top, box_idx = best.topk(k, dim=1)
        cls = best_cls.gather(1, box_idx)
    img = torch.arange(bsz, device=x.device)[:, None].expand(bsz, k)
    keep = top > conf
    top, box_idx, cls, img = top[keep], box_idx[keep], cls[keep], img[keep]
    if top.numel() == 0:
        return [x.new_zeros((0, 6)) for _ in range(bsz)]
    cxcywh = x[img, box_idx, :4]
    boxes = torch.cat((cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2), 1)
    groups = img if agnostic else img * nc + cls
    kept = batched_nms(boxes, top, groups, iou)  # sorted by decreasing score
    img_k = img[kept]
    order = torch.sort(img_k, stable=True).indices  # group by image, keep score order within
    kept, img_k = kept[order], img_k[order]
    counts = torch.bincount(img_k, minlength=bsz)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kept.numel(), device=x.device) - starts[img_k]
    cap = rank < max_det
    kept, img_k = kept[cap], img_k[cap]
    dets = torch.cat((boxes[kept], top[kept, None], cls[kept, None].to(x.dtype)), 1)
    counts = torch.bincount(img_k, minlength=bsz)
    return list(dets.split(counts.tolist()))


def scale_boxes(
    boxes: torch.Tensor, pad: tuple[float, float], scale: float, clip: tuple[float, float] | None = None
) -> torch.Tensor:
    """Map input-pixel boxes back to the original image: ``(x - pad_x) / scale``, ``(y - pad_y) / scale``.

    ``boxes`` is ``(..., >= 4)`` with ``x1, y1, x2, y2`` first; further columns are kept. ``clip`` =
    ``(width, height)`` of the original image clips the result. Returns a new tensor.
    """
    if boxes.shape[-1] < 4:
        raise ValueError(f"boxes must have at least 4 columns, got shape {tuple(boxes.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    out = boxes.clone()
    xy = out[..., :4]
    xy[..., 0::2] = (xy[..., 0::2] - pad[0]) / scale
    xy[..., 1::2] = (xy[..., 1::2] - pad[1]) / scale
    if clip is not None:
        xy[..., 0::2] = xy[..., 0::2].clamp(0, clip[0])
        xy[..., 1::2] = xy[..., 1::2].clamp(0, clip[1])
    return out


#: Suppression rounds :func:`dense_nms` runs without looking at the result (see its docstring).
DENSE_NMS_ROUNDS = 16
#: Elements of the float IoU matrices built at once (chunks of images): 128 MiB each.
_IOU_CHUNK = 1 << 25


@dataclass
class DenseDetections:
    """Fixed-shape NMS result of a batch: every candidate (best first per image) and which are kept.

    ``boxes`` ``(B, K, 4)`` x1, y1, x2, y2 in input pixels, ``scores`` and ``classes`` (float) ``(B, K)``,
    ``valid`` ``(B, K)``: score above ``conf``; ``keep`` ``(B, K)``: kept by NMS and among the ``max_det``
    best of its image; ``converged`` (0-dim bool): the suppression reached its fixed point, so ``keep`` is
    exact (else :func:`settle` finishes it). Nothing in it needed the host to wait for the device.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor
    converged: torch.Tensor

    def rows(self) -> torch.Tensor:
        """``(B, K, 6)`` ``[x1, y1, x2, y2, score, class]`` of every candidate."""
        return torch.cat((self.boxes, self.scores[..., None], self.classes[..., None]), -1)


def _dense_candidates(
    decoded: torch.Tensor, conf: float, max_nms: int, multi_label: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's ``min(max_nms, N)`` best candidates as :func:`non_max_suppression` picks them:
    boxes ``(B, K, 4)``, scores, classes (float) and ``score > conf`` ``(B, K)``."""
    bsz, n, no = decoded.shape
    nc = no - 5
    x = decoded.float()
    scores = x[..., 5:] * x[..., 4:5]
    if multi_label:
        top, top_idx = scores.reshape(bsz, n * nc).topk(min(max_nms, n * nc), dim=1)
        box_idx, cls = top_idx // nc, top_idx % nc
    else:
        best, best_cls = scores.max(-1)
        top, box_idx = best.topk(min(max_nms, n), dim=1)
        cls = best_cls.gather(1, box_idx)
    cxcywh = x[..., :4].gather(1, box_idx[..., None].expand(-1, -1, 4))
    boxes = torch.cat((cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2), -1)
    return boxes, top, cls.to(x.dtype), top > conf


def _suppression(
    boxes: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor, iou: float, agnostic: bool
) -> torch.Tensor:
    """``(B, K, K)`` bool: candidate ``i`` suppresses ``j`` if it comes first (``i < j``), both are valid,
    they share the class (unless ``agnostic``) and their IoU exceeds ``iou``.

    The IoU is computed with torchvision's operations in its order, and compared as torchvision does
    on the device: with ``iou`` as a double on a CPU, as a float on a GPU.
    """
    bsz, k, _ = boxes.shape
    out = torch.empty((bsz, k, k), dtype=torch.bool, device=boxes.device)
    later = torch.ones((k, k), dtype=torch.bool, device=boxes.device).triu_(1)
    step = max(1, _IOU_CHUNK // max(k * k, 1))
    for s in range(0, bsz, step):
        x1, y1, x2, y2 = boxes[s : s + step].unbind(-1)
        area = (x2 - x1) * (y2 - y1)
        w = torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])
        h = torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])
        inter = w.clamp_min_(0.0) * h.clamp_min_(0.0)
        ovr = inter / (area[:, :, None] + area[:, None, :] - inter)
        over = ovr.double() > iou if boxes.device.type == "cpu" else ovr > iou
        v = valid[s : s + step]
        over &= later & v[:, :, None] & v[:, None, :]
        if not agnostic:
            c = classes[s : s + step]
            over &= c[:, :, None] == c[:, None, :]
        out[s : s + step] = over
    return out


def _suppress(
    sup: torch.Tensor, valid: torch.Tensor, rounds: int, kept: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounds`` steps of ``kept[j] = valid[j] and no kept i suppresses j`` (from ``kept``, default
    ``valid``); returns ``kept`` and, as a 0-dim bool tensor, whether the last step changed nothing
    (then ``kept`` is greedy NMS's result)."""
    kept = valid if kept is None else kept
    prev = kept
    for _ in range(max(rounds, 1)):
        prev, kept = kept, valid & ~(sup & kept[:, :, None]).any(1)
    return kept, (kept == prev).all()


def _within_max_det(kept: torch.Tensor, max_det: int) -> torch.Tensor:
    """``kept`` limited to the ``max_det`` first kept candidates of each image."""
    return kept & (kept.cumsum(1) <= max_det)


def dense_nms(
    decoded: torch.Tensor,
    conf: float = 0.001,
    iou: float = NMS_IOU,
    max_det: int = 300,
    max_nms: int = 1000,
    *,
    multi_label: bool = False,
    agnostic: bool = False,
    rounds: int = DENSE_NMS_ROUNDS,
) -> DenseDetections:
    """:func:`non_max_suppression` in fixed shapes, so that the host never waits for the device.

    The same candidates (each image's ``max_nms`` best), the same IoU test and the same greedy rule
    (best first, a kept candidate removes the later ones of its class it overlaps by more than ``iou``),
    solved as a fixed point: ``kept[j] = valid[j] and no kept i < j suppresses j``. After ``t`` steps from
    ``kept = valid`` the first ``t`` candidates are final, and a step that changes nothing means all are,
    so the result equals the greedy one (Cluster-NMS, Zheng et al. 2020); chains of suppression are
    short, and ``rounds`` steps run without looking. ``converged`` says whether the last one changed
    nothing; :func:`settle` runs to the end otherwise. Candidates with equal scores keep ``topk``'s
    order (torchvision's sort does not promise one). Costs ``B * K * K`` bools of device memory.
    """
    if decoded.ndim != 3 or decoded.shape[-1] < 6:
        raise ValueError(f"decoded must have shape (B, N, 5 + nc), got {tuple(decoded.shape)}")
    boxes, scores, classes, valid = _dense_candidates(decoded, conf, max_nms, multi_label)
    kept, converged = _suppress(_suppression(boxes, classes, valid, iou, agnostic), valid, rounds)
    return DenseDetections(boxes, scores, classes, valid, _within_max_det(kept, max_det), converged)


def settle(dets: DenseDetections, iou: float, max_det: int, *, agnostic: bool = False) -> DenseDetections:
    """``dets`` with the suppression run to its fixed point: exact, and waits for the device (the rare
    batch whose chains of suppression are longer than :func:`dense_nms`'s rounds)."""
    if bool(dets.converged):
        return dets
    sup = _suppression(dets.boxes, dets.classes, dets.valid, iou, agnostic)
    kept, done = _suppress(sup, dets.valid, DENSE_NMS_ROUNDS)
    while not bool(done):  # step t fixes candidate t: at most K + 1 steps in all
        kept, done = _suppress(sup, dets.valid, DENSE_NMS_ROUNDS, kept)
    return dataclasses.replace(dets, keep=_within_max_det(kept, max_det), converged=done)
