"""Decoding of raw detector maps, batched non-maximum suppression and box rescaling."""

from __future__ import annotations

from collections.abc import Sequence
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
