"""Batched training augmentation in torch (GPU, also CPU), identical geometry for RGB and event frames.

Both modalities of a pair go through one sampling pass: their channels are stacked into one
float source holding ``pixel - fill`` (fill: 114 grey for RGB, 0 for events) and every output
pixel is filled by bilinear ``F.grid_sample`` with zero padding, i.e. padding with the fill. A
sample without Mosaic samples its own image; the samples with Mosaic (only those) get a 2x2 canvas
of batch images (their own and three others) and one warp from it, so Mosaic + affine is a single
sampling pass per output image.

Geometry per sample is one affine matrix (fit to the output size, Mosaic centre, scale, rotation,
shear, translation, horizontal flip); boxes follow the same matrix (4 corners, min/max), are
clipped to the output and dropped when too small or mostly clipped. MixUp blends a sample with
another augmented sample of the batch (same lambda for both modalities, targets of both kept).
HSV jitter touches RGB only. Random decisions are drawn per sample as tensors, from ``generator``
when given (reproducible), and nothing loops over images or boxes in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AugmentConfig",
    "augment_batch",
    "hsv_to_rgb",
    "letterbox_batch",
    "letterbox_params",
    "rgb_to_hsv",
]

RGB_FILL = 114
"""Padding value of RGB frames (uint8 scale)."""
EVENT_FILL = 0
"""Padding value of event frames (uint8 scale)."""
MIXUP_BETA = 32
"""MixUp lambda ~ Beta(MIXUP_BETA, MIXUP_BETA) (integer: drawn exactly as a ratio of Gamma sums)."""


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
    min_box_size: float = 2.0  # pixels at the output size; smaller boxes are dropped
    min_box_area_ratio: float = 0.1  # drop boxes that lost more than 90% of their area by clipping


# --------------------------------------------------------------------------------------------------
# input checks


def _check_images(rgb: Tensor | None, event: Tensor | None) -> tuple[int, int, int, torch.device]:
    """Validate the image pair; return (B, h, w, device)."""
    if rgb is None and event is None:
        raise ValueError("augment: rgb and event are both None; at least one modality is needed")
    shape = None
    for name, x in (("rgb", rgb), ("event", event)):
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
    try:
        out_h, out_w = (int(v) for v in out_hw)
    except (TypeError, ValueError):
        raise ValueError(f"augment: out_hw must be (height, width), got {out_hw!r}") from None
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"augment: out_hw must be positive, got {out_hw!r}")
    return out_h, out_w


def _check_targets(targets: Tensor, batch: int, device: torch.device) -> Tensor:
    """Validate targets (M, 6) ``[image, class, x1, y1, x2, y2]``; return float32 on ``device``."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"augment: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2 or targets.shape[1] != 6:
        raise ValueError(
            "augment: targets must have shape (M, 6) [image, class, x1, y1, x2, y2], "
            f"got {tuple(targets.shape)}"
        )
    targets = targets.to(device=device, dtype=torch.float32)
    if targets.shape[0]:
        lo, hi = targets[:, 0].aminmax()
        lo_v, hi_v = float(lo), float(hi)
        if lo_v < 0 or hi_v > batch - 1 or not math.isfinite(lo_v + hi_v):
            raise ValueError(
                f"augment: target image indices must lie in [0, {batch - 1}] for a batch of {batch}, "
                f"got range [{lo_v:g}, {hi_v:g}]"
            )
        if bool((targets[:, 0] != targets[:, 0].round()).any()):
            raise ValueError("augment: target image indices (column 0) must be whole numbers")
    return targets


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


def _stack_source(rgb: Tensor | None, event: Tensor | None) -> tuple[Tensor, Tensor]:
    """Stack the modalities into one float32 source ``(B, C, h, w)`` holding ``pixel - fill`` (so that
    zero padding of ``grid_sample`` means "fill"); return it with the fill values ``(C,)``."""
    parts = [(x, v) for x, v in ((rgb, RGB_FILL), (event, EVENT_FILL)) if x is not None]
    batch, _, h, w = parts[0][0].shape
    device = parts[0][0].device
    src = torch.empty((batch, 3 * len(parts), h, w), dtype=torch.float32, device=device)
    for k, (x, v) in enumerate(parts):
        torch.sub(x, float(v), out=src[:, 3 * k : 3 * k + 3])
    fill = torch.tensor([float(v) for _, v in parts for _ in range(3)], device=device)
    return src, fill


def _warp(src: Tensor, tiles: Tensor, inv: Tensor, out_hw: tuple[int, int], mosaic: Tensor | None) -> Tensor:
    """Bilinear warp of each sample's source into ``(B, C, H, W)`` (``pixel - fill`` scale).

    ``src``: ``(B, C, h, w)`` from :func:`_stack_source`; ``inv``: ``(B, 2, 3)`` maps output pixel
    coordinates to source pixel coordinates (continuous, pixel ``j`` covers ``[j, j+1)``). A sample
    without Mosaic reads its own image (zero padding = fill outside). For the samples flagged in
    ``mosaic`` (``(B,)`` bool, or None) the source is a 2x2 canvas ``(2h, 2w)`` whose tile
    ``2 * row + col`` is batch image ``tiles[i, 2 * row + col]`` (tile 0 = own image); canvases are
    built for those samples only.
    """
    batch, chans, h, w = src.shape
    out_h, out_w = out_hw
    dev = src.device
    inv = inv.to(device=dev, dtype=torch.float64)
    # theta: normalized output coords -> normalized coords of the own image (align_corners=False)
    sx, sy = out_w / 2, out_h / 2
    m = torch.stack(
        [inv[:, :, 0] * sx, inv[:, :, 1] * sy, inv[:, :, 0] * sx + inv[:, :, 1] * sy + inv[:, :, 2]], 2
    )
    theta = (m * torch.tensor([2 / w, 2 / h], dtype=torch.float64, device=dev).view(1, 2, 1)).to(
        torch.float32
    )
    theta[:, :, 2] -= 1.0
    un = (torch.arange(out_w, device=dev, dtype=torch.float32) * 2 + 1) / out_w - 1
    vn = (torch.arange(out_h, device=dev, dtype=torch.float32) * 2 + 1) / out_h - 1
    t = theta.view(batch, 6, 1, 1).unbind(1)
    grid = torch.empty((batch, out_h, out_w, 2), dtype=torch.float32, device=dev)
    grid[..., 0] = t[0] * un.view(1, 1, -1) + t[1] * vn.view(1, -1, 1) + t[2]
    grid[..., 1] = t[3] * un.view(1, 1, -1) + t[4] * vn.view(1, -1, 1) + t[5]
    n_mosaic = 0 if mosaic is None else int(mosaic.sum())
    if n_mosaic == 0:
        return _sample(src, grid)
    order = torch.argsort(mosaic.to(torch.int8), stable=True)  # type: ignore[union-attr]
    single, multi = order[: batch - n_mosaic], order[batch - n_mosaic :]
    canvas = torch.empty((n_mosaic, chans, 2 * h, 2 * w), dtype=src.dtype, device=dev)
    for k in range(4):  # four tile copies (each over all mosaic samples at once)
        row, col = divmod(k, 2)
        canvas[:, :, row * h : (row + 1) * h, col * w : (col + 1) * w] = src.index_select(0, tiles[multi, k])
    out = torch.empty((batch, chans, out_h, out_w), dtype=src.dtype, device=dev)
    # the canvas is twice the size of a tile: normalized canvas coord = (tile coord + 1) / 2 - 1
    out.index_copy_(0, multi, _sample(canvas, grid.index_select(0, multi).mul_(0.5).sub_(0.5)))
    if batch > n_mosaic:
        out.index_copy_(0, single, _sample(src.index_select(0, single), grid.index_select(0, single)))
    return out


def _sample(src: Tensor, grid: Tensor) -> Tensor:
    """``grid_sample``: bilinear, zero padding, pixel-area convention (align_corners=False)."""
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _to_outputs(
    warped: Tensor, fill: Tensor, has_rgb: bool, has_event: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Split ``(B, C, H, W)`` (``pixel - fill``) into ``(B, 3, H, W)`` float32 in [0, 1] per modality."""
    outs = [
        (warped[:, k : k + 3] + fill[k : k + 3].view(1, 3, 1, 1)).div_(255.0).clamp_(0.0, 1.0)
        for k in range(0, warped.shape[1], 3)
    ]
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
    in [0, 1] (None where the input was None), targets mapped to input pixels (None if not given);
    a point in input pixels maps back to store pixels as ``(x - pad_x) / scale``.
    """
    batch, h, w, device = _check_images(rgb, event)
    out_h, out_w = _check_out_hw(out_hw)
    scale, pad_x, pad_y = letterbox_params((h, w), (out_h, out_w))
    src, fill = _stack_source(rgb, event)
    inv = torch.tensor(
        [[1 / scale, 0.0, -pad_x / scale], [0.0, 1 / scale, -pad_y / scale]],
        dtype=torch.float64,
        device=device,
    ).expand(batch, 2, 3)
    tiles = torch.full((batch, 4), -1, dtype=torch.long, device=device)
    tiles[:, 0] = torch.arange(batch, device=device)
    warped = _warp(src, tiles, inv, (out_h, out_w), None)
    out_rgb, out_event = _to_outputs(warped, fill, rgb is not None, event is not None)
    out_targets = None
    if targets is not None:
        out_targets = _check_targets(targets, batch, device).clone()
        out_targets[:, [2, 4]] = out_targets[:, [2, 4]] * scale + pad_x
        out_targets[:, [3, 5]] = out_targets[:, [3, 5]] * scale + pad_y
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
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
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
    offsets = torch.tensor([5.0, 3.0, 1.0], device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
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


def _mosaic_partners(draw: _Draw, batch: int) -> Tensor:
    """Three other batch images per sample ``(B, 3)``: distinct when ``B >= 4``, else with replacement."""
    dev = draw.device
    if batch >= 4:
        keys = draw.uniform((batch, batch), 0.0, 1.0)
        keys.fill_diagonal_(2.0)  # own image last
        return keys.argsort(dim=1)[:, :3]
    own = torch.arange(batch, device=dev).view(batch, 1)
    if batch == 1:
        return own.expand(1, 3).clone()
    return (own + 1 + draw.randint((batch, 3), batch - 1)) % batch


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
    ``(B, 3, H, W)`` in [0, 1] per modality and targets ``(M', 6)`` in output pixels, sorted by
    image index. ``special=False`` switches Mosaic and MixUp off. Both modalities get the same
    geometry and MixUp; HSV jitter applies to RGB only.
    """
    batch, h, w, device = _check_images(rgb, event)
    out_h, out_w = _check_out_hw(out_hw)
    targets = _check_targets(targets, batch, device)
    draw = _Draw(generator, device)
    f64 = torch.float64

    # --- per-sample random decisions -------------------------------------------------------------
    use_mosaic = draw.bernoulli(batch, cfg.mosaic_prob) & (cfg.mosaic and special)
    partners = _mosaic_partners(draw, batch)
    centre = draw.uniform((batch, 2), 0.5, 1.5) * torch.tensor([w, h], dtype=f64, device=device)
    scale = draw.uniform((batch,), 1.0 - cfg.scale, 1.0 + cfg.scale)
    angle = draw.uniform((batch,), -cfg.degrees, cfg.degrees) * (math.pi / 180.0)
    shear = (draw.uniform((batch, 2), -cfg.shear, cfg.shear) * (math.pi / 180.0)).tan()
    shift = draw.uniform((batch, 2), -cfg.translate, cfg.translate)
    shift = shift * torch.tensor([out_w, out_h], dtype=f64, device=device)
    flip = draw.bernoulli(batch, cfg.fliplr)
    use_mixup = draw.bernoulli(batch, cfg.mixup_prob) & (cfg.mixup and special and batch > 1)
    mix_partner = (torch.arange(batch, device=device) + 1 + draw.randint((batch,), max(batch - 1, 1))) % batch
    lam = draw.beta_sym(batch, MIXUP_BETA)
    hsv_gains = torch.stack(
        [
            draw.uniform((batch,), -cfg.hsv_h, cfg.hsv_h),
            draw.uniform((batch,), 1.0 - cfg.hsv_s, 1.0 + cfg.hsv_s),
            draw.uniform((batch,), 1.0 - cfg.hsv_v, 1.0 + cfg.hsv_v),
        ],
        1,
    )

    # --- one affine matrix per sample: store/canvas pixels -> output pixels ----------------------
    # base(p) = r * p + q fits the source to the output (letterbox for a single image, a window
    # around the Mosaic centre for a canvas); L = flip @ shear @ rotation * scale acts around the
    # output centre o; then the random shift t.  out = L @ (base(p) - o) + o + t
    r, pad_x, pad_y = letterbox_params((h, w), (out_h, out_w))
    o = torch.tensor([out_w / 2, out_h / 2], dtype=f64, device=device)
    pad = torch.tensor([pad_x, pad_y], dtype=f64, device=device)
    q = torch.where(use_mosaic.unsqueeze(1), o - r * centre, pad)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    ones = torch.ones(batch, dtype=f64, device=device)
    shr = torch.stack([torch.stack([ones, shear[:, 0]], 1), torch.stack([shear[:, 1], ones], 1)], 1)
    lin = shr @ rot * scale.view(batch, 1, 1)
    lin[:, 0] = torch.where(flip.unsqueeze(1), -lin[:, 0], lin[:, 0])
    offset = (lin @ (q - o).unsqueeze(-1)).squeeze(-1) + o + shift
    fwd = torch.cat([lin * r, offset.unsqueeze(-1)], 2)  # (B, 2, 3)

    # --- images: one warp per sample from its (virtual) canvas -----------------------------------
    own = torch.arange(batch, device=device)
    tiles = torch.where(
        use_mosaic.unsqueeze(1),
        torch.cat([own.view(batch, 1), partners], 1),
        torch.cat([own.view(batch, 1), torch.full((batch, 3), -1, device=device, dtype=torch.long)], 1),
    )
    src, fill = _stack_source(rgb, event)
    warped = _warp(src, tiles, _invert(fwd), (out_h, out_w), use_mosaic if cfg.mosaic and special else None)
    out_rgb, out_event = _to_outputs(warped, fill, rgb is not None, event is not None)

    # --- boxes: every (target, tile showing its image) pair, same matrix -------------------------
    img_of_target = targets[:, 0].long()
    t_idx, slot = (img_of_target.unsqueeze(1) == tiles.view(1, -1)).nonzero(as_tuple=True)
    sample, tile = slot // 4, slot % 4
    tile_off = torch.stack([(tile % 2) * w, (tile // 2) * h], 1).to(torch.float32)
    boxes = targets[t_idx, 2:6] + tile_off.repeat(1, 2)
    boxes = _transform_boxes(boxes, fwd.to(torch.float32)[sample])
    full_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    bound = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32, device=device)
    boxes = torch.minimum(boxes.clamp_min(0.0), bound)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (
        (bw >= cfg.min_box_size)
        & (bh >= cfg.min_box_size)
        & (bw > 0)
        & (bh > 0)
        & (bw * bh >= cfg.min_box_area_ratio * full_area)
    )
    out_targets = torch.cat([sample.unsqueeze(1).to(torch.float32), targets[t_idx, 1:2], boxes], 1)[keep]

    # --- MixUp with another augmented sample ------------------------------------------------------
    if cfg.mixup and special and batch > 1:
        mixed = use_mixup.nonzero().squeeze(1)
        if mixed.numel():
            lam_m = lam.index_select(0, mixed).to(torch.float32).view(-1, 1, 1, 1)
            partner = mix_partner.index_select(0, mixed)
            for out in (out_rgb, out_event):
                if out is not None:  # blend from the unmixed images, then write back in place
                    out.index_copy_(0, mixed, torch.lerp(out[partner], out[mixed], lam_m))
        wanted = (out_targets[:, 0].long().unsqueeze(1) == mix_partner.view(1, -1)) & use_mixup.view(1, -1)
        m_idx, into = wanted.nonzero(as_tuple=True)
        extra = out_targets[m_idx].clone()
        extra[:, 0] = into.to(torch.float32)
        out_targets = torch.cat([out_targets, extra], 0)

    # --- HSV on RGB only --------------------------------------------------------------------------
    if out_rgb is not None and (cfg.hsv_h or cfg.hsv_s or cfg.hsv_v):
        out_rgb = _hsv_jitter(out_rgb, hsv_gains)

    order = out_targets[:, 0].argsort(stable=True)
    return out_rgb, out_event, out_targets[order]
