"""Batched training augmentation in torch (GPU, also CPU), identical geometry for RGB and event frames.

Both modalities of a pair go through one sampling pass: their channels are stacked into one
float source holding ``pixel - fill`` (fill: 114 grey for RGB, 0 for events) and every output
pixel is filled by bilinear ``F.grid_sample`` with zero padding, i.e. padding with the fill. With
Mosaic on, every sample gets a 2x2 canvas (tile 0: its own image; tiles 1-3: three other batch
images for the samples drawn for Mosaic, empty = fill for the others) and one warp from it, so
Mosaic + affine is a single sampling pass per output image.

Geometry per sample is one affine matrix (fit to the output size, Mosaic centre, scale, rotation,
shear, translation, horizontal flip); boxes follow the same matrix (4 corners, min/max), are
clipped to the output and marked invalid when too small or mostly clipped. MixUp blends a sample
with another augmented sample of the batch (same lambda for both modalities, targets of both kept).
HSV jitter touches RGB only. Random decisions are drawn per sample as tensors, from ``generator``
when given (reproducible), and nothing loops over images or boxes in Python.

No step reads a device value on the host: every tensor shape depends only on the batch size, the
number of target rows ``M`` and the configuration. Mosaic partners and MixUp partners are drawn as
permutations of the batch (each image is partner ``k`` of exactly one sample), so every target
has a fixed number of copies in the output (1 + 3 with Mosaic, x2 with MixUp); copies that are
not used, dropped or invalid stay in place as :data:`INVALID_ROW` (see :func:`valid_targets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fredfusion.spec import FRAME_KINDS, check_hw

__all__ = [
    "INVALID_ROW",
    "AugmentConfig",
    "augment_batch",
    "hsv_to_rgb",
    "letterbox_batch",
    "letterbox_params",
    "rgb_to_hsv",
    "target_rows",
    "valid_targets",
]

RGB_FILL = 114
"""Padding value of RGB frames (uint8 scale)."""
EVENT_FILL = 0
"""Padding value of event frames (uint8 scale)."""
MIXUP_BETA = 32
"""MixUp lambda ~ Beta(MIXUP_BETA, MIXUP_BETA) (integer: drawn exactly as a ratio of Gamma sums)."""
INVALID_ROW = (-1.0, -1.0, 0.0, 0.0, 0.0, 0.0)
"""A target row that holds no box (image -1, class -1, empty box); the loss never matches it."""


@dataclass
class AugmentConfig:
    """Training augmentation settings (probabilities per sample; ranges symmetric around identity)."""

    mosaic: bool = True
    mosaic_prob: float = 0.5
    mixup: bool = True
    mixup_prob: float = 0.5
    degrees: float = 0.0  # rotation in [-degrees, degrees]
    translate: float = 0.1  # shift in [-translate, translate] x output size
    scale: float = 0.5  # random scale in [1-scale, 1+scale]
    shear: float = 0.0  # shear angles in [-shear, shear] degrees
    fliplr: float = 0.5
    hsv_h: float = 0.015  # hue shift in [-hsv_h, hsv_h] of the full hue circle (RGB only)
    hsv_s: float = 0.7  # saturation gain in [1-hsv_s, 1+hsv_s] (RGB only)
    hsv_v: float = 0.4  # value gain in [1-hsv_v, 1+hsv_v] (RGB only)
    min_box_size: float = 2.0  # pixels at the output size; smaller boxes are marked invalid
    min_box_area_ratio: float = 0.1  # invalid when more than 90% of the area was clipped


def valid_targets(targets: Tensor) -> Tensor:
    """The rows of ``targets`` ``(K, 6)`` that hold a box (image index and class >= 0).

    For host-side consumers (drawing, statistics): the result has a data-dependent size, so on a
    GPU this waits for the device. The training step itself passes all rows to the loss.
    """
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(f"valid_targets: targets must have shape (K, 6), got {tuple(targets.shape)}")
    return targets[(targets[:, 0] >= 0) & (targets[:, 1] >= 0)]


def target_rows(m: int, batch: int, cfg: AugmentConfig, special: bool = True) -> int:
    """Number of target rows :func:`augment_batch` returns for ``m`` input rows (fixed by the sizes)."""
    copies = 4 if cfg.mosaic and special else 1
    return m * copies * (2 if cfg.mixup and special and batch > 1 else 1)


# --------------------------------------------------------------------------------------------------
# input checks


def _check_images(rgb: Tensor | None, event: Tensor | None) -> tuple[int, int, int, torch.device]:
    """Validate the image pair; return (B, h, w, device)."""
    if rgb is None and event is None:
        raise ValueError("augment: rgb and event are both None; at least one modality is needed")
    shape = None
    for name, x in zip(FRAME_KINDS, (rgb, event)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"augment: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.uint8:
            raise ValueError(f"augment: {name} must be uint8 (B, 3, h, w), got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"augment: {name} must have shape (B, 3, h, w), got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"augment: {name} is empty, shape {tuple(x.shape)}")
        if shape is None:
            shape = tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise ValueError(f"augment: rgb shape {shape} and event shape {tuple(x.shape)} differ")
    if rgb is not None and event is not None and rgb.device != event.device:
        raise ValueError(f"augment: rgb is on {rgb.device} but event is on {event.device}")
    assert shape is not None
    device = (rgb if rgb is not None else event).device  # type: ignore[union-attr]
    return shape[0], shape[2], shape[3], device


def _check_out_hw(out_hw: tuple[int, int]) -> tuple[int, int]:
    return check_hw(out_hw, "augment: out_hw")


def _rows_ok(targets: Tensor, batch: int) -> Tensor:
    """``(M,)`` bool: the row has a whole image index in ``[0, batch)`` and a class >= 0."""
    img = targets[:, 0]
    return (img >= 0) & (img <= batch - 1) & (img == img.round()) & (targets[:, 1] >= 0)


def _check_targets(targets: Tensor, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Validate targets (M, 6) ``[image, class, x1, y1, x2, y2]``; return them as float32 on ``device``
    and the ``(M,)`` mask of usable rows.

    Rows with a negative class (e.g. :data:`INVALID_ROW`) are placeholders and stay invalid. Values
    are checked (with a clear error) only for targets in host memory: checking device values would
    make the host wait for the device, so there a bad image index just makes the row invalid.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"augment: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(
            "augment: targets must have shape (M, 6) [image, class, x1, y1, x2, y2], "
            f"got {tuple(targets.shape)}"
        )
    if targets.device.type == "cpu" and targets.shape[0]:
        t = targets.detach().to(torch.float64)
        real = ~(t[:, 1] < 0)  # placeholder rows may carry any image index
        img = t[real, 0]
        if img.numel():
            lo_v, hi_v = float(img.min()), float(img.max())
            if lo_v < 0 or hi_v > batch - 1 or not math.isfinite(lo_v + hi_v):
                raise ValueError(
                    f"augment: target image indices must lie in [0, {batch - 1}] for a batch of {batch}, "
                    f"got range [{lo_v:g}, {hi_v:g}]"
                )
            if bool((img != img.round()).any()):
                raise ValueError("augment: target image indices (column 0) must be whole numbers")
    targets = targets.to(device=device, dtype=torch.float32)
    return targets, _rows_ok(targets, batch)


def _mark_invalid(rows: Tensor, keep: Tensor) -> Tensor:
    """Replace the rows of ``rows`` ``(N, 6)`` where ``keep`` is False by :data:`INVALID_ROW`."""
    k = keep.unsqueeze(1)
    return torch.cat([torch.where(k, rows[:, :2], -1.0), torch.where(k, rows[:, 2:], 0.0)], 1)


# --------------------------------------------------------------------------------------------------
# geometry


def letterbox_params(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, float, float]:
    """Scale and centred padding that fit an ``in_hw`` image into ``out_hw``: ``(scale, pad_x, pad_y)``.

    ``scale = min(W / w, H / h)``; pads are whole pixels, so at scale 1 pixels are copied.
    A point maps as ``x_out = x_in * scale + pad_x`` and back as ``(x_out - pad_x) / scale``.
    """
    h, w = in_hw
    out_h, out_w = out_hw
    scale = min(out_w / w, out_h / h)
    pad_x = float(math.floor((out_w - w * scale) / 2 + 0.5))
    pad_y = float(math.floor((out_h - h * scale) / 2 + 0.5))
    return scale, pad_x, pad_y


def _with_fill(rgb: Tensor | None, event: Tensor | None) -> list[tuple[Tensor, int]]:
    """The given modalities, RGB first, each with its fill value."""
    return [(x, v) for x, v in ((rgb, RGB_FILL), (event, EVENT_FILL)) if x is not None]


def _stack_source(rgb: Tensor | None, event: Tensor | None) -> tuple[Tensor, tuple[float, ...]]:
    """Stack the modalities into one float32 source ``(B, C, h, w)`` holding ``pixel - fill`` (so that
    zero padding of ``grid_sample`` means "fill"); return it with the fill value of each modality."""
    parts = _with_fill(rgb, event)
    batch, _, h, w = parts[0][0].shape
    device = parts[0][0].device
    src = torch.empty((batch, 3 * len(parts), h, w), dtype=torch.float32, device=device)
    for k, (x, v) in enumerate(parts):
        part = src[:, 3 * k : 3 * k + 3]
        part.copy_(x)
        if v:
            part.sub_(float(v))
    return src, tuple(float(v) for _, v in parts)


def _mosaic_canvas(
    rgb: Tensor | None, event: Tensor | None, tiles: Tensor, used: Tensor
) -> tuple[Tensor, tuple[float, ...]]:
    """2x2 Mosaic canvases of every sample, float32 ``(B, C, 2h, 2w)`` holding ``pixel - fill``.

    Tile 0 is the sample's own image, tile ``k = 2 * row + col`` (1-3) is batch image
    ``tiles[i, k]`` where ``used[i]`` and empty (fill, i.e. 0) elsewhere. Tiles are gathered as uint8
    (an extra image of fill values stands for "empty") and converted once.
    """
    parts = _with_fill(rgb, event)
    batch, _, h, w = parts[0][0].shape
    dev = parts[0][0].device
    chans = 3 * len(parts)
    src = torch.empty((batch + 1, chans, h, w), dtype=torch.uint8, device=dev)
    for k, (x, v) in enumerate(parts):
        src[:batch, 3 * k : 3 * k + 3] = x
        src[batch, 3 * k : 3 * k + 3] = v
    idx = torch.where(used.view(batch, 1), tiles, batch)
    idx[:, 0] = tiles[:, 0]
    gathered = src.index_select(0, idx.reshape(-1)).view(batch, 2, 2, chans, h, w)  # (B, row, col, ...)
    canvas = torch.empty((batch, chans, 2, h, 2, w), dtype=torch.float32, device=dev)
    canvas.copy_(gathered.permute(0, 3, 1, 4, 2, 5))  # cast-copy, then subtract (faster than a mixed sub)
    for k, (_, v) in enumerate(parts):
        if v:
            canvas[:, 3 * k : 3 * k + 3].sub_(float(v))
    return canvas.view(batch, chans, 2 * h, 2 * w), tuple(float(v) for _, v in parts)


def _warp(src: Tensor, inv: Tensor, out_hw: tuple[int, int], canvas: bool = False) -> Tensor:
    """Bilinear warp of each sample's source into ``(B, C, H, W)`` (``pixel - fill`` scale).

    ``src``: ``(B, C, h, w)`` from :func:`_stack_source`, or with ``canvas`` the ``(B, C, 2h, 2w)``
    canvases of :func:`_mosaic_canvas`; ``inv``: ``(B, 2, 3)`` maps output pixel coordinates to
    pixel coordinates of the own image (= canvas tile 0; continuous, pixel ``j`` covers
    ``[j, j+1)``). Zero padding outside the source means "fill". A canvas whose tiles 1-3 are
    empty gives the same image as the own image alone.
    """
    batch, _, h, w = src.shape
    if canvas:
        h, w = h // 2, w // 2
    out_h, out_w = out_hw
    dev = src.device
    inv = inv.to(device=dev, dtype=torch.float64)
    # theta: normalized output coords -> normalized coords of the own image (align_corners=False)
    sx, sy = out_w / 2, out_h / 2
    m = torch.stack(
        [inv[:, :, 0] * sx, inv[:, :, 1] * sy, inv[:, :, 0] * sx + inv[:, :, 1] * sy + inv[:, :, 2]], 2
    )
    theta = torch.stack([m[:, 0] * (2 / w), m[:, 1] * (2 / h)], 1).to(torch.float32)
    theta[:, :, 2] -= 1.0
    un = (torch.arange(out_w, device=dev, dtype=torch.float32) * 2 + 1) / out_w - 1
    vn = (torch.arange(out_h, device=dev, dtype=torch.float32) * 2 + 1) / out_h - 1
    t = theta.view(batch, 6, 1, 1).unbind(1)
    grid = torch.empty((batch, out_h, out_w, 2), dtype=torch.float32, device=dev)
    grid[..., 0] = t[0] * un.view(1, 1, -1) + t[1] * vn.view(1, -1, 1) + t[2]
    grid[..., 1] = t[3] * un.view(1, 1, -1) + t[4] * vn.view(1, -1, 1) + t[5]
    if canvas:  # the canvas is twice the size of a tile: normalized canvas coord = (tile coord + 1) / 2 - 1
        grid.mul_(0.5).sub_(0.5)
    return _sample(src, grid)


def _sample(src: Tensor, grid: Tensor) -> Tensor:
    """``grid_sample``: bilinear, zero padding, pixel-area convention (align_corners=False)."""
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _to_outputs(
    warped: Tensor, fill: tuple[float, ...], has_rgb: bool, has_event: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Split ``(B, C, H, W)`` (``pixel - fill``) into ``(B, 3, H, W)`` float32 in [0, 1] per modality."""
    outs = [(warped[:, 3 * k : 3 * k + 3] + v).div_(255.0).clamp_(0.0, 1.0) for k, v in enumerate(fill)]
    if has_rgb and has_event:
        return outs[0], outs[1]
    return (outs[0], None) if has_rgb else (None, outs[0])


def _invert(mat: Tensor) -> Tensor:
    """Invert a batch of 2x3 affine matrices."""
    a, b, tx = mat[:, 0].unbind(1)
    c, d, ty = mat[:, 1].unbind(1)
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    itx = -(ia * tx + ib * ty)
    ity = -(ic * tx + id_ * ty)
    return torch.stack([torch.stack([ia, ib, itx], 1), torch.stack([ic, id_, ity], 1)], 1)


def _transform_boxes(boxes: Tensor, mat: Tensor) -> Tensor:
    """Apply per-row 2x3 matrices ``(N, 2, 3)`` to boxes ``(N, 4)``: bounding box of the 4 corners."""
    x1, y1, x2, y2 = boxes.unbind(1)
    xs = torch.stack([x1, x2, x1, x2], 1)
    ys = torch.stack([y1, y1, y2, y2], 1)
    m = mat.unsqueeze(-1)
    tx = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
    ty = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    return torch.stack([tx.amin(1), ty.amin(1), tx.amax(1), ty.amax(1)], 1)


def letterbox_batch(
    rgb: Tensor | None,
    event: Tensor | None,
    out_hw: tuple[int, int],
    targets: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, tuple[float, float], float]:
    """Fit frames into ``out_hw`` without augmentation (validation / evaluation).

    Scales to fit (see :func:`letterbox_params`) and pads centred with 114/255 grey (RGB) and
    0 (event). Returns ``(rgb, event, targets, (pad_x, pad_y), scale)``: float32 ``(B, 3, H, W)``
    in [0, 1] (None where the input was None), targets mapped to input pixels, same rows in the
    same order, rows that hold no box as :data:`INVALID_ROW` (None if not given); a point in
    input pixels maps back to store pixels as ``(x - pad_x) / scale``.
    """
    batch, h, w, device = _check_images(rgb, event)
    out_h, out_w = _check_out_hw(out_hw)
    scale, pad_x, pad_y = letterbox_params((h, w), (out_h, out_w))
    src, fill = _stack_source(rgb, event)
    inv = torch.zeros((batch, 2, 3), dtype=torch.float64, device=device)
    inv[:, 0, 0] = inv[:, 1, 1] = 1 / scale
    inv[:, 0, 2] = -pad_x / scale
    inv[:, 1, 2] = -pad_y / scale
    warped = _warp(src, inv, (out_h, out_w))
    out_rgb, out_event = _to_outputs(warped, fill, rgb is not None, event is not None)
    out_targets = None
    if targets is not None:
        t, ok = _check_targets(targets, batch, device)
        boxes = t[:, 2:6] * scale
        boxes[:, 0::2] += pad_x
        boxes[:, 1::2] += pad_y
        out_targets = _mark_invalid(torch.cat([t[:, :2], boxes], 1), ok)
    return out_rgb, out_event, out_targets, (pad_x, pad_y), scale


# --------------------------------------------------------------------------------------------------
# colour


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB ``(B, 3, H, W)`` in [0, 1] to HSV ``(B, 3, H, W)``, all channels in [0, 1] (hue: turns)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    delta = maxc - x.amin(1)
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    hue = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    return torch.stack([hue, s, maxc], 1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV ``(B, 3, H, W)`` (as produced by :func:`rgb_to_hsv`) back to RGB in [0, 1]."""
    hue, s, v = x.unbind(1)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + hue.unsqueeze(1) * 6.0, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    vu = v.unsqueeze(1)
    return vu - vu * s.unsqueeze(1) * ramp


def _hsv_jitter(rgb: Tensor, gains: Tensor) -> Tensor:
    """Per-sample hue shift (turns), saturation gain and value gain ``gains`` ``(B, 3)`` on RGB in
    [0, 1]; same result as ``hsv_to_rgb`` of the adjusted ``rgb_to_hsv``, in fewer passes."""
    g = gains.to(rgb.dtype).view(-1, 3, 1, 1)
    maxc, arg = rgb.max(1, keepdim=True)
    delta = maxc - rgb.amin(1, keepdim=True)
    # hue in sextants: (g - b, b - r, r - g)[argmax] / delta + 2 * argmax
    diff = rgb.roll(-1, 1) - rgb.roll(-2, 1)
    hue6 = diff.gather(1, arg).div_(delta.clamp_min(1e-12)).add_(arg.to(rgb.dtype) * 2).add_(g[:, 0:1] * 6)
    sat = (delta / maxc.clamp_min(1e-12)).mul_(g[:, 1:2]).clamp_(0.0, 1.0)
    val = (maxc * g[:, 2:3]).clamp_(0.0, 1.0)
    offsets = torch.arange(5.0, 0.0, -2.0, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    k = torch.remainder(hue6 + offsets, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (val - ramp.mul_(val * sat)).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# augmentation


class _Draw:
    """Random draws from one generator (on its device, moved to the image device)."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.gen = generator
        self.src = generator.device if generator is not None else device
        self.device = device

    def uniform(self, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
        r = torch.rand(shape, generator=self.gen, device=self.src, dtype=torch.float64)
        return (r * (hi - lo) + lo).to(self.device)

    def bernoulli(self, n: int, p: float) -> Tensor:
        return self.uniform((n,), 0.0, 1.0) < p

    def randint(self, shape: tuple[int, ...], high: int) -> Tensor:
        return torch.randint(0, high, shape, generator=self.gen, device=self.src).to(self.device)

    def beta_sym(self, n: int, a: int) -> Tensor:
        """Beta(a, a) for integer ``a``: ratio of two sums of ``a`` Exp(1) draws (Gamma(a) each)."""
        e = torch.empty((n, 2, a), device=self.src, dtype=torch.float64)
        e.exponential_(generator=self.gen)
        g = e.sum(2)
        return (g[:, 0] / g.sum(1)).to(self.device)


def _cyclic_partners(draw: _Draw, batch: int, n: int) -> tuple[Tensor, Tensor]:
    """``n`` partner maps of the batch, each a permutation, and their inverses, both ``(n, B)`` long.

    Samples are put in a random cyclic order; partner map ``k`` sends a sample to the one ``off_k``
    places further on. The offsets are distinct and non-zero when ``B > n`` (so a sample's partners
    are other images, all different), drawn with replacement from ``1 .. B-1`` for smaller batches
    and 0 (the own image) for ``B == 1``. ``inverse[k, j]`` is the sample whose partner ``k`` is ``j``.
    """
    dev = draw.device
    order = draw.uniform((batch,), 0.0, 1.0).argsort()
    if batch > n:
        off = draw.uniform((batch - 1,), 0.0, 1.0).argsort()[:n] + 1
    elif batch > 1:
        off = draw.randint((n,), batch - 1) + 1
    else:
        off = torch.zeros(n, dtype=torch.long, device=dev)
    pos = order.argsort().unsqueeze(0)  # place of each sample in the cycle
    off = off.unsqueeze(1)
    return order[(pos + off) % batch], order[(pos - off) % batch]


@dataclass
class _Samples:
    """The random decisions of one :func:`augment_batch` call, one entry per sample (on the image device)."""

    use_mosaic: Tensor  # (B,) bool
    partners: Tensor  # (3, B): the batch images in Mosaic tiles 1-3
    partner_of: Tensor  # (3, B): inverse maps, the sample whose tile k holds image j
    centre: Tensor  # (B, 2): Mosaic centre in units of (w, h) of one tile
    scale: Tensor  # (B,)
    angle: Tensor  # (B,) radians
    shear: Tensor  # (B, 2) tangents
    shift: Tensor  # (B, 2) in units of the output size
    flip: Tensor  # (B,) bool
    use_mixup: Tensor  # (B,) bool
    mix_partner: Tensor  # (B,): the sample blended in
    mixed_into: Tensor  # (B,): the sample this one is blended into
    lam: Tensor  # (B,) MixUp weight of the own image
    hsv_gains: Tensor  # (B, 3): hue shift, saturation gain, value gain


def _draw_samples(draw: _Draw, batch: int, cfg: AugmentConfig, mosaic: bool, mixup: bool) -> _Samples:
    """Draw every per-sample decision, always all of them and in this order (same stream whatever
    is switched off); ``mosaic`` / ``mixup`` False make every ``use_*`` False."""
    use_mosaic = draw.bernoulli(batch, cfg.mosaic_prob) & mosaic
    partners, partner_of = _cyclic_partners(draw, batch, 3)
    centre = draw.uniform((batch, 2), 0.5, 1.5)
    scale = draw.uniform((batch,), 1.0 - cfg.scale, 1.0 + cfg.scale)
    angle = draw.uniform((batch,), -cfg.degrees, cfg.degrees) * (math.pi / 180.0)
    shear = (draw.uniform((batch, 2), -cfg.shear, cfg.shear) * (math.pi / 180.0)).tan()
    shift = draw.uniform((batch, 2), -cfg.translate, cfg.translate)
    flip = draw.bernoulli(batch, cfg.fliplr)
    use_mixup = draw.bernoulli(batch, cfg.mixup_prob) & mixup
    mix_partner, mixed_into = (x[0] for x in _cyclic_partners(draw, batch, 1))
    lam = draw.beta_sym(batch, MIXUP_BETA)
    hsv_gains = torch.stack(
        [
            draw.uniform((batch,), -cfg.hsv_h, cfg.hsv_h),
            draw.uniform((batch,), 1.0 - cfg.hsv_s, 1.0 + cfg.hsv_s),
            draw.uniform((batch,), 1.0 - cfg.hsv_v, 1.0 + cfg.hsv_v),
        ],
        1,
    )
    return _Samples(
        use_mosaic,
        partners,
        partner_of,
        centre,
        scale,
        angle,
        shear,
        shift,
        flip,
        use_mixup,
        mix_partner,
        mixed_into,
        lam,
        hsv_gains,
    )


def _affine(s: _Samples, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """One float64 affine matrix ``(B, 2, 3)`` per sample: store (or canvas tile 0) pixels -> output pixels.

    ``base(p) = r * p + q`` fits the source to the output (letterbox for a single image, a window
    around the Mosaic centre for a canvas); ``L = flip @ shear @ rotation * scale`` acts around the
    output centre ``o``; then the random shift ``t``: ``out = L @ (base(p) - o) + o + t``.
    """
    (h, w), (out_h, out_w) = in_hw, out_hw
    batch = s.scale.shape[0]
    r, pad_x, pad_y = letterbox_params((h, w), (out_h, out_w))
    ox, oy = out_w / 2, out_h / 2
    q_o = torch.stack(  # q - o
        [
            torch.where(s.use_mosaic, s.centre[:, 0] * (-r * w), pad_x - ox),
            torch.where(s.use_mosaic, s.centre[:, 1] * (-r * h), pad_y - oy),
        ],
        1,
    )
    o_t = torch.stack([s.shift[:, 0] * out_w + ox, s.shift[:, 1] * out_h + oy], 1)  # o + t
    cos, sin = s.angle.cos(), s.angle.sin()
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    ones = torch.ones(batch, dtype=torch.float64, device=s.scale.device)
    shr = torch.stack([torch.stack([ones, s.shear[:, 0]], 1), torch.stack([s.shear[:, 1], ones], 1)], 1)
    lin = shr @ rot * s.scale.view(batch, 1, 1)
    lin[:, 0] = torch.where(s.flip.unsqueeze(1), -lin[:, 0], lin[:, 0])
    offset = (lin @ q_o.unsqueeze(-1)).squeeze(-1) + o_t
    return torch.cat([lin * r, offset.unsqueeze(-1)], 2)


def _warp_samples(
    rgb: Tensor | None, event: Tensor | None, s: _Samples, fwd: Tensor, out_hw: tuple[int, int], mosaic: bool
) -> tuple[Tensor, tuple[float, ...]]:
    """One warp per sample by ``fwd`` from its Mosaic canvas (its own image only without Mosaic):
    ``(B, C, H, W)`` in ``pixel - fill`` and the fill of each modality."""
    if mosaic:
        batch = s.partners.shape[1]
        tiles = torch.cat([torch.arange(batch, device=fwd.device).view(1, batch), s.partners], 0).t()
        src, fill = _mosaic_canvas(rgb, event, tiles, s.use_mosaic)
    else:
        src, fill = _stack_source(rgb, event)
    return _warp(src, _invert(fwd), out_hw, canvas=mosaic), fill


def _box_rows(
    targets: Tensor,
    row_ok: Tensor,
    s: _Samples,
    fwd: Tensor,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    cfg: AugmentConfig,
    mosaic: bool,
) -> tuple[Tensor, Tensor]:
    """Target rows in output pixels, a fixed number of copies per input row, and the mask of those kept.

    Copy 0 is the own image (tile 0 of its own sample); with Mosaic copy ``k`` is tile ``k`` of the
    sample whose partner ``k`` the image is. Copies not shown, boxes too small or mostly clipped are
    not kept (they stay in place, to be marked invalid).
    """
    (h, w), (out_h, out_w) = in_hw, out_hw
    batch, m = s.scale.shape[0], targets.shape[0]
    img = targets[:, 0].nan_to_num(nan=0.0).clamp(0, batch - 1).long()
    if mosaic:
        sample = torch.cat([img.view(1, m), s.partner_of.gather(1, img.view(1, m).expand(3, m))], 0)
        shown = torch.cat([row_ok.view(1, m), s.use_mosaic[sample[1:]] & row_ok.view(1, m)], 0)
        k = torch.arange(4, device=targets.device, dtype=torch.float32).view(4, 1)
        dx, dy = (k % 2) * w, (k // 2) * h
        boxes = targets[:, 2:6].unsqueeze(0) + torch.stack([dx, dy, dx, dy], 2)  # (4, M, 4)
    else:
        sample, shown, boxes = img.view(1, m), row_ok.view(1, m), targets[:, 2:6].unsqueeze(0)
    sample, shown, boxes = sample.reshape(-1), shown.reshape(-1), boxes.reshape(-1, 4)
    classes = targets[:, 1:2].repeat(4 if mosaic else 1, 1)
    boxes = _transform_boxes(boxes, fwd.to(torch.float32).index_select(0, sample))
    full_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0.0, out_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0.0, out_h)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (
        shown
        & (bw >= cfg.min_box_size)
        & (bh >= cfg.min_box_size)
        & (bw > 0)
        & (bh > 0)
        & (bw * bh >= cfg.min_box_area_ratio * full_area)
    )
    return torch.cat([sample.unsqueeze(1).to(torch.float32), classes, boxes], 1), keep


def _mixup(warped: Tensor, rows: Tensor, keep: Tensor, s: _Samples) -> tuple[Tensor, Tensor]:
    """Blend each sample drawn for MixUp with its partner, in place in ``warped``; return the rows
    with a copy of every row for the sample it is blended into, and their keep mask.

    Every sample lends its image and boxes to exactly one sample (``mixed_into``); the partner's
    weight is ``1 - lam``, exactly 0 (own image unchanged) where MixUp is off.
    """
    batch = warped.shape[0]
    weight = torch.where(s.use_mixup, 1.0 - s.lam, 0.0).to(warped.dtype).view(batch, 1, 1, 1)
    warped.lerp_(warped.index_select(0, s.mix_partner), weight)
    into = s.mixed_into.index_select(0, rows[:, 0].long())
    rows = torch.cat([rows, torch.cat([into.unsqueeze(1).to(torch.float32), rows[:, 1:]], 1)], 0)
    return rows, torch.cat([keep, keep & s.use_mixup.index_select(0, into)], 0)


def augment_batch(
    rgb: Tensor | None,
    event: Tensor | None,
    targets: Tensor,
    out_hw: tuple[int, int],
    cfg: AugmentConfig,
    special: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Augment a batch of uint8 frame pairs into model input at ``out_hw``.

    ``rgb`` / ``event``: uint8 ``(B, 3, h, w)`` (either may be None, same shape when both given);
    ``targets``: ``(M, 6)`` ``[image, class, x1, y1, x2, y2]`` in store pixels. Returns float32
    ``(B, 3, H, W)`` in [0, 1] per modality and targets ``(K, 6)`` in output pixels with
    ``K = target_rows(M, B, cfg, special)`` (M x 4 copies with Mosaic, x 2 with MixUp): the rows
    that hold a box come first, sorted by image index, then :data:`INVALID_ROW` rows (copies not
    shown, boxes too small or mostly clipped). ``special=False`` switches Mosaic and MixUp off.
    Both modalities get the same geometry and MixUp; HSV jitter applies to RGB only. Nothing here
    reads a device value on the host (targets in host memory are checked before the copy).
    """
    batch, h, w, device = _check_images(rgb, event)
    out_hw = _check_out_hw(out_hw)
    targets, row_ok = _check_targets(targets, batch, device)
    do_mosaic = bool(cfg.mosaic and special)
    do_mixup = bool(cfg.mixup and special and batch > 1)
    s = _draw_samples(_Draw(generator, device), batch, cfg, do_mosaic, do_mixup)
    fwd = _affine(s, (h, w), out_hw)
    warped, fill = _warp_samples(rgb, event, s, fwd, out_hw, do_mosaic)
    rows, keep = _box_rows(targets, row_ok, s, fwd, (h, w), out_hw, cfg, do_mosaic)
    if do_mixup:
        rows, keep = _mixup(warped, rows, keep, s)
    out_rgb, out_event = _to_outputs(warped, fill, rgb is not None, event is not None)
    del warped
    if out_rgb is not None and (cfg.hsv_h or cfg.hsv_s or cfg.hsv_v):  # HSV on RGB only
        out_rgb = _hsv_jitter(out_rgb, s.hsv_gains)
    # boxes first, sorted by image; invalid rows last
    order = torch.where(keep, rows[:, 0], float(batch)).argsort(stable=True)
    return out_rgb, out_event, _mark_invalid(rows, keep).index_select(0, order)
