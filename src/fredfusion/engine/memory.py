"""Memory a job will need, estimated before it starts, against what is free.

The estimate counts what one step adds to a process that already holds the model (and its EMA):
gradients and optimizer state (from the parameter count), the activations autograd keeps for backward
(measured by running the model once on a small input under ``saved_tensors_hooks`` and scaled by the
input area, which is exact for inputs that are multiples of the largest stride), the augmentation's
canvases, and the batches the loader workers hold. Evaluation keeps no activations for backward; its
peak is a share of the training activations (``EVAL_SHARE``). The margins come from measured peaks
(``benchmarks/bench_memory.py``, docs/DESIGN.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fredfusion.spec import INPUT_MULTIPLE, frames_for

MARGIN = 1.25
"""The estimate is multiplied by this (the largest measured peak / estimate was below it)."""
EVAL_SHARE = 0.35
"""Peak activations of an evaluation batch as a share of the training activations of the same batch."""
AUGMENT_FLOATS = 6
"""float32 copies of an input image (per modality) the augmentation holds at once (canvases, blends)."""
GiB = 2**30


def free_bytes(device: torch.device | None = None) -> int:
    """Memory a new allocation can take: on CUDA the free device memory, on the CPU the kernel's
    MemAvailable, lowered to what the process's cgroup (container) limit leaves."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            available = min(available, int(limit) - usage)
    return max(int(available), 0)


def rss_bytes() -> int:
    """Resident set size of this process (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """What a block adds at its peak: device memory on CUDA (allocator statistics), the resident set on
    the CPU (the kernel's high-water mark, reset on entry; Linux). ``added`` is None where unknown."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.added: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = rss_bytes()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.added = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._start is None:
            return
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self.added = int(line.split()[1]) * 1024 - self._start


def saved_bytes_per_image(model: nn.Module, input_hw: tuple[int, int]) -> int:
    """Bytes of the tensors autograd keeps from one image's forward pass at ``input_hw`` (float32).

    Runs the model once in train mode on a zero input of at most 64 rows (no random numbers drawn,
    BatchNorm statistics put back) and scales by the input area."""
    h, w = input_hw
    ph = min(h, 2 * INPUT_MULTIPLE)
    pw = max(INPUT_MULTIPLE, round(w * ph / h / INPUT_MULTIPLE) * INPUT_MULTIPLE)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    device = next(model.parameters()).device
    x = torch.zeros((1, 3, ph, pw), device=device)
    inputs = {kind: x for kind in frames_for(model.modality)}
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            out = model(inputs.get("rgb"), inputs.get("event"))
        del out
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.train(was_training)
    return int(sum(storages.values()) * (h * w) / (ph * pw))


@dataclass(frozen=True)
class MemoryNeed:
    """What a job adds to the process (bytes) and what is free; ``fits`` when the margin allows it."""

    what: str
    need: int
    free: int
    per_image: int

    @property
    def fits(self) -> bool:
        """The estimate times MARGIN fits in the free memory."""
        return self.need <= self.free

    def largest_batch(self, batch: int, fixed: int) -> int:
        """The largest batch whose estimate fits (0 when none)."""
        room = self.free - fixed
        return max(0, min(batch, int(room // max(self.per_image, 1))))

    def line(self) -> str:
        """One line: what is needed and what is free."""
        return (
            f"memory: {self.what} needs about {self.need / GiB:.1f} GiB more (estimate x{MARGIN:g}), "
            f"{self.free / GiB:.1f} GiB free"
        )


def _loader_bytes(store_hw: tuple[int, int], modality: str, batch: int, workers: int, prefetch: int) -> int:
    frame = store_hw[0] * store_hw[1] * 3 * len(frames_for(modality))
    return (max(workers, 1) * prefetch + 2) * batch * frame


def training_need(
    model: nn.Module,
    input_hw: tuple[int, int],
    batch: int,
    *,
    store_hw: tuple[int, int],
    optimizer: str = "sgd",
    workers: int = 0,
    prefetch: int = 2,
    device: torch.device | None = None,
    half: bool = False,
) -> tuple[MemoryNeed, int]:
    """(``MemoryNeed`` of a training step at ``batch`` images, the bytes that do not grow with the batch).

    Gradients, optimizer state (1 slot for SGD, 2 for AdamW) and EMA weights, the step guard's copy of
    what an update writes (parameters, optimizer state, EMA), saved activations (halved with ``half``:
    mixed precision) and augmentation canvases per image, the loader's batches in flight on the host
    (not counted for a CUDA ``device``); times MARGIN."""
    param_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    slots = 2 if optimizer in ("adamw", "adam", "auto") else 1
    per_image_raw = saved_bytes_per_image(model, input_hw) // (2 if half else 1)
    per_image_raw += AUGMENT_FLOATS * 3 * input_hw[0] * input_hw[1] * 4 * len(frames_for(model.modality))
    on_host = device is None or device.type != "cuda"
    loader_per_image = _loader_bytes(store_hw, model.modality, 1, workers, prefetch) if on_host else 0
    # gradients, optimizer slots and EMA weights; the step guard copies parameters, slots and EMA again
    fixed = int(param_bytes * 2 * (2 + slots) * MARGIN)
    per_image = int(per_image_raw * MARGIN) + loader_per_image
    need = MemoryNeed(f"training at batch {batch}", fixed + batch * per_image, free_bytes(device), per_image)
    return need, fixed


def evaluation_need(
    model: nn.Module,
    input_hw: tuple[int, int],
    batch: int,
    *,
    store_hw: tuple[int, int],
    workers: int = 0,
    device: torch.device | None = None,
) -> MemoryNeed:
    """``MemoryNeed`` of evaluating batches of ``batch`` images (inference without gradients)."""
    per_image = int(saved_bytes_per_image(model, input_hw) * EVAL_SHARE * MARGIN)
    per_image += int(3 * input_hw[0] * input_hw[1] * 4 * len(frames_for(model.modality)) * MARGIN)
    per_image += _loader_bytes(store_hw, model.modality, 1, workers, 2)
    return MemoryNeed(f"evaluation at batch {batch}", batch * per_image, free_bytes(device), per_image)
