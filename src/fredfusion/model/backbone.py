"""CSPDarknet backbone returning P3 / P4 / P5 features: the YOLOv5 v6 layout, or v5.0 (the old tool's)."""

from __future__ import annotations

import torch
from torch import nn

from fredfusion.model.blocks import C3, SPPF, Conv, scale_depth, scale_width

BASE_CHANNELS = (64, 128, 256, 512, 1024)
BASE_REPEATS = (3, 6, 9, 3)
V5_REPEATS = (3, 9, 9, 3)
LAYOUTS = ("v6", "v5")
"""``v6``: YOLOv5 v6 (every model this package builds by default). ``v5``: YOLOv5 v5.0, the backbone of
the old tool's checkpoints and COCO files (``model.convert`` reads them)."""


class CSPDarknet(nn.Module):
    """Stem Conv(k6, s2) then four [Conv s2, C3] stages and SPPF.

    Attributes ``stem``, ``stage1`` .. ``stage4`` and ``sppf``; ``out_channels`` holds the
    channel counts of the returned P3 (stride 8), P4 (stride 16) and P5 (stride 32) features.
    With ``layout="v5"`` the stages repeat 3-9-9-3 bottlenecks (times depth) and the last stage is
    Conv s2, SPP (as the equivalent SPPF: chained 5x5 pools equal the 5/9/13 pools) and a C3 without
    shortcut; ``sppf`` is then an identity. The v5.0 Focus stem is this 6x6 stem with rearranged weights.
    """

    def __init__(
        self, in_channels: int = 3, depth: float = 0.33, width: float = 0.5, layout: str = "v6"
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown backbone layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        c0, c1, c2, c3, c4 = (scale_width(c, width) for c in BASE_CHANNELS)
        n1, n2, n3, n4 = (scale_depth(n, depth) for n in (V5_REPEATS if layout == "v5" else BASE_REPEATS))
        self.in_channels = in_channels
        self.layout = layout
        self.stem = Conv(in_channels, c0, k=6, s=2, p=2)
        self.stage1 = nn.Sequential(Conv(c0, c1, 3, 2), C3(c1, c1, n1))
        self.stage2 = nn.Sequential(Conv(c1, c2, 3, 2), C3(c2, c2, n2))
        self.stage3 = nn.Sequential(Conv(c2, c3, 3, 2), C3(c3, c3, n3))
        self.sppf: nn.Module
        if layout == "v5":
            self.stage4 = nn.Sequential(Conv(c3, c4, 3, 2), SPPF(c4, c4, k=5), C3(c4, c4, n4, shortcut=False))
            self.sppf = nn.Identity()
        else:
            self.stage4 = nn.Sequential(Conv(c3, c4, 3, 2), C3(c4, c4, n4))
            self.sppf = SPPF(c4, c4, k=5)
        self.out_channels: tuple[int, int, int] = (c2, c3, c4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.stem(x))
        p3 = self.stage2(x)
        p4 = self.stage3(p3)
        p5 = self.sppf(self.stage4(p4))
        return p3, p4, p5
