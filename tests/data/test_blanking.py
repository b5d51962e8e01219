"""Blanking one modality of dual samples: the share modality dropout blanks, never both, reproducible
draws, missing frames blanked, and zeros exactly where the masks say (no host sync: test_augment);
box-only dropout replaces exactly the grown boxes of the dropped modality."""

from __future__ import annotations

import math

import pytest
import torch

from fredfusion.data.blanking import (
    MAX_SPARED,
    blank_boxes,
    blank_frames,
    box_cover,
    keep_masks,
    shows,
    spared_parts,
)

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dropout_blanks_the_share_asked_for_never_both() -> None:
    n = 20000
    keep = keep_masks(None, n, 0.3, _gen(0), CPU)
    assert keep.shape == (n, 2) and keep.dtype == torch.bool
    assert bool(keep.any(1).all()), "a sample lost both modalities"
    dropped = ~keep.all(1)
    share = dropped.float().mean().item()
    assert abs(share - 0.3) < 0.015, share
    rgb_side = (~keep[:, 0]).float().sum() / dropped.float().sum()
    assert abs(rgb_side.item() - 0.5) < 0.02


@pytest.mark.parametrize(("event_side", "rgb_lost", "events_lost"), [(1.0, False, True), (0.0, True, False)])
def test_dropout_of_one_side_only_blanks_that_modality(
    event_side: float, rgb_lost: bool, events_lost: bool
) -> None:
    keep = keep_masks(None, 4000, 0.4, _gen(2), CPU, event_side)
    assert bool((~keep[:, 0]).any()) is rgb_lost and bool((~keep[:, 1]).any()) is events_lost
    assert abs((~keep.all(1)).float().mean().item() - 0.4) < 0.03


def test_dropout_draws_are_reproducible_and_follow_the_seed() -> None:
    a = keep_masks(None, 64, 0.5, _gen(7), CPU)
    assert torch.equal(a, keep_masks(None, 64, 0.5, _gen(7), CPU))
    assert not torch.equal(a, keep_masks(None, 64, 0.5, _gen(8), CPU))


def test_no_dropout_draws_nothing_and_keeps_what_is_there() -> None:
    gen = _gen(3)
    state = gen.get_state()
    present = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    assert torch.equal(keep_masks(present, 4, 0.0, gen, CPU), present)
    assert torch.equal(gen.get_state(), state)
    assert bool(keep_masks(None, 5, 0.0, None, CPU).all())


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_missing_frames_stay_blank_and_dropout_spares_the_only_modality(share: float) -> None:
    n = 400
    present = torch.zeros((n, 2), dtype=torch.bool)
    present[: n // 2] = True  # true pairs
    present[n // 2 : 3 * n // 4, 0] = True  # rgb_only
    present[3 * n // 4 :, 1] = True  # event_only
    keep = keep_masks(present, n, share, _gen(1), CPU)
    assert not bool((keep & ~present).any())  # nothing missing comes back
    assert torch.equal(keep[n // 2 :], present[n // 2 :])  # unpaired: never dropped further
    paired = keep[: n // 2]
    assert bool(paired.any(1).all())
    if share == 1.0:
        assert not bool(paired.all(1).any())  # every true pair lost exactly one modality


def test_blank_frames_zeroes_exactly_the_masked_samples() -> None:
    torch.manual_seed(0)
    rgb, event = torch.rand(4, 3, 8, 16), torch.rand(4, 3, 8, 16)
    before = rgb.clone(), event.clone()
    keep = torch.tensor([[True, True], [False, True], [True, False], [True, True]])
    out_rgb, out_event = blank_frames(rgb, event, keep)
    assert out_rgb is rgb and out_event is event  # in place
    for k, (got, old) in enumerate(zip((out_rgb, out_event), before)):
        for i in range(4):
            if keep[i, k]:
                assert torch.equal(got[i], old[i])
            else:
                assert bool((got[i] == 0).all())
    assert blank_frames(None, event, keep)[0] is None


def _cover_by_hand(
    rows: list[list[float]],
    batch: int,
    h: int,
    w: int,
    margin: float,
    spared: list[list[float]] | None = None,
) -> torch.Tensor:
    """The reference: every pixel tested against every grown box and every spared part, one at a time."""
    out = torch.zeros((batch, h, w), dtype=torch.bool)
    inner = torch.zeros((batch, h, w), dtype=torch.bool)
    for r, (img, _cls, x1, y1, x2, y2) in enumerate(rows):
        if img < 0:
            continue
        gx, gy = margin * (x2 - x1), margin * (y2 - y1)
        left, right = math.floor(x1 - gx), math.ceil(x2 + gx)
        top, bottom = math.floor(y1 - gy), math.ceil(y2 + gy)
        size, at_x, at_y = spared[r] if spared else (0.0, 0.0, 0.0)
        sx1 = x1 + at_x * (1 - size) * (x2 - x1)
        sy1 = y1 + at_y * (1 - size) * (y2 - y1)
        sx2, sy2 = sx1 + size * (x2 - x1), sy1 + size * (y2 - y1)
        for y in range(h):
            for x in range(w):  # pixel (x, y) spans [x, x+1)
                if left <= x < right and top <= y < bottom:  # the grown box snapped outwards
                    out[int(img), y, x] = True
                if sx1 <= x and x + 1 <= sx2 and sy1 <= y and y + 1 <= sy2:  # wholly in the spared part
                    inner[int(img), y, x] = True
    return out & ~inner


@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_box_cover_marks_the_grown_boxes_of_each_image(margin: float) -> None:
    rows = [
        [0, 0, 3.0, 2.0, 9.0, 6.0],
        [0, 0, 7.5, 4.5, 12.2, 7.9],  # overlaps the first: covered once, not counted twice
        [1, 0, -3.0, -2.0, 2.0, 3.0],  # clipped at the frame's corner
        [-1, -1, 0.0, 0.0, 0.0, 0.0],  # INVALID_ROW
        [2, 0, 14.0, 8.0, 16.0, 10.0],  # at the far corner
    ]
    got = box_cover(torch.tensor(rows), 3, (10, 16), margin)
    assert got.dtype == torch.bool and got.shape == (3, 10, 16)
    assert torch.equal(got, _cover_by_hand(rows, 3, 10, 16, margin))


def test_box_cover_leaves_the_spared_parts_out() -> None:
    rows = [
        [0, 0, 2.0, 1.0, 12.0, 9.0],
        [0, 0, 8.0, 5.0, 14.0, 9.0],  # overlaps the first box's spared part: that part stays out
        [1, 0, 3.0, 3.0, 5.0, 5.0],  # a spared part smaller than a pixel spares nothing
    ]
    spared = [[0.5, 0.5, 0.0], [0.3, 1.0, 1.0], [0.2, 0.5, 0.5]]
    got = box_cover(torch.tensor(rows), 2, (10, 16), 0.0, torch.tensor(spared))
    assert torch.equal(got, _cover_by_hand(rows, 2, 10, 16, 0.0, spared))
    assert not bool(got[0, 1:5, 5:9].any()) and bool(got[1, 3:5, 3:5].all())


def test_spared_parts_stay_within_the_bounds_and_follow_the_seed() -> None:
    parts = spared_parts(5000, _gen(0), CPU)
    assert parts.shape == (5000, 3) and float(parts.min()) >= 0.0
    assert float(parts[:, 0].max()) < MAX_SPARED and float(parts[:, 0].max()) > 0.95 * MAX_SPARED
    assert float(parts[:, 1:].max()) < 1.0
    assert torch.equal(parts, spared_parts(5000, _gen(0), CPU))


def test_box_cover_of_no_box_is_empty() -> None:
    assert not bool(box_cover(torch.zeros((0, 6)), 2, (4, 6)).any())


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five 16x24 frame pairs, one 6x4 box each at (8, 6): RGB and events both show it (0); a night
    frame whose RGB does not (1); a hovering drone without events (2); both show it (3, 4)."""
    torch.manual_seed(0)
    rgb = 0.7 + 0.01 * torch.rand(5, 3, 16, 24)  # bright sky
    rgb[1] = 0.05 + 0.01 * torch.rand(3, 16, 24)  # night
    event = torch.zeros(5, 3, 16, 24)
    event[:, :, 0, ::5] = 1.0  # a few background events in every frame
    for i in range(5):
        rgb[i, :, 6:10, 8:14] = 0.06 if i == 1 else 0.2  # the drone: dark, as dark as the night sky
        if i != 2:
            event[i, :, 6:10, 8:14:2] = 1.0  # half its pixels fire, except while hovering
    targets = torch.tensor([[i, 0, 8.0, 6.0, 14.0, 10.0] for i in range(5)])
    return rgb, event, targets


def test_shows_tells_which_modality_shows_each_box() -> None:
    rgb, event, targets = _scene()
    with_invalid = torch.cat((targets, torch.tensor([[-1.0, -1, 0, 0, 0, 0]])))
    expected = torch.tensor(
        [[True, True], [False, True], [True, False], [True, True], [True, True], [False, False]]
    )
    assert torch.equal(shows(rgb, event, with_invalid), expected)
    event[3] = (torch.rand(3, 16, 24) < 0.4).float()  # noise everywhere: the box is no denser than the rest
    assert not bool(shows(rgb, event, targets)[3, 1])


def test_shows_computes_only_the_columns_asked_for() -> None:
    rgb, event, targets = _scene()
    both = shows(rgb, event, targets)
    rgb_only = shows(rgb, event, targets, which=(True, False))
    events_only = shows(rgb, event, targets, which=(False, True))
    assert torch.equal(rgb_only[:, 0], both[:, 0]) and not bool(rgb_only[:, 1].any())
    assert torch.equal(events_only[:, 1], both[:, 1]) and not bool(events_only[:, 0].any())


def test_blank_boxes_replaces_a_dropped_modality_only_where_the_other_shows_the_box() -> None:
    rgb, event, targets = _scene()
    before = rgb.clone(), event.clone()
    # dropped: events where RGB shows (0), events at night (1), RGB while hovering (2), RGB (3), none (4)
    dropped = torch.tensor([[False, True], [False, True], [True, False], [True, False], [False, False]])
    blank_boxes(rgb, event, dropped, targets, margin=0.0)
    replaced = torch.tensor([[False, True], [False, False], [False, False], [True, False], [False, False]])
    cover = box_cover(targets, 5, (16, 24), 0.0)
    for k, (got, old) in enumerate(zip((rgb, event), before)):
        elsewhere = old.roll((8, 12), dims=(2, 3))
        for i in range(5):
            inside = cover[i] & replaced[i, k]
            assert torch.equal(got[i][:, inside], elsewhere[i][:, inside])
            assert torch.equal(got[i][:, ~inside], old[i][:, ~inside])
    assert not torch.equal(event[0], before[1][0]) and not torch.equal(rgb[3], before[0][3])


def test_blank_boxes_by_default_replaces_each_box_grown_by_a_tenth() -> None:
    """The documented default area: a 6x4 box grown by a tenth on each side (0.6 x 0.4 pixels, snapped
    outwards to one pixel), not the quarter of the ring ``shows`` compares the box with."""
    rgb, event, targets = _scene()
    event[0] = torch.rand(3, 16, 24)  # no two pixels alike (the RGB shows the box, so it is blanked)
    before = event.clone()
    dropped = torch.tensor([[False, True]] + [[False, False]] * 4)
    blank_boxes(rgb, event, dropped, targets)
    area = torch.zeros(16, 24, dtype=torch.bool)
    area[5:11, 7:15] = True
    assert torch.equal((event[0] != before[0]).any(0), area)
