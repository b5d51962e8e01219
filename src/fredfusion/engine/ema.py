"""Exponential moving average of model weights (the weights that get evaluated and saved as best)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def blend_weights(decay: float, tau: float, limit: int = 10_000_000) -> torch.Tensor:
    """``1 - d`` of every update count, in float64 on the host, computed as the host formula computes it
    (``d = decay * (1 - exp(-(n + 1) / tau))``) up to the count where ``d`` reaches ``decay`` for good."""
    values = []
    for n in range(limit):
        d = decay * (1.0 - math.exp(-(n + 1) / tau)) if tau > 0 else decay
        values.append(1.0 - d)
        if d == decay:
            return torch.tensor(values, dtype=torch.float64)
    raise ValueError(f"EMA tau {tau} is too large: the decay does not settle within {limit} updates")


class ModelEMA:
    """Keeps ema = d * ema + (1 - d) * model, with d ramping up from 0 to `decay` over ~`tau` updates.

    The update count lives on the device and the weight of each update is looked up there, so the update
    never waits for the device and a skipped step (StepGuard) can put the count back with the weights;
    the weights are the host formula's values (``current_decay``), bit for bit.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        first = next(iter(self.module.state_dict().values()), None)
        device = first.device if first is not None else torch.device("cpu")
        self._weights = blend_weights(decay, tau).to(device)
        self.count = torch.tensor(updates, dtype=torch.int64, device=device)

    @property
    def updates(self) -> int:
        """Number of updates so far (a host read of the device count)."""
        return int(self.count)

    @updates.setter
    def updates(self, value: int) -> None:
        self.count.fill_(int(value))

    def current_decay(self) -> float:
        """Decay used by the next update."""
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.tau))

    def tensors(self) -> list[torch.Tensor]:
        """Everything ``update`` writes: the averaged parameters and buffers, and the update count."""
        return [*self.module.parameters(), *self.module.buffers(), self.count]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current weights into the average (no host sync)."""
        last = self._weights.numel() - 1
        weight = self._weights.index_select(0, self.count.clamp(max=last).reshape(1)).reshape(())
        self.count.add_(1)
        source = unwrap(model).state_dict()
        ema_floats, model_floats = [], []
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                ema_floats.append(value)
                model_floats.append(source[name].detach())
            else:
                value.copy_(source[name])
        by_dtype = {t.dtype: weight.to(t.dtype) for t in ema_floats}
        torch._foreach_lerp_(ema_floats, model_floats, [by_dtype[t.dtype] for t in ema_floats])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the averaged model."""
        return self.module.state_dict()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
