"""Making a step with a non-finite loss or gradient a no-op, on the device (no host sync).

The guard keeps a copy of everything a step may change: the model's buffers (BN statistics, which a
forward pass with NaN activations poisons) before the forward pass, and after backward the tensors the
update writes (parameters with a gradient, their optimizer state, the GradScaler's scale, the EMA). After
the step the copy is put back wherever the step's flag says bad. The writes go through integer views of
the tensors: selecting bits is exact and cannot produce or keep NaN, so a bad step leaves every one of
those tensors bit for bit as it was and a good step is left untouched; one multi-tensor kernel serves
every tensor of a device and width.
"""

from __future__ import annotations

import torch
from torch import nn


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory seen as integers: arithmetic on it cannot produce or keep NaN."""
    return t.detach().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _bit_groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Integer views of ``tensors`` grouped by device and width (one multi-tensor kernel per group)."""
    groups: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.element_size()), []).append(_bits(t))
    return list(groups.values())


def _select_bits_(dst: list[torch.Tensor], src: list[torch.Tensor], take: torch.Tensor) -> None:
    """dst = src where ``take`` (0/1, dst's dtype) is 1, else dst: bit-exact, NaN-proof. ``src`` is used
    as scratch (left as src * take): nothing is allocated."""
    torch._foreach_mul_(src, take)
    torch._foreach_mul_(dst, 1 - take)
    torch._foreach_add_(dst, src)


@torch.no_grad()
def restore_where_(tensors: list[torch.Tensor], saved: list[torch.Tensor], flag: torch.Tensor) -> None:
    """tensors = saved where the 0-dim bool ``flag`` is true, bit-exact and NaN-proof, no host sync."""
    for dst, src in zip(_bit_groups(tensors), _bit_groups([t.clone() for t in saved])):
        _select_bits_(dst, src, flag.to(device=dst[0].device, dtype=dst[0].dtype))


class Snapshot:
    """A copy of a list of tensors, taken again and again; the copies are allocated once and again only
    when the list holds other tensors (another phase, a resumed optimizer, state created by a step)."""

    def __init__(self) -> None:
        self.live: list[torch.Tensor] = []
        self._pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    @torch.no_grad()
    def take(self, tensors: list[torch.Tensor]) -> None:
        """Copy ``tensors`` (bit for bit, on their devices)."""
        if len(tensors) == len(self.live) and all(a is b for a, b in zip(tensors, self.live)):
            for dst, src in self._pairs:
                torch._foreach_copy_(dst, src)
            return
        self.live = list(tensors)
        saved = [t.detach().clone() for t in tensors]
        self._pairs = list(zip(_bit_groups(saved), _bit_groups(self.live)))

    @torch.no_grad()
    def restore_where(self, flag: torch.Tensor) -> None:
        """Put the copy back into the tensors it was taken from where the 0-dim bool ``flag`` is true.
        The copy is used up (``take`` makes the next one)."""
        for saved, live in self._pairs:
            _select_bits_(live, saved, flag.to(device=live[0].device, dtype=live[0].dtype))


class StepGuard:
    """Makes a step whose ``bad`` flag is true a no-op, on the device, and counts such steps.

    ``begin`` copies the model's buffers before the forward pass; ``save(tensors)`` copies what the
    update is about to write, after backward; ``end(bad)`` puts both copies back when ``bad`` (0-dim bool)
    is true and counts. ``counts`` (device, int64): current run of bad steps, longest run since the last
    ``reset_longest``, bad steps since the last ``reset_epoch``. Nothing here syncs the host.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self._buffers = Snapshot()
        self._update = Snapshot()
        self._saved = False
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)

    def begin(self) -> None:
        """Copy the model's buffers before the forward pass."""
        self._buffers.take(list(self.model.buffers()))
        self._saved = False

    def save(self, tensors: list[torch.Tensor]) -> None:
        """Copy the tensors the update will write (after backward, before the optimizer step)."""
        self._update.take(tensors)
        self._saved = True

    def end(self, bad: torch.Tensor) -> None:
        """After the update: put back the buffers and the saved tensors when ``bad`` is true; count."""
        self._buffers.restore_where(bad)
        if self._saved:  # a copy of this step's update, not of an earlier one
            self._update.restore_where(bad)
        self._saved = False
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
