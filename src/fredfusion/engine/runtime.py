"""Where and how a job runs: the process group (torchrun), the device, the precision."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    """torchrun environment: rank, world size, local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )

    def init(self, device: torch.device) -> None:
        """Join the process group when there are several processes (NCCL on CUDA, else Gloo)."""
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend=backend)

    def sum(self, values: tuple[int, ...], device: torch.device) -> tuple[int, ...]:
        """``values`` summed over every process (as they are with one process)."""
        if self.world_size == 1:
            return values
        shared = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(shared)
        return tuple(int(v) for v in shared.tolist())


DEVICE_TYPES = ("cpu", "cuda", "mps")
"""The device types a job runs on."""


def pick_device(requested: str = "", local_rank: int = 0) -> torch.device:
    """The device a job runs on: ``requested`` (cpu, cuda, cuda:1, or a bare GPU index such as 1) or
    cuda when available, else cpu.

    A bare ``cuda`` means ``cuda:<local_rank>`` (one GPU per torchrun process). A device torch does not
    know, one this machine does not have (CUDA without a GPU, ``cuda:7`` with two GPUs) or a list of
    GPUs is a ValueError naming ``--device``.
    """
    what = f"--device {requested!r}"
    if requested:
        text = requested.strip().lower()
        if "," in text:
            raise ValueError(f"{what}: one device per process; for several GPUs use torchrun (see README)")
        text = f"cuda:{text}" if text.isdigit() else text
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(f"{what}: not a device; use cpu, cuda, cuda:N or N") from None
        if device.type not in DEVICE_TYPES:
            raise ValueError(f"{what}: not a device this tool runs on; use cpu, cuda, cuda:N or N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{what}: CUDA is not available on this machine; use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"{what}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"{what}: MPS (Apple GPU) is not available on this machine")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (full precision) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``amp_dtype`` on ``device``, or nothing when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)
