"""Blanking one modality of dual samples: the share modality dropout blanks, never both, reproducible
draws, missing frames blanked, and zeros exactly where the masks say (no host sync: test_augment)."""

from __future__ import annotations

import pytest
import torch

from fredfusion.data.blanking import blank_frames, keep_masks

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
