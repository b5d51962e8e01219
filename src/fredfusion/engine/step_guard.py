"""Keeping a step with a non-finite loss or gradient out of the model, on the device (no host sync).

The writes go through integer views of the tensors: multiplying or selecting bits cannot produce or
keep NaN, unlike float arithmetic, and one multi-tensor kernel serves every tensor of a device and width.
"""

from __future__ import annotations

import torch
from torch import nn


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory seen as integers: arithmetic on it cannot produce or keep NaN."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _bit_groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Integer views of ``tensors`` grouped by device and width (one multi-tensor kernel per group)."""
    groups: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.element_size()), []).append(_bits(t))
    return list(groups.values())


def _select_bits_(dst: list[torch.Tensor], src: list[torch.Tensor], take: torch.Tensor) -> None:
    """dst = src where ``take`` (0/1, dst's dtype) is 1, else dst: bit-exact, NaN-proof."""
    torch._foreach_mul_(dst, 1 - take)
    torch._foreach_add_(dst, torch._foreach_mul(src, take))


def zero_where_(tensors: list[torch.Tensor], flag: torch.Tensor) -> None:
    """Set every tensor to zero when the 0-dim bool ``flag`` is true, without a host sync.

    The integer view is multiplied by 0 or 1: unlike float multiplication this clears NaN and inf
    too, and it is one multi-tensor kernel per device instead of one ``torch.where`` per tensor.
    """
    keep = ~flag
    for bits in _bit_groups(tensors):
        torch._foreach_mul_(bits, keep.to(device=bits[0].device, dtype=bits[0].dtype))


def restore_where_(tensors: list[torch.Tensor], saved: list[torch.Tensor], flag: torch.Tensor) -> None:
    """tensors = saved where the 0-dim bool ``flag`` is true, bit-exact and NaN-proof, no host sync."""
    for dst, src in zip(_bit_groups(tensors), _bit_groups(saved)):
        _select_bits_(dst, src, flag.to(device=dst[0].device, dtype=dst[0].dtype))


class StepGuard:
    """Keeps a step with a non-finite loss or gradient out of the model, on the device.

    ``begin`` saves the floating-point buffers (BN running statistics, which a forward pass with NaN
    activations would poison); ``end(bad, grads)`` zeroes the gradients and restores the buffers when
    ``bad`` is true, and counts. ``counts`` (device, int64): current run of bad steps, longest run since
    the last ``reset_longest``, bad steps since the last ``reset_epoch``. Nothing here syncs the host.
    The buffers must keep their identity (in-place updates and load_state_dict do).
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.buffers = [b for b in model.buffers() if b.dtype.is_floating_point]
        self.saved = [b.detach().clone() for b in self.buffers]
        self._pairs = list(zip(_bit_groups(self.buffers), _bit_groups(self.saved)))
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)

    def begin(self) -> None:
        """Save the buffers before the forward pass."""
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def end(self, bad: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """After backward: zero ``grads`` and restore the buffers when ``bad`` (0-dim bool) is true."""
        if grads:
            zero_where_(grads, bad)
        for dst, src in self._pairs:
            _select_bits_(dst, src, bad.to(device=dst[0].device, dtype=dst[0].dtype))
        step = bad.to(torch.int64)
        self.counts[0:1].add_(step).mul_(step)  # run + 1 after a bad step, 0 after a good one
        self.counts[1:2] = torch.maximum(self.counts[1:2], self.counts[0:1])
        self.counts[2:3].add_(step)

    def reset_longest(self) -> None:
        """Start a new longest-run window at the current run."""
        self.counts[1:2] = self.counts[0:1]

    def reset_epoch(self) -> None:
        """Zero the epoch's bad-step count."""
        self.counts[2:3].zero_()
