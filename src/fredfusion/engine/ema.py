"""Exponential moving average of model weights (the weights that get evaluated and saved as best)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """Keeps ema = d * ema + (1 - d) * model, with d ramping up from 0 to `decay` over ~`tau` updates."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def current_decay(self) -> float:
        """Decay used by the next update."""
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current weights into the average (no host sync)."""
        d = self.current_decay()
        self.updates += 1
        source = unwrap(model).state_dict()
        ema_floats, model_floats = [], []
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                ema_floats.append(value)
                model_floats.append(source[name].detach())
            else:
                value.copy_(source[name])
        torch._foreach_lerp_(ema_floats, model_floats, 1.0 - d)

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
