"""``batch_size: auto``: the largest training batch that fits, picked before training starts.

On CUDA it is measured: trial training steps (augmentation with Mosaic + MixUp, forward, loss, backward,
optimizer step, EMA, eager) on a copy of the model at candidate batches, doubling from the memory
estimate's guess while a step fits and halving while it does not, then bisecting between the largest
batch that fit and the smallest that did not (to a multiple of 8 from 16 on). A batch fits when its
step does not run out of memory and its peak stays within ``FRACTION`` of the device memory free before
the trials (the rest is the margin: allocator fragmentation, the loader's batch on the device, a
compiled step's other kernels). A freeze phase is measured with its backbones frozen (no gradients
there: a larger batch fits).

On a CPU (or MPS) memory rarely limits and speed does not grow with the batch, so ``auto`` takes the
memory estimate's largest batch (``engine.memory``, with its margin) up to ``CPU_MAX``, the batch
Ultralytics falls back to without CUDA. Either way the batch is capped by the train images per process,
and the learning rate follows by the nominal-batch rule (``TrainStep.base_lr``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fredfusion.config import AUTO_BATCH, ConfigError, TrainConfig
from fredfusion.data.loader import DeviceBatch
from fredfusion.engine.memory import GiB, PeakMemory, free_bytes, training_need
from fredfusion.engine.step import TrainStep
from fredfusion.spec import frames_for

FRACTION = 0.9
"""On CUDA a trial step's peak may take this share of the memory free before the trials."""
CPU_MAX = 16
"""On a CPU ``auto`` takes at most this batch (Ultralytics' batch without CUDA)."""
CUDA_MAX = 1024
"""The largest batch ``auto`` tries on CUDA."""
ROUND_FROM = 16
"""From this batch on, candidates are multiples of 8."""


@dataclass(frozen=True)
class AutoBatch:
    """The batch ``auto`` picked for a phase and how (one clause for the log)."""

    batch: int
    detail: str


def largest_fitting(
    fits: Callable[[int], bool], start: int, limit: int
) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch in ``[1, limit]`` for which ``fits`` is true (0 when not even 1 fits), and the
    trials made, in order.

    ``fits`` must be monotone (true up to some batch, false above). From ``start`` (rounded down to a
    power of two) the batch doubles
    while it fits (up to ``limit``) or halves while it does not, then the gap between the largest batch
    that fit and the smallest that did not is bisected; from ``ROUND_FROM`` on only multiples of 8 are
    tried. Each batch is tried at most once."""
    trials: list[tuple[int, bool]] = []

    def test(batch: int) -> bool:
        ok = fits(batch)
        trials.append((batch, ok))
        return ok

    batch = 1 << (min(max(start, 1), limit).bit_length() - 1)  # a power of two: candidates stay round
    lo, hi = 0, limit + 1  # lo fits (0: none known), hi does not (limit + 1: untried)
    if test(batch):
        lo = batch
        while lo < limit:
            batch = min(2 * lo, limit)
            if not test(batch):
                hi = batch
                break
            lo = batch
    else:
        hi = batch
        while hi > 1:
            batch = hi // 2
            if test(batch):
                lo = batch
                break
            hi = batch
    while lo > 0:
        step = 8 if lo >= ROUND_FROM else 1
        mid = lo + step * max(1, (hi - lo) // step // 2)
        if mid >= hi:
            break
        if test(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def measured_fits(
    trial: Callable[[int], int], budget: int, cleanup: Callable[[], None]
) -> Callable[[int], bool]:
    """A ``fits`` for ``largest_fitting`` from a trial step: ``trial(batch)`` runs one step and returns
    its peak added memory (bytes); a batch fits when that stays within ``budget`` and the step did not
    run out of memory. ``cleanup`` runs after an out-of-memory step (its tensors released first)."""

    def fits(batch: int) -> bool:
        peak = None
        with contextlib.suppress(torch.OutOfMemoryError):
            peak = trial(batch)
        if peak is None:  # outside the handler: the failed step's frames are gone
            cleanup()
            return False
        return peak <= budget

    return fits


def synthetic_batch(
    modality: str, batch: int, store_hw: tuple[int, int], device: torch.device, seed: int = 0
) -> DeviceBatch:
    """A loader-like batch on ``device``: random uint8 frames of the store size (channels-last views) and
    two drone-sized boxes per image."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, w = store_hw
    kinds = frames_for(modality)

    def frames() -> torch.Tensor:
        pixels = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=gen)
        return pixels.to(device).permute(0, 3, 1, 2)

    rgb = frames() if "rgb" in kinds else None
    event = frames() if "event" in kinds else None
    per = 2
    size = (torch.rand((batch * per, 2), generator=gen) * 0.04 + 0.02) * torch.tensor([w, h])
    centre = (torch.rand((batch * per, 2), generator=gen) * 0.8 + 0.1) * torch.tensor([w, h])
    targets = torch.zeros((batch * per, 6))
    targets[:, 0] = torch.arange(batch).repeat_interleave(per).float()
    targets[:, 2:4] = centre - size / 2
    targets[:, 4:6] = centre + size / 2
    return DeviceBatch(ids=torch.arange(batch), rgb=rgb, event=event, targets=targets.to(device), wait_s=0.0)


@contextlib.contextmanager
def frozen_backbones(model: nn.Module, frozen: bool) -> Iterator[None]:
    """The model's backbones without gradients (as in a freeze phase) inside the block, then as before."""
    params = [p for m in model.backbone_modules() for p in m.parameters()] if frozen else []
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def cpu_batch(
    model: nn.Module,
    cfg: TrainConfig,
    store_hw: tuple[int, int],
    frozen: bool,
    limit: int,
) -> AutoBatch:
    """The CPU rule: the memory estimate's largest batch, at most ``CPU_MAX`` and ``limit``."""
    with frozen_backbones(model, frozen):
        need, fixed = training_need(
            model,
            (int(cfg.input_shape[0]), int(cfg.input_shape[1])),
            1,
            store_hw=store_hw,
            optimizer="adamw" if cfg.optimizer == "auto" else cfg.optimizer,
            workers=cfg.num_workers,
            prefetch=cfg.prefetch_factor,
        )
    room = int((need.free - fixed) // max(need.per_image, 1))
    if room < 1:
        raise ConfigError(
            f"batch auto: not even batch 1 fits the {need.free / GiB:.1f} GiB free ({need.line()}); "
            "lower --imgsz or --model, or free memory"
        )
    batch = min(room, CPU_MAX, limit)
    cap = f"at most {CPU_MAX} on a CPU" if batch == CPU_MAX else f"at most {limit}: the train images"
    return AutoBatch(
        batch,
        f"on the CPU: the memory estimate allows about {room} in the {need.free / GiB:.1f} GiB free, auto "
        f"takes {cap}; give --batch N for another",
    )


class TrialSteps:
    """Trial training steps on a copy of ``model`` (frozen backbones for a freeze phase), eager: the
    copy, its optimizer state, EMA and step guard are what the run will hold. ``close`` frees them."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        store_hw: tuple[int, int],
        frozen: bool,
    ) -> None:
        self.device = device
        self.store_hw = store_hw
        self.modality = cfg.modality
        self.model = copy.deepcopy(model)
        for module in self.model.backbone_modules() if frozen else []:
            module.requires_grad_(False)
        self.model.train()
        for module in self.model.backbone_modules() if frozen else []:
            module.eval()
        choice = ("adamw", None) if cfg.optimizer in ("auto", "adam", "adamw") else (cfg.optimizer, None)
        eager = dataclasses.replace(cfg, compile=False)  # a compiled loss would compile at every batch tried
        self.step = TrainStep(
            eager, self.model, 1, device=device, amp_dtype=amp_dtype, optimizer_choice=choice
        )
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.seed)

    def __call__(self, batch: int) -> int:
        """One step at ``batch``; the memory it added at its peak (bytes)."""
        item = synthetic_batch(self.modality, batch, self.store_hw, self.device, seed=batch)
        with PeakMemory(self.device) as peak:
            self.step.run(self.model, item, True, self.generator)
        return int(peak.added or 0)

    def after_oom(self) -> None:
        """After a step that ran out of memory: drop its gradients, give the cached blocks back."""
        self.step.reset_after_oom()
        release(self.device)

    def close(self) -> None:
        """Free the copy and its state."""
        del self.step, self.model
        release(self.device)


def release(device: torch.device) -> None:
    """Collect garbage and return cached device memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_batch(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    store_hw: tuple[int, int],
    frozen: bool,
    limit: int,
) -> AutoBatch:
    """The measured rule (module notes): trial steps on ``device``."""
    trials = TrialSteps(cfg, model, device=device, amp_dtype=amp_dtype, store_hw=store_hw, frozen=frozen)
    try:
        trials(1)  # optimizer state and EMA allocated, kernels chosen: later trials measure the batch
        release(device)
        free = free_bytes(device)
        with frozen_backbones(model, frozen):
            need, _fixed = training_need(
                model,
                (int(cfg.input_shape[0]), int(cfg.input_shape[1])),
                1,
                store_hw=store_hw,
                device=device,
                half=amp_dtype is not None,
            )
        start = max(1, int((free * FRACTION) // max(need.per_image, 1)))
        budget = int(free * FRACTION)
        batch, tried = largest_fitting(measured_fits(trials, budget, trials.after_oom), start, limit)
    finally:
        trials.close()
    if batch < 1:
        raise ConfigError(
            f"batch auto: not even batch 1 fits on {device} ({free / GiB:.1f} GiB free); lower --imgsz or "
            "--model"
        )
    failed = sorted(b for b, ok in tried if not ok and b > batch)
    above = f"; {failed[0]} did not" if failed else f"; the cap is {limit}"
    return AutoBatch(
        batch,
        f"{len(tried)} trial steps on {device}, the largest whose peak stays within {FRACTION:.0%} of the "
        f"{free / GiB:.1f} GiB free{above}",
    )


def resolve_auto_batches(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    store_hw: tuple[int, int],
    train_images: int,
    phases: set[bool],
    world_size: int = 1,
) -> tuple[TrainConfig, dict[bool, AutoBatch]]:
    """``cfg`` with every ``auto`` batch replaced by the number picked for its phase (True: freeze), and
    the picks. ``phases`` are the phases the run will train; an ``auto`` batch of a phase that does not
    run takes the other phase's batch."""
    fields = {True: "freeze_batch_size", False: "unfreeze_batch_size"}
    wanted = [frozen for frozen, name in fields.items() if getattr(cfg, name) == AUTO_BATCH]
    if not wanted:
        return cfg, {}
    limit = max(1, min(train_images // max(world_size, 1), CUDA_MAX))
    picks: dict[bool, AutoBatch] = {}
    for frozen in sorted(set(wanted) & phases or {wanted[0]}):
        if device.type == "cuda":
            picks[frozen] = cuda_batch(
                cfg, model, device=device, amp_dtype=amp_dtype, store_hw=store_hw, frozen=frozen, limit=limit
            )
        else:
            picks[frozen] = cpu_batch(model, cfg, store_hw, frozen, limit)
    values = {}
    for frozen in wanted:
        if frozen in picks:
            values[fields[frozen]] = picks[frozen].batch
        else:
            other = getattr(cfg, fields[not frozen])
            values[fields[frozen]] = picks[not frozen].batch if other == AUTO_BATCH else other
    return dataclasses.replace(cfg, **values), picks
