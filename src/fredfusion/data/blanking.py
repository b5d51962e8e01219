"""Blanking one modality of dual training samples: modality dropout and unpaired frames.

A blank modality is all zeros in the model's input scale (float 0.0, uint8 0): a frame that is not
there reads as zeros from the dataset (``PreparedDataset.load``), and zero is also the event frames'
padding (no events). It is applied to whole augmented samples, after augmentation, so a blanked
sample has no trace of that modality left (no grey RGB padding, no HSV jitter). A Mosaic tile that
shows an unpaired image already holds zeros where its missing frame would be.

``keep_masks`` decides per sample which modalities stay, from the frames each image has (``present``)
and, with modality dropout, random draws: a share of the true pairs gets RGB or events (50/50) blanked,
never both. Everything stays on the device: one ``rand`` per batch and masks, no value read on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["blank_frames", "keep_masks"]


def keep_masks(
    present: Tensor | None,
    batch: int,
    share: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """``(batch, 2)`` bool on ``device``: whether each sample keeps its RGB (column 0) and event frame.

    ``present`` ``(batch, 2)`` bool marks the frames each image has (None: all). With ``share`` > 0 each
    sample that has both is drawn for dropout with probability ``share`` and then loses RGB or events
    with probability 1/2 each (``generator`` makes the draws reproducible; it lives on ``device`` or the
    CPU). A sample never loses its only modality to dropout.
    """
    keep = (
        torch.ones((batch, 2), dtype=torch.bool, device=device)
        if present is None
        else present.to(device=device, dtype=torch.bool, non_blocking=True)
    )
    if share <= 0:
        return keep
    source = generator.device if generator is not None else device
    draws = torch.rand((batch, 2), generator=generator, device=source).to(device, non_blocking=True)
    dropped = (draws[:, 0] < share) & keep.all(1)
    event_side = draws[:, 1] < 0.5
    return keep & ~torch.stack((dropped & ~event_side, dropped & event_side), 1)


def blank_frames(
    rgb: Tensor | None, event: Tensor | None, keep: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """``rgb`` and ``event`` ``(B, 3, H, W)`` with the samples whose ``keep`` column is False set to zero,
    in place (multiplication by the mask: no shape depends on the data)."""
    for k, frames in enumerate((rgb, event)):
        if frames is not None:
            frames.mul_(keep[:, k].view(-1, 1, 1, 1).to(frames.dtype))
    return rgb, event
