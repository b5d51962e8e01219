"""Optimizer parameter groups and the learning-rate schedule (warm-up + cosine, a function of progress)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW with weight decay on conv/linear weights only (not on BN or biases)."""
    decay, no_decay, biases = [], [], []
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if pname == "bias":
                biases.append(param)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": biases, "weight_decay": 0.0},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name in ("adamw", "adam"):
        on_cuda = any(p.is_cuda for p in model.parameters())
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), capturable=on_cuda)
    raise ValueError(f"unknown optimizer {name!r} (sgd, adamw)")


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _adam_steps_on_device(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Adam's step counts live on the parameters' device on CUDA (``capturable``: the bias correction is
    computed there, so a count can be restored without a host sync) and on the host elsewhere; a state
    loaded from a checkpoint of the other kind is moved."""
    on_cuda = any(p.is_cuda for p in group["params"])
    if group.get("capturable", False) == on_cuda:
        return
    group["capturable"] = on_cuda
    for p in group["params"]:
        step = optimizer.state.get(p, {}).get("step")
        if isinstance(step, torch.Tensor):
            device = p.device if on_cuda else torch.device("cpu")
            optimizer.state[p]["step"] = step.to(device=device, dtype=_scalar_dtype())


def prepare_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the next ``optimizer.step()`` updates (those with a gradient), with their state
    created now where the step would create it, so that it can be saved before the step.

    The state is what the step itself would make and update to the same bits: AdamW's zero step count
    and moments as torch creates them; for SGD a momentum buffer of -0.0, which ``buf * momentum + grad``
    turns into exactly ``grad`` (the buffer torch creates at the first step), signed zeros included.
    """
    stepped = []
    for group in optimizer.param_groups:
        adam = "betas" in group
        if adam:
            _adam_steps_on_device(optimizer, group)
        for p in group["params"]:
            if p.grad is None:
                continue
            stepped.append(p)
            state = optimizer.state[p]
            if state:
                continue
            if adam:
                state["step"] = (
                    torch.zeros((), dtype=_scalar_dtype(), device=p.device)
                    if group["capturable"] or group.get("fused")
                    else torch.tensor(0.0, dtype=_scalar_dtype())
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif group.get("momentum", 0) != 0:
                state["momentum_buffer"] = torch.full_like(p, -0.0, memory_format=torch.preserve_format)
    return stepped


AUTO_MAX_STEPS = 10_000
"""``optimizer: auto`` picks AdamW for schedules of at most this many optimizer steps, SGD beyond."""
AUTO_ADAMW_LR = 2e-3
"""Learning rate of the AdamW that ``auto`` picks (fixed: not scaled by the batch size)."""


def resolve_optimizer(name: str, total_steps: int) -> tuple[str, float | None]:
    """The optimizer a run uses and its fixed learning rate (None: Init_lr scaled by the batch).

    ``auto`` is AdamW at :data:`AUTO_ADAMW_LR` for a schedule of at most :data:`AUTO_MAX_STEPS`
    steps (a short run from scratch learns several times faster with it than with SGD), else SGD.
    """
    if name != "auto":
        return name, None
    if total_steps <= AUTO_MAX_STEPS:
        return "adamw", AUTO_ADAMW_LR
    return "sgd", None


def scaled_lr(init_lr: float, batch_size: int, optimizer: str, nominal_batch: int = 64) -> float:
    """Init_lr scaled by batch / nominal batch, clamped to the ranges the seed tool used."""
    lo, hi = (3e-4, 1e-3) if optimizer in ("adam", "adamw") else (5e-4, 5e-2)
    if optimizer in ("adam", "adamw") and init_lr > hi:
        init_lr = 1e-3  # the seed default 1e-2 is an SGD value
    return min(max(batch_size / nominal_batch * init_lr, lo), hi)


@dataclass(frozen=True)
class LRSchedule:
    """lr(progress), progress in (fractional) epochs: linear warm-up, then cosine / linear / step decay."""

    total_epochs: float
    warmup_epochs: float
    min_lr_ratio: float
    kind: str = "cos"
    warmup_start: float = 0.1
    warmup_momentum: float = 0.8

    def factor(self, progress: float) -> float:
        """Multiplier of the phase's base learning rate at this point of training."""
        warm = min(self.warmup_epochs, 0.3 * self.total_epochs)
        if warm > 0 and progress < warm:
            return self.warmup_start + (1.0 - self.warmup_start) * progress / warm
        span = max(self.total_epochs - warm, 1e-9)
        t = min(max((progress - warm) / span, 0.0), 1.0)
        low = self.min_lr_ratio
        if self.kind == "cos":
            return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "linear":
            return 1.0 - (1.0 - low) * t
        steps = 10  # "step": ten equal drops to the minimum
        return low ** (math.floor(t * steps) / steps)

    def momentum(self, progress: float, momentum: float) -> float:
        """Momentum warms up from warmup_momentum to its value together with the learning rate."""
        warm = min(self.warmup_epochs, 0.3 * self.total_epochs)
        if warm > 0 and progress < warm:
            return self.warmup_momentum + (momentum - self.warmup_momentum) * progress / warm
        return momentum


def set_lr(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None = None) -> None:
    """Apply a learning rate (and SGD momentum / Adam beta1) to every group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None:
            if "momentum" in group:
                group["momentum"] = momentum
            elif "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
