"""Blanking one modality of dual training samples: modality dropout and unpaired frames.

A blank modality is all zeros in the model's input scale (float 0.0, uint8 0): a frame that is not
there reads as zeros from the dataset (``PreparedDataset.load``), and zero is also the event frames'
padding (no events). It is applied to whole augmented samples, after augmentation, so a blanked
sample has no trace of that modality left (no grey RGB padding, no HSV jitter). A Mosaic tile that
shows an unpaired image already holds zeros where its missing frame would be.

``keep_masks`` decides per sample which modalities stay, from the frames each image has (``present``)
and, with modality dropout, random draws: a share of the true pairs gets RGB or events (50/50) blanked,
never both. Everything stays on the device: one ``rand`` per batch and masks, no value read on the host.

Dropout can also blank only the boxes (``blank_boxes``): the dropped modality keeps its frame but the
area of each target box (with a margin) shows that modality's content from elsewhere in the same
frame (the frame rolled by half its height and width). The sample then looks like a scene where that
modality is blind at the drone only (events of a hovering drone, RGB at night) while its background
statistics stay real; a whole blank frame is a cue of its own that such scenes never show. A box is
blanked in one modality only where the other shows the drone (``shows``: the RGB box stands out from
its surroundings, the event box holds many events): blanking events where the RGB is dark too would
teach the model to find drones that neither input shows, which costs it the night. With spared
parts (``spared_parts``) a random part of each box keeps its content: the modality then shows only
part of the drone (the body of a hovering drone without its still rotors), so the box's extent has
to come from the other modality.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BOX_MARGIN",
    "EVENT_DENSITY",
    "EVENT_OVER_BACKGROUND",
    "MAX_SPARED",
    "RGB_CONTRAST",
    "RING_MARGIN",
    "blank_boxes",
    "blank_frames",
    "box_cover",
    "keep_masks",
    "shows",
    "spared_parts",
]

BOX_MARGIN = 0.1
"""Share of a box's width / height added on each side of the area ``blank_boxes`` replaces. The size
of the drone a dual model predicts where the events miss it follows this margin (docs/DESIGN.md)."""
RING_MARGIN = 0.25
"""Share of a box's width / height on each side of the ring ``shows`` compares the box with."""
RGB_CONTRAST = 0.05
"""Least difference of mean grey level (0-1) between a box and its ring for RGB to show the drone."""
EVENT_DENSITY = 0.1
"""Least share of a box's pixels with an event for the events to show the drone ..."""
EVENT_OVER_BACKGROUND = 3.0
"""... which must also be this many times the share of the whole frame's pixels with an event."""
MAX_SPARED = 0.8
"""Largest share of a box's width / height that ``spared_parts`` leaves in place."""


def keep_masks(
    present: Tensor | None,
    batch: int,
    share: float,
    generator: torch.Generator | None,
    device: torch.device,
    event_side: float = 0.5,
) -> Tensor:
    """``(batch, 2)`` bool on ``device``: whether each sample keeps its RGB (column 0) and event frame.

    ``present`` ``(batch, 2)`` bool marks the frames each image has (None: all). With ``share`` > 0 each
    sample that has both is drawn for dropout with probability ``share`` and then loses its events with
    probability ``event_side``, else its RGB (``generator`` makes the draws reproducible; it lives on
    ``device`` or the CPU). A sample never loses its only modality to dropout.
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
    events = draws[:, 1] < event_side
    return keep & ~torch.stack((dropped & ~events, dropped & events), 1)


def blank_frames(
    rgb: Tensor | None, event: Tensor | None, keep: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """``rgb`` and ``event`` ``(B, 3, H, W)`` with the samples whose ``keep`` column is False set to zero,
    in place (multiplication by the mask: no shape depends on the data)."""
    for k, frames in enumerate((rgb, event)):
        if frames is not None:
            frames.mul_(keep[:, k].view(-1, 1, 1, 1).to(frames.dtype))
    return rgb, event


def box_cover(
    targets: Tensor,
    batch: int,
    hw: tuple[int, int],
    margin: float = BOX_MARGIN,
    spared: Tensor | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """``(batch, H, W)`` bool: the pixels inside any box of each image, each box grown by ``margin``
    of its size on every side. ``targets`` ``(K, 6)`` ``[image, class, x1, y1, x2, y2]`` in pixels;
    rows with a negative image index hold no box, nor do those ``rows`` ``(K,)`` bool leaves out.
    ``spared`` ``(K, 3)`` in [0, 1) leaves a part of each box out: a rectangle of ``spared[:, 0]`` of
    the box's width and height, placed at the fractions ``spared[:, 1:]`` of the free room (0: left /
    top); pixels in a spared part stay out. Rectangles are painted by a summed-area table (four corner
    increments and two cumulative sums): cost O(K + batch * H * W), no host read."""
    valid = targets[:, 0] >= 0
    valid = (valid if rows is None else valid & rows).to(torch.int32)
    img = targets[:, 0].clamp(min=0).long()
    cover = _painted(img, valid, _grown(targets, margin), batch, hw) > 0
    if spared is None:
        return cover
    x1, y1, x2, y2 = targets[:, 2:6].unbind(1)
    size, at_x, at_y = spared.unbind(1)
    sx1 = x1 + at_x * (1 - size) * (x2 - x1)
    sy1 = y1 + at_y * (1 - size) * (y2 - y1)
    inner = (sx1, sy1, sx1 + size * (x2 - x1), sy1 + size * (y2 - y1))
    return cover & (_painted(img, valid, inner, batch, hw, inwards=True) == 0)


def _painted(
    img: Tensor,
    weight: Tensor,
    box: tuple[Tensor, Tensor, Tensor, Tensor],
    batch: int,
    hw: tuple[int, int],
    inwards: bool = False,
) -> Tensor:
    """``(batch, H, W)`` int32: how many of the rectangles ``box`` (x1, y1, x2, y2 in pixels, of image
    ``img``, counted ``weight`` times) cover each pixel; snapped outwards to whole pixels, or inwards
    (only the pixels wholly inside) with ``inwards``."""
    h, w = hw
    x1, y1, x2, y2 = _snapped(box, hw, inwards)
    weight = weight * ((x2 > x1) & (y2 > y1))  # an inner part snapped to nothing paints nothing
    corners = torch.zeros((batch, h + 1, w + 1), dtype=torch.int32, device=img.device)
    for ys, xs, sign in ((y1, x1, 1), (y1, x2, -1), (y2, x1, -1), (y2, x2, 1)):
        corners.index_put_((img, ys, xs), weight * sign, accumulate=True)
    return corners.cumsum(1).cumsum(2)[:, :h, :w]


def blank_boxes(
    rgb: Tensor,
    event: Tensor,
    dropped: Tensor,
    targets: Tensor,
    margin: float = BOX_MARGIN,
    spared: Tensor | None = None,
    droppable: tuple[bool, bool] = (True, True),
) -> tuple[Tensor, Tensor]:
    """Blank only the boxes of the dropped modality where the other one shows them: for each target
    box whose sample has ``dropped`` ``(B, 2)`` True for RGB (column 0) or events (column 1), and
    whose other modality shows the drone (:func:`shows`), the pixels inside the grown box (less its
    ``spared`` part) take the values of its frame rolled by (H/2, W/2), in place. ``targets``,
    ``margin`` and ``spared`` as in :func:`box_cover`; a modality whose ``droppable`` is False (its
    ``dropped`` column all False, as one-sided dropout makes it) is left without any work."""
    batch, _, h, w = rgb.shape
    seen = shows(rgb, event, targets, which=(droppable[1], droppable[0]))  # dropping k needs 1 - k
    img = targets[:, 0].clamp(min=0).long()
    for k, frames in enumerate((rgb, event)):
        if not droppable[k]:
            continue
        rows = dropped[img, k] & seen[:, 1 - k]
        cover = box_cover(targets, batch, (h, w), margin, spared, rows).unsqueeze(1)
        frames.copy_(torch.where(cover, frames.roll((h // 2, w // 2), dims=(2, 3)), frames))
    return rgb, event


def shows(rgb: Tensor, event: Tensor, targets: Tensor, which: tuple[bool, bool] = (True, True)) -> Tensor:
    """``(K, 2)`` bool: whether RGB (column 0) and events (column 1) show each target box; a column
    ``which`` leaves out is all False and costs nothing.

    RGB shows a box when its mean grey level differs from that of the ring around it (the box grown by
    RING_MARGIN) by at least RGB_CONTRAST; events show it when at least EVENT_DENSITY of its pixels
    have an event and that share is EVENT_OVER_BACKGROUND times the frame's. ``rgb`` / ``event``
    ``(B, 3, H, W)`` in [0, 1]; sums by integral images, no host read. Rows without a box: False."""
    h, w = rgb.shape[-2:]
    img = targets[:, 0].clamp(min=0).long()
    box = _snapped(_grown(targets, 0.0), (h, w))
    area = _area(box)
    valid = (targets[:, 0] >= 0) & (area > 0)
    rgb_shows = event_shows = torch.zeros_like(valid)
    if which[0]:
        grey = _integral(rgb.mean(1))
        grown = _snapped(_grown(targets, RING_MARGIN), (h, w))
        box_grey = _box_sum(grey, img, box)
        inside = box_grey / area.clamp(min=1)
        ring = (_box_sum(grey, img, grown) - box_grey) / (_area(grown) - area).clamp(min=1)
        rgb_shows = valid & ((inside - ring).abs() >= RGB_CONTRAST)
    if which[1]:
        fired = _integral((event.amax(1) > 0).to(rgb.dtype))
        density = _box_sum(fired, img, box) / area.clamp(min=1)
        background = fired[img, h, w] / (h * w)
        event_shows = valid & (density >= EVENT_DENSITY) & (density >= EVENT_OVER_BACKGROUND * background)
    return torch.stack((rgb_shows, event_shows), 1)


def _grown(targets: Tensor, margin: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The corners (x1, y1, x2, y2) of each target box grown by ``margin`` of its size on every side."""
    x1, y1, x2, y2 = targets[:, 2:6].unbind(1)
    grow_x, grow_y = margin * (x2 - x1), margin * (y2 - y1)
    return x1 - grow_x, y1 - grow_y, x2 + grow_x, y2 + grow_y


def _integral(x: Tensor) -> Tensor:
    """``(B, H + 1, W + 1)`` summed-area table of ``x`` ``(B, H, W)`` (float64: exact enough at 4K)."""
    return torch.nn.functional.pad(x.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))


def _snapped(
    box: tuple[Tensor, Tensor, Tensor, Tensor], hw: tuple[int, int], inwards: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Box corners snapped to whole pixels, outwards (every pixel the box touches) or ``inwards`` (the
    pixels wholly inside), clipped to the frame, as long integers."""
    h, w = hw
    low, high = (torch.ceil, torch.floor) if inwards else (torch.floor, torch.ceil)
    x1, y1, x2, y2 = box
    return (
        low(x1).clamp(0, w).long(),
        low(y1).clamp(0, h).long(),
        high(x2).clamp(0, w).long(),
        high(y2).clamp(0, h).long(),
    )


def _area(box: tuple[Tensor, ...]) -> Tensor:
    return ((box[2] - box[0]) * (box[3] - box[1])).to(torch.float64)


def _box_sum(table: Tensor, img: Tensor, box: tuple[Tensor, ...]) -> Tensor:
    """The sum of the values inside each box of image ``img`` from the summed-area ``table``."""
    x1, y1, x2, y2 = box
    return table[img, y2, x2] - table[img, y1, x2] - table[img, y2, x1] + table[img, y1, x1]


def spared_parts(rows: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``(rows, 3)`` random spared parts for :func:`box_cover`: a size uniform in [0, MAX_SPARED) of
    each box and a uniform place, drawn with ``generator`` (on ``device`` or the CPU), no host read."""
    source = generator.device if generator is not None else device
    draws = torch.rand((rows, 3), generator=generator, device=source).to(device, non_blocking=True)
    return torch.cat((draws[:, :1] * MAX_SPARED, draws[:, 1:]), 1)
