"""Fusion blocks merging same-shaped RGB and Event feature maps into one map of the same shape."""

from __future__ import annotations

import torch
from torch import nn

from fredfusion.model.blocks import Conv

FUSION_BLOCKS = ("concat", "attention")


class ConcatFusion(nn.Module):
    """Concatenate both feature maps and project back to ``channels`` with a 1x1 Conv+BN+SiLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = Conv(2 * channels, channels, 1)

    def forward(self, rgb: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat((rgb, event), dim=1))


class AttentionFusion(nn.Module):
    """Attention-gated weighted sum of both branches followed by a 1x1 Conv+BN+SiLU.

    A gate ``g`` in (0, 1) per channel and position weighs the branches:
    ``fused = g * rgb + (1 - g) * event`` (a two-way softmax). Its logit is the sum of a
    channel term (squeeze-excitation MLP on the globally pooled concatenation) and a spatial
    term (7x7 conv on per-branch channel mean and max maps). The last layer of both terms
    starts at zero, so the block starts as the plain average of the two branches.
    """

    def __init__(self, channels: int, reduction: int = 8, spatial_kernel: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        last = nn.Conv2d(hidden, channels, 1)
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * channels, hidden, 1), nn.SiLU(inplace=True), last
        )
        self.spatial_gate = nn.Conv2d(4, 1, spatial_kernel, padding=spatial_kernel // 2)
        self.proj = Conv(channels, channels, 1)
        for conv in (last, self.spatial_gate):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def gate(self, rgb: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        """Weight of the RGB branch, shape ``(B, C, H, W)`` (the Event branch gets ``1 - gate``)."""
        channel_logit = self.channel_gate(torch.cat((rgb, event), dim=1))
        stats = torch.cat(
            (
                rgb.mean(dim=1, keepdim=True),
                rgb.amax(dim=1, keepdim=True),
                event.mean(dim=1, keepdim=True),
                event.amax(dim=1, keepdim=True),
            ),
            dim=1,
        )
        return torch.sigmoid(channel_logit + self.spatial_gate(stats))

    def forward(self, rgb: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        g = self.gate(rgb, event)
        return self.proj(event + g * (rgb - event))


def make_fusion(kind: str, channels: int) -> nn.Module:
    """Fusion block ``kind`` ("concat" or "attention") for feature maps with ``channels`` channels."""
    if kind == "concat":
        return ConcatFusion(channels)
    if kind == "attention":
        return AttentionFusion(channels)
    raise ValueError(f"unknown fusion block {kind!r}; valid: {', '.join(FUSION_BLOCKS)}")
