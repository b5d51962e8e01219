"""Helpers several test modules use: tiny training settings and a bit-for-bit tensor comparison."""

from __future__ import annotations

from typing import Any

import torch

TINY_TRAIN: dict[str, Any] = {
    "model": "n",
    "input_shape": [64, 128],
    "freeze_train": False,
    "unfreeze_batch_size": 8,
    "freeze_batch_size": 8,
    "num_workers": 0,
    "persistent_workers": False,
    "eval_period": 1,
    "warmup_epochs": 0.5,
    "log_interval": 2,
    "save_period": 0,
    "precise_bn": 16,
    "eval_batch_size": 16,
}
"""A training run on the tiny prepared samples: YOLO-n at 64x128, batch 8, on the CPU in seconds."""


def same_bits(a: Any, b: Any) -> bool:
    """Equal bit for bit (tensors: dtype, shape and every bit, NaN and signed zeros included)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b) and a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(ints), b.contiguous().view(ints)
    return torch.equal(a, b)
