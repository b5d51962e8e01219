"""The training loop: phases (freeze / unfreeze), AMP, EMA, schedule, evaluation, checkpoints, resume, DDP.

Faults the loop trains through, and where it stops (with a message naming what happened and what was kept):

- unreadable train images (frame store file damaged after prepare, source frame gone or corrupt on the
  decoding path) are skipped: zeros without boxes, counted per epoch; more than ``max_bad_frame_share``
  of an epoch stops the run;
- a step whose loss or gradients are not finite is skipped on the device (gradients zeroed, BN
  statistics restored), counted, and checked on the host every ``log_interval`` steps; ``max_bad_steps``
  in a row stop the run without saving the poisoned state;
- out of memory in the first ``OOM_RETRY_STEPS`` steps of a phase halves the batch and rescales the
  learning rate; later, or below batch 1, it stops the run;
- a checkpoint that cannot be written (disk full, no permission) stops the run with the previous
  checkpoint intact; an unwritable run folder stops it before training starts.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fredfusion.config import ConfigError, TrainConfig, save_config
from fredfusion.data.augment import AugmentConfig, augment_batch
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.frames import BadFrameError
from fredfusion.data.loader import BatchLoader, DeviceBatch
from fredfusion.engine.batchnorm import recalibrate_batchnorm
from fredfusion.engine.checkpoint import copy_checkpoint, save_checkpoint
from fredfusion.engine.ema import ModelEMA, unwrap
from fredfusion.engine.optim import (
    AUTO_MAX_STEPS,
    LRSchedule,
    build_optimizer,
    resolve_optimizer,
    scaled_lr,
    set_lr,
)
from fredfusion.engine.run_log import RunLog
from fredfusion.engine.runtime import Distributed, amp_dtype_for, pick_device
from fredfusion.model import build_model, model_info
from fredfusion.model.loss import LossConfig, YoloLoss
from fredfusion.model.weights import CheckpointError, load_checkpoint, model_meta, state_dict_of

DEFAULT_RGB_WEIGHTS = Path("logs/fred_rgb/fred_rgb_best.pth")
OOM_RETRY_STEPS = 10  # out of memory within this many steps of a phase start halves the batch


class TrainingStopped(SystemExit):
    """The run met a fault it does not train through; the message says what happened and what was kept."""


class _OutOfMemory(Exception):
    """Leaves an epoch when the device ran out of memory (step = steps done in the phase)."""

    def __init__(self, step: int, detail: str) -> None:
        super().__init__(detail)
        self.step = step
        self.detail = detail


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
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def end(self, bad: torch.Tensor, grads: list[torch.Tensor]) -> None:
        if grads:
            zero_where_(grads, bad)
        for dst, src in self._pairs:
            _select_bits_(dst, src, bad.to(device=dst[0].device, dtype=dst[0].dtype))
        step = bad.to(torch.int64)
        self.counts[0:1].add_(step).mul_(step)  # run + 1 after a bad step, 0 after a good one
        self.counts[1:2] = torch.maximum(self.counts[1:2], self.counts[0:1])
        self.counts[2:3].add_(step)

    def reset_longest(self) -> None:
        self.counts[1:2] = self.counts[0:1]

    def reset_epoch(self) -> None:
        self.counts[2:3].zero_()


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The augmentation settings of a training run with ``cfg``."""
    return AugmentConfig(
        mosaic=cfg.mosaic,
        mosaic_prob=cfg.mosaic_prob,
        mixup=cfg.mixup,
        mixup_prob=cfg.mixup_prob,
        translate=cfg.translate,
        scale=cfg.scale,
        fliplr=cfg.fliplr,
        hsv_h=cfg.hsv_h,
        hsv_s=cfg.hsv_s,
        hsv_v=cfg.hsv_v,
    )


class Trainer:
    """Runs one training job described by a TrainConfig (see `fredfusion train --help`)."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.dist = Distributed.from_env()
        self._log = log
        self.device = pick_device(cfg.device, self.dist.local_rank)
        self.amp_dtype = amp_dtype_for(self.device, cfg.fp16)
        self.run_dir = cfg.run_dir()
        self.input_hw = (int(cfg.input_shape[0]), int(cfg.input_shape[1]))
        self.checks: dict[str, Any] = {}
        self._batch_override: dict[bool, int] = {}  # phase (frozen) -> batch lowered after out of memory
        self._phase_steps = 0  # steps done since the current phase (batch size) started
        self._saved_epoch: int | None = None  # epoch of the last checkpoint on disk
        # (optimizer, fixed lr or None): "auto" is resolved again in fit() from the schedule's length
        self.optim_choice = resolve_optimizer(cfg.optimizer, 0)

    def log(self, message: str) -> None:
        if self.dist.main:
            self._log(message)

    # ----------------------------------------------------------------- setup
    def _setup_distributed(self) -> None:
        if self.dist.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend=backend)

    def _check_run_dir(self) -> None:
        """Fail before any work when the run folder cannot be created or written."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=self.run_dir)
            os.close(fd)
            os.unlink(probe)
            for stale in self.run_dir.glob(".*.pth.*.tmp"):  # left by a process killed mid-save
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise TrainingStopped(
                f"run folder {self.run_dir} is not writable ({exc.strerror or exc}); "
                f"fix its permissions or free space, or choose another save_dir / name"
            ) from None

    def _datasets(self) -> None:
        cfg = self.cfg
        self.train_set = PreparedDataset(
            Path(cfg.data), "train", modality=cfg.modality, pairs=cfg.pairs, skip_bad=True
        )
        if len(self.train_set) == 0:
            raise SystemExit(f"{cfg.data}: the train split has no usable images for modality {cfg.modality}")
        self.val_set = None
        try:
            val = PreparedDataset(
                Path(cfg.data),
                "val",
                modality=cfg.modality,
                pairs="dual",
                max_images=100 if cfg.quick_test else None,
            )
            self.val_set = val if len(val) else None
        except FileNotFoundError:
            self.val_set = None
        summary = self.train_set.pairing_summary()
        self.checks["data"] = (
            f"{len(self.train_set)} train / {len(self.val_set or [])} val images in {cfg.data}"
        )
        self.checks["dual_rate"] = (
            f"{summary['dual']}/{summary['images']} ({100 * summary['dual_rate']:.1f}%)"
        )
        self.log(
            f"data: {self.checks['data']}; train dual_rate {self.checks['dual_rate']}, "
            f"avg_tdiff {summary['avg_tdiff_ms']:.2f} ms"
        )
        if self.val_set is None:
            self.log("no val images: evaluation is skipped; best checkpoint by training loss")
        status = {int(im["id"]): im for im in self.train_set.images}
        self._dual_flag = {i: im.get("pair_status") == "dual" for i, im in status.items()}
        self._tdiff = {i: float(im.get("time_diff_ms") or 0.0) for i, im in status.items()}
        self._check_damaged()

    def _check_damaged(self) -> None:
        """Frame store files damaged after prepare (one size check per file): their train images are
        skipped when few enough, the run stops otherwise; val images must all be readable."""
        cfg = self.cfg
        hint = "run `fredfusion prepare` again to rebuild the damaged files"
        damaged = self.train_set.damaged_images()
        if damaged:
            n, total = len(damaged), len(self.train_set)
            text = (
                f"{n} of {total} train images ({n / total:.2%}) are in damaged frame store files, "
                f"e.g. {damaged[0][1]}: {damaged[0][2]}"
            )
            if n / total > cfg.max_bad_frame_share:
                raise TrainingStopped(
                    f"{text}; that is more than max_bad_frame_share {cfg.max_bad_frame_share:.2%}: {hint}"
                )
            self.log(f"warning: {text}; they are skipped in every epoch ({hint})")
        damaged = self.val_set.damaged_images() if self.val_set is not None else []
        if damaged:
            raise TrainingStopped(
                f"{len(damaged)} of {len(self.val_set)} val images are in damaged frame store files "
                f"(e.g. {damaged[0][1]}: {damaged[0][2]}), so evaluation cannot read them: {hint}"
            )

    def _loss_config(self) -> LossConfig:
        """Class gain scaled by classes / 80 (YOLOv5). The objectness gain is not shrunk with the input
        area as YOLOv5 does: with few, tiny drones per frame that slowed learning several-fold (measured
        on the synthetic sample at 320x192: mAP50 0.50 vs 0.00 after 40 steps of an overfit run)."""
        base = LossConfig()
        return LossConfig(cls=base.cls / 80, label_smoothing=self.cfg.label_smoothing)

    def _anchors(self) -> torch.Tensor:
        """Default anchors (tuned at 640 wide) scaled to the input width, or k-means ones (--autoanchor)."""
        from fredfusion.model.anchors import anchor_recall, default_anchors, kmeans_anchors

        scaled = default_anchors() * (self.input_hw[1] / 640)
        if not self.cfg.autoanchor:
            return scaled

        scale = self.input_hw[1] / self.train_set.store_hw[1]
        wh = [
            b[:, 2:4] - b[:, 0:2] for b in (self.train_set.boxes_for(i) for i in self.train_set.ids) if len(b)
        ]
        if not wh:
            self.log("autoanchor: no train boxes; default anchors kept")
            return scaled
        wh_np = np.concatenate(wh) * scale
        defaults = scaled.reshape(-1, 2).numpy()
        base = anchor_recall(wh_np, defaults, 4.0)
        try:
            anchors, recall = kmeans_anchors(wh_np, n=9, seed=self.cfg.seed)
        except ValueError as exc:
            self.log(f"autoanchor: {exc}; default anchors kept (recall {base:.3f})")
            return scaled
        self.log(f"autoanchor: k-means recall {recall:.3f} vs default {base:.3f} on {len(wh_np)} boxes")
        if recall <= base:
            return scaled
        return torch.as_tensor(anchors, dtype=torch.float32).reshape(3, 3, 2)

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(cfg.modality, cfg.model, cfg.fusion, num_classes=1, anchors=self._anchors())
        info = model_info(model, self.input_hw)
        self.log(
            f"model: {cfg.modality} YOLO-{cfg.model} fusion={cfg.fusion if cfg.modality == 'dual' else '-'} "
            f"params {info['params'] / 1e6:.2f}M, {info['gflops']:.1f} GFLOPs at "
            f"{self.input_hw[1]}x{self.input_hw[0]}"
        )
        self.checks["weights"] = self._load_init_weights(model)
        return model

    def _load_init_weights(self, model: nn.Module) -> str:
        cfg = self.cfg
        path = Path(cfg.weights) if cfg.weights else None
        if path is None and cfg.modality == "dual" and not cfg.resume and DEFAULT_RGB_WEIGHTS.is_file():
            path = DEFAULT_RGB_WEIGHTS
        if path is None:
            return "random init (no --weights)"
        if not path.is_file():
            self.log(f"weights: {path} not found; training from random init")
            return f"{path} not found: random init"
        try:
            loaded, total = model.load_rgb_weights(state_dict_of(load_checkpoint(path)))
        except CheckpointError as exc:
            raise SystemExit(str(exc)) from None
        self.log(f"weights: loaded {loaded}/{total} tensors from {path}")
        return f"{loaded}/{total} tensors from {path}"

    # ----------------------------------------------------------------- phases
    def _phase(self, epoch: int) -> tuple[bool, int]:
        """(frozen, batch size) of an epoch."""
        cfg = self.cfg
        frozen = (cfg.freeze_train or cfg.freeze_training) and epoch < cfg.freeze_epoch
        batch = cfg.freeze_batch_size if frozen else cfg.unfreeze_batch_size
        return frozen, self._batch_override.get(frozen, batch)

    def _set_frozen(self, model: nn.Module, frozen: bool) -> None:
        for module in model.backbone_modules():
            for p in module.parameters():
                p.requires_grad_(not frozen)

    def _train_mode(self, model: nn.Module, frozen: bool) -> None:
        model.train()
        if frozen:  # frozen backbones keep their BN statistics
            for module in model.backbone_modules():
                module.eval()

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _loader(self, dataset: PreparedDataset, batch: int, epoch_batches: int | None) -> BatchLoader:
        cfg = self.cfg
        return BatchLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            drop_last=len(dataset) >= batch * self.dist.world_size,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=cfg.persistent_workers,
            device=self.device,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            max_batches=epoch_batches,
        )

    def base_lr(self, batch: int) -> float:
        """Learning rate of a phase at ``batch`` per process: Init_lr scaled by the global batch,
        or the fixed rate of the optimizer ``auto`` picked."""
        name, fixed = self.optim_choice
        if fixed is not None:
            return fixed
        return scaled_lr(self.cfg.init_lr, batch * self.dist.world_size, name, self.cfg.nominal_batch)

    def _total_steps(self, end_epoch: int) -> int:
        """Optimizer steps from init_epoch to end_epoch with the configured phases and batches."""
        cfg, n, total = self.cfg, len(self.train_set), 0
        for epoch in range(cfg.init_epoch, end_epoch):
            per_epoch = max(n // (self._phase(epoch)[1] * self.dist.world_size), 1)
            total += min(per_epoch, cfg.quick_test_batches) if cfg.quick_test else per_epoch
        return total

    def setup_step(self, model: nn.Module, batch: int) -> None:
        """The parts of an optimisation step for ``model`` (on the device): optimizer at the LR of
        ``batch``, GradScaler (fp16 only), EMA, NaN guard, loss and augmentation settings."""
        cfg = self.cfg
        self.model = model
        self.optimizer = build_optimizer(
            model, self.optim_choice[0], self.base_lr(batch), cfg.momentum, cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEMA(model) if cfg.ema else None
        self.guard = StepGuard(model, self.device)
        self.loss_fn = YoloLoss(model.anchors, model.strides, 1, self._loss_config())
        self.aug_cfg = augment_config(cfg)

    # ----------------------------------------------------------------- main
    def fit(self) -> dict[str, Any]:
        """Train, evaluate every eval_period epochs, save checkpoints; returns the final summary.

        Raises TrainingStopped (a SystemExit with the reason) on the faults listed in the module notes.
        """
        cfg = self.cfg
        self._setup_distributed()
        if self.dist.main:
            self._check_run_dir()
        torch.manual_seed(cfg.seed + self.dist.rank)
        self._datasets()
        model = self._build_model().to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        end_epoch = cfg.freeze_epoch if cfg.freeze_training else cfg.unfreeze_epoch
        if cfg.quick_test:
            end_epoch = cfg.init_epoch + 1
        _first_frozen, first_batch = self._phase(cfg.init_epoch)
        if cfg.optimizer == "auto":
            steps = self._total_steps(end_epoch)
            self.optim_choice = resolve_optimizer("auto", steps)
            name = {"adamw": "AdamW", "sgd": "SGD"}[self.optim_choice[0]]
            self.log(
                f"optimizer auto: {name} for {steps} steps (AdamW at a fixed lr up to "
                f"{AUTO_MAX_STEPS}, SGD with the scaled Init_lr beyond)"
            )
        self.setup_step(model, first_batch)
        self.schedule = LRSchedule(
            total_epochs=float(end_epoch - cfg.init_epoch if cfg.quick_test else end_epoch),
            warmup_epochs=cfg.warmup_epochs,
            min_lr_ratio=cfg.min_lr_ratio,
            kind=cfg.lr_decay_type,
        )
        state = {"epoch": cfg.init_epoch, "best": None, "best_epoch": None}
        if cfg.resume:
            self._resume(state)
        if self.dist.main:
            try:
                save_config(cfg, self.run_dir / "config.yaml")
            except ConfigError as exc:
                raise TrainingStopped(str(exc)) from None
            self.log("config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
        self.run_log = RunLog(
            self.run_dir, enabled=self.dist.main, resume_epoch=state["epoch"] if cfg.resume else None
        )
        if cfg.no_eval_map or self.val_set is None:
            self.log(
                "mAP evaluation off (--no_eval_map or no val split): best.pth is chosen by "
                + ("validation loss" if self.val_set is not None else "training loss")
            )

        wrapped, current_phase, loader = None, None, None
        summary: dict[str, Any] = {}
        try:
            epoch = state["epoch"]
            while epoch < end_epoch:
                frozen, batch = self._phase(epoch)
                if current_phase != (frozen, batch):
                    loader = None  # let the previous phase's workers go first
                    self._set_frozen(unwrap(model), frozen)
                    wrapped = self._wrap(model)
                    loader = self._loader(
                        self.train_set, batch, cfg.quick_test_batches if cfg.quick_test else None
                    )
                    base_lr = self.base_lr(batch)
                    current_phase = (frozen, batch)
                    self._phase_steps = 0
                    self.log(
                        f"phase: {'freeze (backbones frozen)' if frozen else 'unfreeze'} from epoch "
                        f"{epoch + 1}, batch {batch}, base lr {base_lr:.2e}"
                    )
                special = epoch < cfg.special_aug_ratio * end_epoch
                oom: tuple[int, str] | None = None
                try:
                    stats = self._train_epoch(epoch, end_epoch, wrapped, frozen, loader, base_lr, special)
                except _OutOfMemory as exc:
                    oom = (exc.step, exc.detail)
                if oom is not None:  # outside the handler: the failed step's tensors are released
                    self._lower_batch(frozen, batch, *oom)
                    continue
                summary = self._end_epoch(epoch, end_epoch, state, stats)
                epoch += 1
        finally:
            if self.dist.main:
                self.run_log.close()
        if self.dist.main and cfg.quick_test:
            self._print_checklist(summary)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return summary

    def _kept(self) -> str:
        if self._saved_epoch is None:
            return "no checkpoint was saved yet"
        return f"the checkpoints in {self.run_dir} are kept as saved after epoch {self._saved_epoch}"

    def _lower_batch(self, frozen: bool, batch: int, step: int, detail: str) -> None:
        """After out of memory: halve the phase's batch and go on, or stop with the reason."""
        where = f"out of memory on {self.device} at batch {batch} ({detail})"
        key = "freeze_batch_size" if frozen else "unfreeze_batch_size"
        if self.dist.world_size > 1:
            raise TrainingStopped(
                f"{where}; with several processes the batch is not lowered automatically: "
                f"lower {key} or input_shape. {self._kept()}"
            )
        if step >= OOM_RETRY_STEPS:
            raise TrainingStopped(
                f"{where} at step {step + 1} of the phase, after the first {OOM_RETRY_STEPS} steps "
                f"(where the batch is lowered automatically): lower {key} or input_shape. {self._kept()}"
            )
        if batch // 2 < 1:
            raise TrainingStopped(
                f"{where}: the model does not fit even at batch 1; use a smaller model or input_shape. "
                f"{self._kept()}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # a step cut short leaves the scaler mid-iteration: keep its scale only
            scaler_state = self.scaler.state_dict()
            self.scaler = torch.amp.GradScaler("cuda", enabled=True)
            self.scaler.load_state_dict(scaler_state)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        new = batch // 2
        lr = self.base_lr(new)
        self.log(f"out of memory at batch {batch}: retrying with batch {new}, lr {lr:.2e}")
        self._batch_override[frozen] = new

    def _train_epoch(
        self,
        epoch: int,
        end_epoch: int,
        wrapped: nn.Module,
        frozen: bool,
        loader: BatchLoader,
        base_lr: float,
        special: bool,
    ) -> dict[str, Any]:
        cfg = self.cfg
        optimizer, schedule, guard = self.optimizer, self.schedule, self.guard
        self._train_mode(unwrap(self.model), frozen)
        loader.set_epoch(epoch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(cfg.seed * 100003 + epoch * 1009 + self.dist.rank)
        steps = len(loader)
        epoch_images = steps * loader.batch_size
        sums = torch.zeros(4, device=self.device)  # total, box, obj, cls over the good steps
        good = torch.zeros((), device=self.device)  # steps whose loss and gradients were finite
        guard.reset_epoch()
        dual = seen = bad_images = reported_steps = 0
        bad_example: tuple[int, str, str] | None = None
        tdiff_sum = 0.0
        wait = 0.0
        t_start = time.perf_counter()
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{end_epoch}",
            disable=not self.dist.main,
            dynamic_ncols=True,
            leave=True,
        )
        lr = base_lr
        mean = [math.nan] * 4
        iterator = iter(loader)
        try:
            for i in range(steps):
                t0 = time.perf_counter()
                batch = next(iterator)
                wait += time.perf_counter() - t0
                progress = epoch + i / steps
                lr = base_lr * schedule.factor(progress)
                set_lr(optimizer, lr, schedule.momentum(progress, cfg.momentum))
                failed = None
                try:
                    values, ok = self._step(wrapped, batch, special, generator)
                except torch.OutOfMemoryError as exc:
                    failed = str(exc).splitlines()[0] if str(exc) else "out of memory"
                if failed is not None:
                    raise _OutOfMemory(self._phase_steps, failed)
                self._phase_steps += 1
                sums += torch.where(ok, values, torch.zeros_like(values))
                good += ok
                ids = batch.ids.tolist()
                seen += len(ids)
                for image_id in ids:
                    if self._dual_flag.get(image_id):
                        dual += 1
                        tdiff_sum += self._tdiff[image_id]
                n_bad = int(batch.bad.sum()) if batch.bad is not None else 0  # host tensor: no device sync
                if n_bad:
                    bad_images += n_bad
                    bad_example = bad_example or (batch.problems[0] if batch.problems else None)
                    if self.dist.world_size == 1 and bad_images > cfg.max_bad_frame_share * epoch_images:
                        raise self._too_many_bad_images(epoch, bad_images, epoch_images, bad_example, True)
                bar.update(1)
                if (i + 1) % cfg.log_interval == 0 or i + 1 == steps:
                    # the host reads the device counters only here, every log_interval steps
                    host = torch.cat([sums, good.reshape(1), guard.counts.float()]).tolist()
                    mean = [v / host[4] if host[4] else math.nan for v in host[:4]]  # good steps only
                    reported_steps = self._check_bad_steps(epoch, i, host[5:], reported_steps)
                    elapsed = time.perf_counter() - t_start
                    rate = seen * self.dist.world_size / max(elapsed, 1e-9)
                    bar.set_postfix_str(
                        f"loss {mean[0]:.4f} lr {lr:.2e} dual {dual}/{seen} "
                        f"({100 * dual / max(seen, 1):.1f}%) tdiff {tdiff_sum / max(dual, 1):.1f}ms "
                        f"{rate:.0f} img/s wait {100 * wait / elapsed:.0f}%"
                    )
                    scalars = {
                        "train/loss": mean[0],
                        "train/box": mean[1],
                        "train/obj": mean[2],
                        "train/cls": mean[3],
                        "train/lr": lr,
                        "speed/pairs_per_s": rate,
                        "speed/data_wait": wait / elapsed,
                    }
                    if self.device.type == "cuda":
                        scalars["gpu/memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self.run_log.scalars(scalars, epoch * steps + i)
        finally:
            bar.close()
        bad_images, seen_all = self._sum_over_ranks(bad_images, seen)
        if bad_images:
            share = bad_images / max(seen_all, 1)
            if share > cfg.max_bad_frame_share:
                raise self._too_many_bad_images(epoch, bad_images, seen_all, bad_example, False)
            example = f"; e.g. {bad_example[1]}: {bad_example[2]}" if bad_example else ""
            self.log(
                f"epoch {epoch + 1}: {bad_images} of {seen_all} train images ({share:.2%}) could not be "
                f"read and were skipped{example}"
            )
        elapsed = time.perf_counter() - t_start
        return {
            "train_loss": mean[0],
            "box_loss": mean[1],
            "obj_loss": mean[2],
            "cls_loss": mean[3],
            "lr": lr,
            "pairs_per_s": seen * self.dist.world_size / max(elapsed, 1e-9),
            "data_wait": wait / max(elapsed, 1e-9),
            "dual": dual,
            "seen": seen,
            "bad_frames": bad_images,
            "bad_steps": reported_steps,
        }

    def _step(
        self, wrapped: nn.Module, batch: DeviceBatch, special: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a loaded batch on the device, then one optimisation step (see optimize)."""
        rgb, event, targets = augment_batch(
            batch.rgb,
            batch.event,
            batch.targets,
            self.input_hw,
            self.aug_cfg,
            special=special,
            generator=generator,
        )
        return self.optimize(wrapped, rgb, event, targets, len(batch.ids))

    def optimize(
        self,
        wrapped: nn.Module,
        rgb: torch.Tensor | None,
        event: torch.Tensor | None,
        targets: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on an augmented batch of ``n`` images (after setup_step).

        Returns ([loss per image, box, obj, cls], finite flag), on the device. A non-finite loss (or
        non-finite gradients without a GradScaler, which skips those itself) zeroes the gradients and
        restores the BN statistics (StepGuard): the weights, the optimizer state and the EMA never see
        NaN, and nothing here waits for the device.
        """
        cfg = self.cfg
        model, optimizer, scaler, guard = self.model, self.optimizer, self.scaler, self.guard
        if cfg.channels_last:
            rgb = rgb.contiguous(memory_format=torch.channels_last) if rgb is not None else None
            event = event.contiguous(memory_format=torch.channels_last) if event is not None else None
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        guard.begin()
        with autocast:
            preds = wrapped(rgb, event)
        loss, parts = self.loss_fn([p.float() for p in preds], targets)
        optimizer.zero_grad(set_to_none=True)
        n = max(n, 1)
        # YoloLoss returns mean * batch; scaling to the nominal batch (64) gives every batch size the
        # per-image step of a 64-image batch, so Init_lr * batch / 64 is a plain linear-scaling rule.
        scaler.scale(loss * (cfg.nominal_batch / n)).backward()
        scaler.unscale_(optimizer)
        params = list(unwrap(model).parameters())
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=10.0)
        bad = ~torch.isfinite(loss.detach())
        if not scaler.is_enabled():
            bad = bad | ~torch.isfinite(norm)
        guard.end(bad, [p.grad for p in params if p.grad is not None])
        scaler.step(optimizer)
        scaler.update()
        if self.ema is not None:
            self.ema.update(model)
        return torch.cat([loss.detach().reshape(1) / n, parts.detach().float()]), ~bad

    def _check_bad_steps(self, epoch: int, step: int, counts: list[float], reported: int) -> int:
        """Host side of StepGuard, every log_interval steps: log new skipped steps, stop after a run
        of max_bad_steps. Returns the number of bad steps of the epoch reported so far."""
        cfg = self.cfg
        if self.dist.world_size > 1:  # every rank must take the same decision
            shared = torch.tensor(counts, device=self.device)
            torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
            counts = shared.tolist()
        _run, longest, total = (int(v) for v in counts)
        if total > reported:
            self.log(
                f"epoch {epoch + 1} step {step + 1}: {total - reported} step(s) with a non-finite loss or "
                f"gradient (NaN/inf) skipped, {total} in this epoch"
            )
        if longest >= cfg.max_bad_steps:
            raise TrainingStopped(
                f"stopping at epoch {epoch + 1} step {step + 1}: {longest} consecutive steps had a "
                f"non-finite loss or gradient (NaN/inf), max_bad_steps is {cfg.max_bad_steps}. Those steps "
                f"did not change the weights and nothing of this epoch was saved; {self._kept()}. "
                f"Try a lower init_lr, fp16 false, or check the data."
            )
        self.guard.reset_longest()
        return total

    def _sum_over_ranks(self, *values: int) -> tuple[int, ...]:
        if self.dist.world_size == 1:
            return values
        shared = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(shared)
        return tuple(int(v) for v in shared.tolist())

    def _too_many_bad_images(
        self, epoch: int, bad: int, total: int, example: tuple[int, str, str] | None, early: bool
    ) -> TrainingStopped:
        cfg = self.cfg
        count = f"at least {bad} of the epoch's {total}" if early else f"{bad} of {total}"
        detail = f"e.g. {example[1]}: {example[2]}" if example else "no detail"
        return TrainingStopped(
            f"stopping in epoch {epoch + 1}: {count} train images ({bad / max(total, 1):.2%}) could not be "
            f"read, more than max_bad_frame_share {cfg.max_bad_frame_share:.2%}; {detail}. "
            f"Run `fredfusion prepare` again (it rebuilds damaged frame store files) or raise "
            f"max_bad_frame_share. {self._kept()}"
        )

    def _end_epoch(
        self, epoch: int, end_epoch: int, state: dict[str, Any], stats: dict[str, Any]
    ) -> dict[str, Any]:
        cfg = self.cfg
        model, ema = self.model, self.ema
        last = epoch + 1 == end_epoch
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            **{
                k: stats[k]
                for k in (
                    "train_loss",
                    "box_loss",
                    "obj_loss",
                    "cls_loss",
                    "lr",
                    "pairs_per_s",
                    "data_wait",
                    "bad_frames",
                    "bad_steps",
                )
            },
        }
        eval_model = ema.module if ema is not None else unwrap(model)
        do_eval = self.val_set is not None and ((epoch + 1) % cfg.eval_period == 0 or last or cfg.quick_test)
        if do_eval and self.dist.main:
            try:
                self._evaluate(epoch, eval_model, row)
            except (OSError, BadFrameError) as exc:
                raise TrainingStopped(
                    f"evaluation after epoch {epoch + 1} could not read its images: {exc}. "
                    f"Run `fredfusion prepare` again to rebuild damaged files; {self._kept()}"
                ) from None
        if self.dist.main:
            self.run_log.scalars(
                {f"val/{k}": row.get(k) for k in ("mAP50", "mAP50_95", "val_loss")}, epoch + 1
            )
            self.run_log.scalars(
                {"train/bad_frames": row["bad_frames"], "train/bad_steps": row["bad_steps"]}, epoch + 1
            )
            self.run_log.epoch_row(row)
            self._save(epoch, state, row)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        summary = dict(row)
        summary.update(
            best=state["best"],
            best_epoch=state["best_epoch"],
            run_dir=str(self.run_dir),
            dual=stats["dual"],
            seen=stats["seen"],
        )
        return summary

    def _evaluate(self, epoch: int, eval_model: nn.Module, row: dict[str, Any]) -> None:
        """Precise BN, then validation loss / mAP into ``row`` and preview images to TensorBoard."""
        from fredfusion.eval.evaluator import evaluate

        cfg = self.cfg
        if cfg.precise_bn > 0:
            recalibrate_batchnorm(
                eval_model,
                self.train_set,
                self.input_hw,
                images=cfg.precise_bn,
                batch_size=cfg.eval_batch_size,
                device=self.device,
                amp_dtype=self.amp_dtype,
                seed=cfg.seed + epoch,
                frozen=eval_model.backbone_modules() if self._phase(epoch)[0] else None,
            )
        result = evaluate(
            eval_model,
            self.val_set,
            batch_size=cfg.eval_batch_size,
            device=self.device,
            input_hw=self.input_hw,
            conf=cfg.conf_thres,
            iou=cfg.nms_iou,
            amp_dtype=self.amp_dtype,
            loss_fn=self.loss_fn,
            num_workers=0,
            compute_map=not cfg.no_eval_map,
        )
        row["val_loss"] = result.metrics.get("val_loss")
        if not cfg.no_eval_map:
            row["mAP50"] = result.metrics.get("mAP50")
            row["mAP50_95"] = result.metrics.get("mAP50_95")
            self.log(
                f"epoch {epoch + 1}: mAP50 {row['mAP50']:.4f}  mAP50:95 {row['mAP50_95']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  (eval {result.metrics.get('pairs_per_s', 0):.0f} pairs/s)"
            )
        else:
            self.log(f"epoch {epoch + 1}: val_loss {row['val_loss']:.4f}")
        self._log_val_images(eval_model, epoch)

    def _score(self, row: dict[str, Any]) -> float | None:
        """Higher is better. mAP when evaluated, else minus the validation (or training) loss."""
        metric = self.cfg.best_metric
        if metric != "val_loss" and not self.cfg.no_eval_map and row.get(metric) is not None:
            return float(row[metric])
        loss = row.get("val_loss") if row.get("val_loss") is not None else row.get("train_loss")
        return None if loss is None or not math.isfinite(loss) else -float(loss)

    def _save(self, epoch: int, state: dict[str, Any], row: dict[str, Any]) -> None:
        """best.pth (when the score improved), last.pth, epNNN.pth; a failed write stops the run."""
        try:
            self._write_checkpoints(epoch, state, row)
        except CheckpointError as exc:
            raise TrainingStopped(
                f"{exc}. Training stopped after epoch {epoch + 1}; free space or fix permissions, then "
                f"continue with --resume"
            ) from None
        self._saved_epoch = epoch + 1

    def _write_checkpoints(self, epoch: int, state: dict[str, Any], row: dict[str, Any]) -> None:
        cfg = self.cfg
        model, ema, optimizer, scaler = self.model, self.ema, self.optimizer, self.scaler
        meta = model_meta(unwrap(model))
        score = self._score(row)
        if score is not None and (state["best"] is None or score > state["best"]):
            state["best"], state["best_epoch"] = score, epoch + 1
            best = {
                "meta": meta,
                "model": (ema.state_dict() if ema else unwrap(model).state_dict()),
                "epoch": epoch + 1,
                "metrics": {k: v for k, v in row.items() if v is not None},
                "config": cfg.to_dict(),
            }
            save_checkpoint(best, self.run_dir / "best.pth")
            if cfg.best_alias:
                copy_checkpoint(self.run_dir / "best.pth", Path(cfg.best_alias))
        payload = {
            "meta": meta,
            "model": unwrap(model).state_dict(),
            "ema": ema.state_dict() if ema else {},
            "ema_updates": ema.updates if ema else 0,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch + 1,
            "best": state["best"],
            "best_epoch": state["best_epoch"],
            "config": cfg.to_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }
        save_checkpoint(payload, self.run_dir / "last.pth")
        if cfg.save_period > 0 and (epoch + 1) % cfg.save_period == 0:
            copy_checkpoint(self.run_dir / "last.pth", self.run_dir / f"ep{epoch + 1:03d}.pth")

    def _resume(self, state: dict[str, Any]) -> None:
        model, ema, optimizer, scaler = self.model, self.ema, self.optimizer, self.scaler
        path = self.run_dir / "last.pth"
        if not path.is_file():
            raise SystemExit(f"--resume: {path} not found (nothing to resume in {self.run_dir})")
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:
            raise SystemExit(f"--resume: {exc}") from None
        missing = [k for k in ("model", "optimizer", "epoch", "rng") if k not in payload]
        if missing:
            raise SystemExit(f"--resume: {path} is not a training checkpoint (no {', '.join(missing)})")
        meta = payload.get("meta", {})
        mine = model_meta(unwrap(model))
        for key in ("modality", "size", "fusion"):
            if meta.get(key) != mine[key]:
                raise SystemExit(
                    f"--resume: {path} holds a {key}={meta.get(key)} model, "
                    f"this run asks for {key}={mine[key]}"
                )
        unwrap(model).load_state_dict(payload["model"], strict=True)
        if ema is not None and payload.get("ema"):
            ema.module.load_state_dict(payload["ema"], strict=True)
            ema.updates = int(payload.get("ema_updates", 0))
        optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        torch.set_rng_state(payload["rng"]["torch"])
        state.update(
            epoch=int(payload["epoch"]), best=payload.get("best"), best_epoch=payload.get("best_epoch")
        )
        self._saved_epoch = state["epoch"]
        self.checks["weights"] = f"resumed from {path} at epoch {state['epoch']}"
        self.log(
            f"resume: {path}, continuing at epoch {state['epoch'] + 1} "
            f"({len(payload['model'])} tensors, optimizer and EMA restored)"
        )

    def _log_val_images(self, model: nn.Module, epoch: int) -> None:
        """A few validation images with predicted (red) and true (green) boxes in TensorBoard."""
        from fredfusion.eval.plots import draw_pair_preview

        ids = self.val_set.ids[:4]
        try:
            picture = draw_pair_preview(model, self.val_set, ids, self.input_hw, self.device)
        except (ImportError, AttributeError):
            return
        self.run_log.image("val/predictions", picture, epoch + 1)

    def _print_checklist(self, summary: dict[str, Any]) -> None:
        mem = (
            f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB peak"
            if self.device.type == "cuda"
            else "n/a (CPU)"
        )
        lines = [
            ("data found", self.checks.get("data", "?")),
            ("dual rate (train split)", self.checks.get("dual_rate", "?")),
            ("dual rate (batches seen)", f"{summary.get('dual', 0)}/{summary.get('seen', 0)}"),
            ("weights", self.checks.get("weights", "?")),
            ("throughput", f"{summary.get('pairs_per_s', 0):.1f} pairs/s"),
            ("data-wait share", f"{100 * summary.get('data_wait', 0):.1f}%"),
            (
                "faults",
                f"{summary.get('bad_frames', 0)} unreadable images, "
                f"{summary.get('bad_steps', 0)} non-finite steps skipped",
            ),
            ("GPU memory", mem),
            (
                "mini evaluation",
                "skipped"
                if summary.get("mAP50") is None
                else f"mAP50 {summary['mAP50']:.4f}, mAP50:95 {summary['mAP50_95']:.4f}",
            ),
            ("checkpoints", str(self.run_dir)),
        ]
        width = max(len(k) for k, _ in lines)
        self._log("quick test check list:")
        for key, value in lines:
            self._log(f"  [x] {key.ljust(width)}  {value}")
