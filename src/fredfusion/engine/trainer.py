"""The training loop: phases (freeze / unfreeze), epochs, schedule, evaluation, checkpoints, resume, DDP.

The optimisation step itself (AMP, loss, clipped step, EMA, NaN guard) is ``engine.step.TrainStep``.

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
import dataclasses
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fredfusion.config import AUTO_BATCH, ConfigError, TrainConfig, save_config, shown
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.frames import BadFrameError
from fredfusion.data.loader import BatchLoader, DeviceBatch
from fredfusion.engine.autobatch import AutoBatch, resolve_auto_batches
from fredfusion.engine.batchnorm import recalibrate_batchnorm
from fredfusion.engine.checkpoint import (
    claim_run_dir,
    prepare_run_dir,
    resume_training,
    save_training_checkpoints,
)
from fredfusion.engine.compiled import (
    CompileClock,
    check_compile_mode,
    compile_callable,
    use_compile_cache,
    without_cuda_graphs,
)
from fredfusion.engine.ema import unwrap
from fredfusion.engine.errors import TrainingStopped
from fredfusion.engine.memory import training_need
from fredfusion.engine.meters import EpochMeter
from fredfusion.engine.model_setup import build_run_model
from fredfusion.engine.optim import AUTO_MAX_STEPS, LRSchedule, resolve_optimizer, set_lr
from fredfusion.engine.run_data import open_run_data
from fredfusion.engine.run_log import RunLog, quick_test_checklist
from fredfusion.engine.runtime import Distributed, amp_dtype_for, pick_device
from fredfusion.engine.step import TrainStep
from fredfusion.model.weights import CheckpointError

OOM_RETRY_STEPS = 10  # out of memory within this many steps of a phase start halves the batch


class _OutOfMemory(Exception):
    """Leaves an epoch when the device ran out of memory (step = steps done in the phase)."""

    def __init__(self, step: int, detail: str) -> None:
        super().__init__(detail)
        self.step = step
        self.detail = detail


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
        self._freeze_backbones = True  # False when they start from random weights (see _build_model)
        self._auto_picks: dict[bool, AutoBatch] = {}  # phase (frozen) -> batch auto picked
        self._compile_cache = ""  # the persistent compile cache folder (compile only)
        self._compile_clock: CompileClock | None = None  # times the first compiled step of a phase
        self._compiled_eval: tuple[nn.Module, nn.Module] | None = None  # (model, its compiled forward)

    def log(self, message: str) -> None:
        """Print ``message`` on the main process."""
        if self.dist.main:
            self._log(message)

    # ----------------------------------------------------------------- setup
    def _datasets(self) -> None:
        self.data = open_run_data(self.cfg, self.log)
        self.checks.update(self.data.checks)

    def _build_model(self) -> nn.Module:
        """The network with its anchors and initial weights (noted for the check list). Backbones that
        start from random weights are not frozen (no freeze phase) unless ``freeze_untrained``."""
        cfg = self.cfg
        model, start = build_run_model(cfg, self.data.train, self.log)
        self.checks["weights"] = start.summary
        self._freeze_backbones = start.backbones or cfg.freeze_untrained
        if (cfg.freeze_train or cfg.freeze_training) and cfg.freeze_epoch > 0 and not self._freeze_backbones:
            until = (
                f"; --freeze_training still stops after epoch {cfg.freeze_epoch}"
                if cfg.freeze_training
                else ""
            )
            self.log(
                "freeze phase skipped: the backbones do not start from loaded weights, and frozen random "
                f"features would waste those epochs; --freeze_untrained true freezes them{until}"
            )
        return model

    # ----------------------------------------------------------------- phases
    def _phase(self, epoch: int) -> tuple[bool, int]:
        """(frozen, batch size) of an epoch."""
        cfg = self.cfg
        frozen = (
            self._freeze_backbones and (cfg.freeze_train or cfg.freeze_training) and epoch < cfg.freeze_epoch
        )
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
            model = compile_callable(model, self.cfg.compile_mode)
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

    def _total_steps(self, end_epoch: int) -> int:
        """Optimizer steps from init_epoch to end_epoch with the configured phases and batches."""
        cfg, n, total = self.cfg, len(self.data.train), 0
        for epoch in range(cfg.init_epoch, end_epoch):
            per_epoch = max(n // (self._phase(epoch)[1] * self.dist.world_size), 1)
            total += min(per_epoch, cfg.quick_test_batches) if cfg.quick_test else per_epoch
        return total

    def _optimizer_choice(self, end_epoch: int) -> tuple[str, float | None]:
        """The optimizer and its fixed lr (None: scaled Init_lr); ``auto`` decides by the run's length."""
        if self.cfg.optimizer != "auto":
            return resolve_optimizer(self.cfg.optimizer, 0)
        steps = self._total_steps(end_epoch)
        choice = resolve_optimizer("auto", steps)
        name = {"adamw": "AdamW", "sgd": "SGD"}[choice[0]]
        self.log(
            f"optimizer auto: {name} for {steps} steps (AdamW at a fixed lr up to "
            f"{AUTO_MAX_STEPS}, SGD with the scaled Init_lr beyond)"
        )
        return choice

    # ----------------------------------------------------------------- main
    def fit(self) -> dict[str, Any]:
        """Train, evaluate every eval_period epochs, save checkpoints; returns the final summary.

        Raises TrainingStopped (a SystemExit with the reason) on the faults listed in the module notes.
        """
        cfg = self.cfg
        if cfg.compile:  # before any work: an unusable cache folder stops here, and nothing compiled yet
            check_compile_mode(cfg.compile_mode, self.dist.world_size)
            self._compile_cache = str(use_compile_cache(cfg.compile_cache))
        self.dist.init(self.device)
        if not cfg.resume and not cfg.exist_ok:
            self._claim_run_dir()
        if self.dist.main:
            prepare_run_dir(self.run_dir)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self._datasets()
        model = self._build_model().to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        end_epoch = cfg.freeze_epoch if cfg.freeze_training else cfg.unfreeze_epoch
        if cfg.quick_test:
            end_epoch = cfg.init_epoch + 1
        self._auto_batch(model, end_epoch)
        cfg = self.cfg
        self.step = TrainStep(
            cfg,
            model,
            self._phase(cfg.init_epoch)[1],
            device=self.device,
            amp_dtype=self.amp_dtype,
            optimizer_choice=self._optimizer_choice(end_epoch),
            world_size=self.dist.world_size,
        )
        for frozen, pick in self._auto_picks.items():
            batch = cfg.freeze_batch_size if frozen else cfg.unfreeze_batch_size
            self.log(
                f"batch auto: {'freeze' if frozen else 'unfreeze'} phase batch {batch}, base lr "
                f"{self.step.base_lr(batch):.2e} by the nominal-batch rule ({pick.detail})"
            )
        self._check_memory(end_epoch)
        self.schedule = LRSchedule(
            total_epochs=float(end_epoch - cfg.init_epoch if cfg.quick_test else end_epoch),
            warmup_epochs=cfg.warmup_epochs,
            min_lr_ratio=cfg.min_lr_ratio,
            kind=cfg.lr_decay_type,
        )
        state = {"epoch": cfg.init_epoch, "best": None, "best_epoch": None}
        if cfg.resume:
            self._resume(state)
        self._start_logs(state["epoch"])
        try:
            summary = self._run_epochs(state, end_epoch)
        finally:
            if self.dist.main:
                self.run_log.close()
        if self.dist.main and cfg.quick_test:
            for line in quick_test_checklist(self.checks, summary, self.device, self.run_dir):
                self._log(line)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return summary

    def _auto_batch(self, model: nn.Module, end_epoch: int) -> None:
        """Replace ``auto`` batch sizes by the largest that fit (``engine.autobatch``), the smallest pick
        over the processes under torchrun; the config (saved, resumed) holds the numbers picked."""
        cfg = self.cfg
        if AUTO_BATCH not in (cfg.freeze_batch_size, cfg.unfreeze_batch_size):
            return
        new, picks = resolve_auto_batches(
            cfg,
            model,
            device=self.device,
            amp_dtype=self.amp_dtype,
            store_hw=self.data.train.store_hw,
            train_images=len(self.data.train),
            phases={self._phase(e)[0] for e in range(cfg.init_epoch, end_epoch)},
            world_size=self.dist.world_size,
        )
        if self.dist.world_size > 1:
            sizes = torch.tensor([new.freeze_batch_size, new.unfreeze_batch_size], device=self.device)
            torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MIN)
            new = dataclasses.replace(new, freeze_batch_size=int(sizes[0]), unfreeze_batch_size=int(sizes[1]))
            picks = {
                k: AutoBatch(v.batch, f"{v.detail}; the smallest over the processes")
                for k, v in picks.items()
            }
        self.cfg = new
        self._auto_picks = picks

    def _check_memory(self, end_epoch: int) -> None:
        """On a CPU: the memory a step of the largest phase batch will add, against what is free, in one
        line; a ConfigError naming --batch before training when it does not fit (instead of the kernel
        killing the run). The estimate and its margin: ``engine.memory``."""
        if self.device.type != "cpu":
            return
        cfg = self.cfg
        batch = max(self._phase(cfg.init_epoch)[1], self._phase(max(end_epoch - 1, cfg.init_epoch))[1])
        need, fixed = training_need(
            unwrap(self.step.model),
            self.input_hw,
            batch,
            store_hw=self.data.train.store_hw,
            optimizer=self.step.choice[0],
            workers=cfg.num_workers,
            prefetch=cfg.prefetch_factor,
        )
        self.log(need.line())
        if not need.fits:
            fits = need.largest_batch(batch, fixed)
            h, w = self.input_hw
            raise ConfigError(
                f"not enough memory for training: {need.line().removeprefix('memory: ')}; lower --batch "
                f"{batch} (about {fits} fits at {h}x{w}) or --imgsz, or free memory"
            )

    def _claim_run_dir(self) -> None:
        """A new run never writes into a taken run folder: the next free name (dual2, dual3, ...) unless
        ``exist_ok``; the name goes into the saved config, so ``--resume RUN_DIR`` finds it."""
        name = [claim_run_dir(self.run_dir).name if self.dist.main else ""]
        if self.dist.world_size > 1:
            torch.distributed.broadcast_object_list(name, src=0)
        if name[0] != self.run_dir.name:
            taken = self.run_dir
            self.cfg = dataclasses.replace(self.cfg, name=name[0])
            self.run_dir = self.cfg.run_dir()
            self.log(f"run folder {taken} is taken: this run writes {self.run_dir} (--exist_ok to reuse it)")

    def _start_logs(self, epoch: int) -> None:
        """config.yaml and the config line, the run log (continued on resume), the best-checkpoint rule."""
        cfg = self.cfg
        if self.dist.main:
            try:
                save_config(cfg, self.run_dir / "config.yaml")
            except ConfigError as exc:
                raise TrainingStopped(str(exc)) from None
            self.log("config: " + ", ".join(f"{k}={shown(k, v)}" for k, v in cfg.to_dict().items()))
        self.run_log = RunLog(
            self.run_dir, enabled=self.dist.main, resume_epoch=epoch if cfg.resume else None, cfg=cfg
        )
        if cfg.no_eval_map or self.data.val is None:
            self.log(
                "mAP evaluation off (--no_eval_map or no val split): best.pth is chosen by "
                + ("validation loss" if self.data.val is not None else "training loss")
            )

    def _run_epochs(self, state: dict[str, Any], end_epoch: int) -> dict[str, Any]:
        """Epochs from ``state["epoch"]`` to ``end_epoch``, a new phase (loader, wrapper, lr) whenever
        the frozen flag or the batch changes; out of memory lowers the batch and repeats the epoch."""
        cfg, model = self.cfg, self.step.model
        current_phase: tuple[bool, int] | None = None
        loader: BatchLoader | None = None
        summary: dict[str, Any] = {}
        epoch = state["epoch"]
        while epoch < end_epoch:
            frozen, batch = self._phase(epoch)
            if current_phase != (frozen, batch):
                loader = None  # let the previous phase's workers go first
                self._set_frozen(unwrap(model), frozen)
                wrapped = self._wrap(model)
                loader = self._loader(
                    self.data.train, batch, cfg.quick_test_batches if cfg.quick_test else None
                )
                base_lr = self.step.base_lr(batch)
                current_phase = (frozen, batch)
                self._phase_steps = 0
                if cfg.compile:
                    what = f"the first {'freeze' if frozen else 'unfreeze'} step at batch {batch}"
                    self._compile_clock = CompileClock(self.device, what, self._compile_cache)
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
        self.step.reset_after_oom()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        new = batch // 2
        lr = self.step.base_lr(new)
        self.log(f"out of memory at batch {batch}: retrying with batch {new}, lr {lr:.2e}")
        self._batch_override[frozen] = new

    # ----------------------------------------------------------------- one epoch
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
        """One pass over ``loader``; returns the epoch's statistics (``EpochMeter.summary``)."""
        cfg = self.cfg
        self._train_mode(unwrap(self.step.model), frozen)
        loader.set_epoch(epoch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(cfg.seed * 100003 + epoch * 1009 + self.dist.rank)
        steps = len(loader)
        epoch_images = steps * loader.batch_size
        bad_limit = cfg.max_bad_frame_share * epoch_images
        self.step.guard.reset_epoch()
        meter = EpochMeter(self.device, self.data.dual_flag, self.data.tdiff, self.dist.world_size)
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{end_epoch}",
            disable=not self.dist.main,
            dynamic_ncols=True,
            leave=True,
        )
        lr = base_lr
        batches = iter(loader)
        try:
            for i in range(steps):
                batch = meter.next_batch(batches)
                at = epoch + i / steps  # epochs done
                lr = self._set_lr(at, base_lr)
                meter.add_step(
                    *self._guarded_step(wrapped, batch, special, generator, at / cfg.unfreeze_epoch)
                )
                self._phase_steps += 1
                if meter.add_batch(batch) and self.dist.world_size == 1 and meter.bad_images > bad_limit:
                    raise self._too_many_bad_images(
                        epoch, meter.bad_images, epoch_images, meter.bad_example, True
                    )
                bar.update(1)
                if (i + 1) % cfg.log_interval == 0 or i + 1 == steps:
                    self._log_point(epoch, i, steps, meter, lr, bar)
        finally:
            bar.close()
        return self._close_epoch(epoch, meter, lr)

    def _set_lr(self, progress: float, base_lr: float) -> float:
        """Before a step: the scheduled learning rate (returned) and momentum at ``progress`` epochs."""
        lr = base_lr * self.schedule.factor(progress)
        set_lr(self.step.optimizer, lr, self.schedule.momentum(progress, self.cfg.momentum))
        return lr

    def _guarded_step(
        self,
        wrapped: nn.Module,
        batch: DeviceBatch,
        special: bool,
        generator: torch.Generator,
        progress: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``TrainStep.run`` at ``progress`` (share of the run done); out of memory leaves the epoch as
        _OutOfMemory."""
        failed = None
        try:
            clock = self._compile_clock
            if clock is None:
                return self.step.run(wrapped, batch, special, generator, progress)
            with clock:
                result = self.step.run(wrapped, batch, special, generator, progress)
            self._compile_clock = None
            if clock.report is not None:
                self.log(clock.report.line())
                self.checks["compile"] = clock.report.line().removeprefix("compile: ")
            return result
        except torch.OutOfMemoryError as exc:
            failed = str(exc).splitlines()[0] if str(exc) else "out of memory"
        raise _OutOfMemory(self._phase_steps, failed)

    def _log_point(self, epoch: int, i: int, steps: int, meter: EpochMeter, lr: float, bar: tqdm) -> None:
        """After every log_interval-th step: the one host read of the device counters, the bad-step
        check, the progress bar and TensorBoard."""
        counts = meter.read(self.step.guard.counts)
        meter.bad_steps = self._check_bad_steps(epoch, i, counts, meter.bad_steps)
        postfix, scalars = meter.progress(lr)
        bar.set_postfix_str(postfix)
        self.run_log.scalars(scalars, epoch * steps + i)

    def _close_epoch(self, epoch: int, meter: EpochMeter, lr: float) -> dict[str, Any]:
        """Unreadable images over every process: stop past max_bad_frame_share, else report them."""
        bad_images, seen_all = self.dist.sum((meter.bad_images, meter.seen), self.device)
        if bad_images:
            share = bad_images / max(seen_all, 1)
            if share > self.cfg.max_bad_frame_share:
                raise self._too_many_bad_images(epoch, bad_images, seen_all, meter.bad_example, False)
            example = f"; e.g. {meter.bad_example[1]}: {meter.bad_example[2]}" if meter.bad_example else ""
            self.log(
                f"epoch {epoch + 1}: {bad_images} of {seen_all} train images ({share:.2%}) could not be "
                f"read and were skipped{example}"
            )
        return meter.summary(lr, bad_images)

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
        self.step.guard.reset_longest()
        return total

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

    # ----------------------------------------------------------------- after an epoch
    def _end_epoch(
        self, epoch: int, end_epoch: int, state: dict[str, Any], stats: dict[str, Any]
    ) -> dict[str, Any]:
        """Evaluate (every eval_period epochs and at the end), log the epoch, save the checkpoints."""
        cfg, step = self.cfg, self.step
        last = epoch + 1 == end_epoch
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            **{k: v for k, v in stats.items() if k not in ("dual", "seen")},
        }
        eval_model = step.ema.module if step.ema is not None else unwrap(step.model)
        do_eval = self.data.val is not None and ((epoch + 1) % cfg.eval_period == 0 or last or cfg.quick_test)
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
                self.data.train,
                self.input_hw,
                images=cfg.precise_bn,
                batch_size=cfg.eval_batch_size,
                device=self.device,
                amp_dtype=self.amp_dtype,
                seed=cfg.seed + epoch,
                frozen=eval_model.backbone_modules() if self._phase(epoch)[0] else None,
            )
        model, clock = self._eval_forward(eval_model)
        with clock if clock is not None else contextlib.nullcontext():
            result = evaluate(
                model,
                self.data.val,
                batch_size=cfg.eval_batch_size,
                device=self.device,
                input_hw=self.input_hw,
                conf=cfg.conf_thres,
                iou=cfg.nms_iou,
                amp_dtype=self.amp_dtype,
                loss_fn=self.step.loss_fn,
                num_workers=0,
                compute_map=not cfg.no_eval_map,
            )
        if clock is not None and clock.report is not None:
            self.log(clock.report.line())
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

    def _eval_forward(self, eval_model: nn.Module) -> tuple[nn.Module, CompileClock | None]:
        """The model evaluation runs: under ``compile`` its compiled forward (compiled once, without CUDA
        graphs), with a clock for the first evaluation; else ``eval_model`` itself."""
        if not self.cfg.compile:
            return eval_model, None
        if self._compiled_eval is not None and self._compiled_eval[0] is eval_model:
            return self._compiled_eval[1], None
        compiled = compile_callable(eval_model, without_cuda_graphs(self.cfg.compile_mode))
        self._compiled_eval = (eval_model, compiled)
        return compiled, CompileClock(self.device, "the first evaluation", self._compile_cache)

    def _save(self, epoch: int, state: dict[str, Any], row: dict[str, Any]) -> None:
        """best.pth (when the score improved), last.pth, epNNN.pth; a failed write stops the run."""
        step = self.step
        try:
            save_training_checkpoints(
                self.run_dir,
                self.cfg,
                model=step.model,
                ema=step.ema,
                optimizer=step.optimizer,
                scaler=step.scaler,
                epoch=epoch,
                row=row,
                state=state,
            )
        except CheckpointError as exc:
            raise TrainingStopped(
                f"{exc}. Training stopped after epoch {epoch + 1}; free space or fix permissions, then "
                f"continue with --resume"
            ) from None
        self._saved_epoch = epoch + 1

    def _resume(self, state: dict[str, Any]) -> None:
        """Continue from last.pth: weights, EMA, optimizer, scaler, RNG and the epoch / best so far."""
        step = self.step
        payload = resume_training(
            self.run_dir, model=step.model, ema=step.ema, optimizer=step.optimizer, scaler=step.scaler
        )
        state.update(
            epoch=int(payload["epoch"]), best=payload.get("best"), best_epoch=payload.get("best_epoch")
        )
        self._saved_epoch = state["epoch"]
        path = self.run_dir / "last.pth"
        self.checks["weights"] = f"resumed from {path} at epoch {state['epoch']}"
        self.log(
            f"resume: {path}, continuing at epoch {state['epoch'] + 1} "
            f"({len(payload['model'])} tensors, optimizer and EMA restored)"
        )

    def _log_val_images(self, model: nn.Module, epoch: int) -> None:
        """A few validation images with predicted (red) and true (green) boxes in TensorBoard."""
        from fredfusion.eval.plots import draw_pair_preview

        ids = self.data.val.ids[:4]
        try:
            picture = draw_pair_preview(model, self.data.val, ids, self.input_hw, self.device)
        except (ImportError, AttributeError):
            return
        self.run_log.image("val/predictions", picture, epoch + 1)
