"""The anchor-free YOLOv8-style family for RGB, Event or both: C2f backbone and neck, SPPF, a decoupled
head that predicts box sides as distributions (DFL) and class scores without objectness.

Written from the published description of the architecture: per size a depth and width multiplier
and a channel cap (n 0.33/0.25/1024, s 0.33/0.50/1024, m 0.67/0.75/768, l 1.0/1.0/512,
x 1.0/1.25/512); the backbone Conv-Conv-C2f(3)-Conv-C2f(6)-Conv-C2f(6)-Conv-C2f(3)-SPPF on
64-128-256-512-1024 base channels; a PAN neck of upsample / concatenate / C2f (no shortcut) and
stride-2 Convs; per level a box branch (two 3x3 Convs and a 1x1 conv to 4 x 16 distribution bins) and
a class branch (two 3x3 Convs and a 1x1 conv to the classes). With 80 classes the parameter counts
equal the published ones (tests/model/test_yolov8.py).

A dual model has two backbones fused at P3, P4 and P5 by the same fusion blocks as the YOLOv5 family
(or one backbone on the 6-channel stack with ``fusion="early"``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fredfusion.model.blocks import SPPF, Conv, make_divisible, scale_depth
from fredfusion.model.fusion import make_fusion
from fredfusion.spec import FUSIONS, INPUT_MULTIPLE, MODALITIES, frames_for

SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.25, 512),
}
"""Size -> (depth multiple, width multiple, channel cap before the width multiple)."""
REG_MAX = 16
"""Bins of each box side's distribution (distances 0 .. 15 strides)."""


class C2f(nn.Module):
    """CSP block with two convolutions: split after a 1x1 Conv, ``n`` Bottlenecks on one half, every
    intermediate output concatenated and mixed by a 1x1 Conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(_Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class _Bottleneck(nn.Module):
    """Two 3x3 Convs at ``c`` channels, with a residual connection when ``shortcut``."""

    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


def _channels(size: str) -> list[int]:
    """Channels of P1..P5 for a size: the base channels capped, times the width multiple, rounded to 8."""
    _depth, width, cap = SCALES[size]
    return [make_divisible(min(c, cap) * width, 8) for c in (64, 128, 256, 512, 1024)]


class Backbone(nn.Module):
    """Stem and four stages down to stride 32, SPPF at the end; returns P3, P4, P5 features."""

    def __init__(self, in_channels: int, size: str) -> None:
        super().__init__()
        depth = SCALES[size][0]
        c1, c2, c3, c4, c5 = _channels(size)
        self.stem = Conv(in_channels, c1, 3, 2)
        self.stage2 = nn.Sequential(Conv(c1, c2, 3, 2), C2f(c2, c2, scale_depth(3, depth), True))
        self.stage3 = nn.Sequential(Conv(c2, c3, 3, 2), C2f(c3, c3, scale_depth(6, depth), True))
        self.stage4 = nn.Sequential(Conv(c3, c4, 3, 2), C2f(c4, c4, scale_depth(6, depth), True))
        self.stage5 = nn.Sequential(
            Conv(c4, c5, 3, 2), C2f(c5, c5, scale_depth(3, depth), True), SPPF(c5, c5, 5)
        )
        self.out_channels: tuple[int, int, int] = (c3, c4, c5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)


class Neck(nn.Module):
    """PAN without lateral convolutions: top-down upsample + concat + C2f, then stride-2 Convs back up."""

    def __init__(self, channels: tuple[int, int, int], depth: float) -> None:
        super().__init__()
        c3, c4, c5 = channels
        n = scale_depth(3, depth)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.top_down_p4 = C2f(c5 + c4, c4, n)
        self.top_down_p3 = C2f(c4 + c3, c3, n)
        self.down_p3 = Conv(c3, c3, 3, 2)
        self.bottom_up_p4 = C2f(c3 + c4, c4, n)
        self.down_p4 = Conv(c4, c4, 3, 2)
        self.bottom_up_p5 = C2f(c4 + c5, c5, n)
        self.out_channels = channels

    def forward(
        self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3, p4, p5 = feats
        h4 = self.top_down_p4(torch.cat((self.up(p5), p4), 1))
        out3 = self.top_down_p3(torch.cat((self.up(h4), p3), 1))
        out4 = self.bottom_up_p4(torch.cat((self.down_p3(out3), h4), 1))
        out5 = self.bottom_up_p5(torch.cat((self.down_p4(out4), p5), 1))
        return out3, out4, out5


class DetectHead(nn.Module):
    """Decoupled anchor-free head: per level ``(B, 4 * REG_MAX + nc, H, W)`` raw outputs."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int, strides: tuple[int, ...]) -> None:
        super().__init__()
        c2 = max(16, channels[0] // 4, REG_MAX * 4)
        c3 = max(channels[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1)) for c in channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, num_classes, 1)) for c in channels
        )
        # expectation over the bins of a side's distribution, as a fixed 1x1 convolution
        self.dfl = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.dfl.weight.copy_(torch.arange(REG_MAX, dtype=torch.float32).view(1, REG_MAX, 1, 1))
        self._init_biases(num_classes, strides)

    @torch.no_grad()
    def _init_biases(self, num_classes: int, strides: tuple[int, ...]) -> None:
        # box bins start flat; classes start at a prior of ~5 objects per 640x640 image
        for box, cls, s in zip(self.box, self.cls, strides):
            box[-1].bias.fill_(1.0)
            cls[-1].bias.fill_(math.log(5 / num_classes / (640 / s) ** 2))

    def forward(self, feats: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [torch.cat((box(x), cls(x)), 1) for box, cls, x in zip(self.box, self.cls, feats)]


def anchor_points(
    shapes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres ``(A, 2)`` in grid units of their level and the stride of each ``(A, 1)``."""
    points, stride = [], []
    for (h, w), s in zip(shapes, strides):
        y, x = torch.meshgrid(
            torch.arange(h, device=device, dtype=dtype) + 0.5,
            torch.arange(w, device=device, dtype=dtype) + 0.5,
            indexing="ij",
        )
        points.append(torch.stack((x, y), -1).reshape(-1, 2))
        stride.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride)


class FusionYOLOv8(nn.Module):
    """Anchor-free YOLOv8-style detector on RGB, Event, or both (same interface as ``FusionYOLO``)."""

    arch = "yolov8"
    strides: tuple[int, int, int] = (8, 16, 32)

    def __init__(self, modality: str = "dual", size: str = "s", fusion: str = "concat", num_classes: int = 1):
        super().__init__()
        for what, value, valid in (("modality", modality, MODALITIES), ("model size", size, tuple(SCALES)),
                                   ("fusion", fusion, FUSIONS)):  # fmt: skip
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.modality, self.size, self.fusion, self.num_classes = modality, size, fusion, num_classes
        self.inputs = frames_for(modality)
        self.dual_backbones = modality == "dual" and fusion != "early"
        if self.dual_backbones:
            self.backbone_rgb = Backbone(3, size)
            self.backbone_event = Backbone(3, size)
            channels = self.backbone_rgb.out_channels
            self.fusion_p3, self.fusion_p4, self.fusion_p5 = (make_fusion(fusion, c) for c in channels)
        else:
            self.backbone = Backbone(6 if modality == "dual" else 3, size)
            channels = self.backbone.out_channels
        self.neck = Neck(channels, SCALES[size][0])
        self.head = DetectHead(channels, num_classes, self.strides)

    def forward(self, rgb: torch.Tensor | None, event: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Raw maps ``(B, 4 * REG_MAX + nc, H/s, W/s)`` for strides 8, 16, 32."""
        given = {"rgb": rgb, "event": event}
        x = [self._check_input(given[kind], kind) for kind in self.inputs]
        if len(x) == 1:
            feats = self.backbone(x[0])
        elif self.dual_backbones:
            fr, fe = self.backbone_rgb(x[0]), self.backbone_event(x[1])
            feats = (self.fusion_p3(fr[0], fe[0]), self.fusion_p4(fr[1], fe[1]), self.fusion_p5(fr[2], fe[2]))
        else:
            feats = self.backbone(torch.cat(x, 1))
        return self.head(self.neck(feats))

    def _check_input(self, x: torch.Tensor | None, name: str) -> torch.Tensor:
        if x is None:
            raise ValueError(f"modality {self.modality!r} needs the {name} input, got None")
        if torch.jit.is_tracing():
            return x
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"{name} input must be a float (B, 3, H, W) tensor, got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[2] % INPUT_MULTIPLE or x.shape[3] % INPUT_MULTIPLE:
            raise ValueError(f"{name} input height and width must be multiples of {INPUT_MULTIPLE}")
        return x

    def backbone_modules(self) -> list[nn.Module]:
        """The backbone(s): what a freeze phase freezes."""
        return [self.backbone_rgb, self.backbone_event] if self.dual_backbones else [self.backbone]

    def split(self, preds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Box bins ``(B, A, 4, REG_MAX)``, class logits ``(B, A, nc)`` over all levels, and the grids."""
        shapes = [(int(p.shape[2]), int(p.shape[3])) for p in preds]
        flat = torch.cat([p.flatten(2) for p in preds], 2).transpose(1, 2)  # (B, A, no)
        bins = flat[..., : 4 * REG_MAX].reshape(flat.shape[0], flat.shape[1], 4, REG_MAX)
        return bins, flat[..., 4 * REG_MAX :], shapes

    def decode(self, preds: list[torch.Tensor]) -> torch.Tensor:
        """``(B, A, 5 + nc)`` rows ``cx, cy, w, h`` (input pixels), 1 (no objectness), class probabilities:
        the layout the YOLOv5 family decodes to, so NMS, evaluation and export serve both."""
        bins, logits, shapes = self.split([p.float() for p in preds])
        points, stride = anchor_points(shapes, self.strides, bins.device, torch.float32)
        dist = (bins.softmax(-1) * self.head.dfl.weight.view(REG_MAX)).sum(-1)  # (B, A, 4): l, t, r, b
        lt, rb = dist[..., :2], dist[..., 2:]
        cxy = (points + (rb - lt) / 2) * stride
        wh = (lt + rb) * stride
        ones = torch.ones_like(logits[..., :1])
        return torch.cat((cxy, wh, ones, logits.sigmoid()), -1)
