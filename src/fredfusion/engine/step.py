"""The one optimisation step, shared by the trainer and `fredfusion bench`.

Augment on the device, forward in mixed precision, loss scaled to the nominal batch, backward,
clipped optimizer step (through the GradScaler), EMA update; a step with a non-finite loss or gradient
is undone by the StepGuard, bit for bit. Nothing here waits for the device (but an fp16 GradScaler,
whose step reads its overflow flag on the host).
"""

from __future__ import annotations

import torch
from torch import nn

from fredfusion.config import TrainConfig, dropout_share, train_pairs
from fredfusion.data.augment import AugmentConfig, augment_batch
from fredfusion.data.blanking import blank_boxes, blank_frames, keep_masks, spared_parts
from fredfusion.data.loader import DeviceBatch
from fredfusion.engine.compiled import compile_callable, mark_step_begin
from fredfusion.engine.ema import ModelEMA, unwrap
from fredfusion.engine.optim import build_optimizer, prepare_state, scaled_lr
from fredfusion.engine.runtime import autocast
from fredfusion.engine.step_guard import StepGuard
from fredfusion.model.build import build_loss
from fredfusion.spec import DROPOUT_SIDES

DROPOUT_SEED_SALT = 0x5EED_B1A4_D40F
"""Mixed into the augmentation seed to seed the modality dropout stream (an arbitrary constant)."""


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


class TrainStep:
    """Optimizer, GradScaler (fp16 only), EMA, NaN guard, loss and augmentation settings of ``model``.

    ``optimizer_choice`` is ``(name, fixed lr or None)`` as ``optim.resolve_optimizer`` returns it;
    the optimizer starts at the learning rate of ``batch`` images per process (``world_size`` processes).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        batch: int,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        optimizer_choice: tuple[str, float | None],
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.device = device
        self.amp_dtype = amp_dtype
        self.choice = optimizer_choice
        self.world_size = world_size
        self.input_hw = (int(cfg.input_shape[0]), int(cfg.input_shape[1]))
        self.optimizer = build_optimizer(
            model, optimizer_choice[0], self.base_lr(batch), cfg.momentum, cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.ema = ModelEMA(model) if cfg.ema else None
        self.guard = StepGuard(model, device)
        self.loss_fn = build_loss(model, cfg.label_smoothing)
        # the training step's loss, compiled with the model under ``compile`` (evaluation uses loss_fn)
        place = getattr(self.loss_fn, "place", None)
        if cfg.compile and place is not None:
            place(device)  # its cached constants on the device before tracing: one trace per shape
        self.compute_loss = compile_callable(self.loss_fn, cfg.compile_mode) if cfg.compile else self.loss_fn
        self.aug_cfg = augment_config(cfg)
        # blanking (data.blanking) only where a dual run can have a missing or dropped modality
        self.dropout = dropout_share(cfg)
        self.blanking = cfg.modality == "dual" and (self.dropout > 0 or train_pairs(cfg) == "any")
        self._blank_for: torch.Generator | None = None
        self._blank_gen: torch.Generator | None = None

    def base_lr(self, batch: int) -> float:
        """Learning rate of a phase at ``batch`` per process: Init_lr scaled by the global batch,
        or the fixed rate of the optimizer ``auto`` picked."""
        name, fixed = self.choice
        if fixed is not None:
            return fixed
        return scaled_lr(self.cfg.init_lr, batch * self.world_size, name, self.cfg.nominal_batch)

    def run(
        self,
        wrapped: nn.Module,
        batch: DeviceBatch,
        special: bool,
        generator: torch.Generator,
        progress: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a loaded batch on the device (Mosaic / MixUp when ``special``), blank missing and
        dropped modalities of a dual run (``data.blanking``), then ``optimize``. ``progress`` is the
        share of the run's epochs done: the dropout share rises with it (``dropout_at``)."""
        rgb, event, targets = augment_batch(
            batch.rgb,
            batch.event,
            batch.targets,
            self.input_hw,
            self.aug_cfg,
            special=special,
            generator=generator,
        )
        if self.blanking:
            share, draws = self.dropout_at(progress), self._dropout_generator(generator)
            side = DROPOUT_SIDES[self.cfg.modality_dropout_side]
            keep = keep_masks(batch.present, len(batch.ids), share, draws, self.device, side)
            region = self.cfg.modality_dropout_region
            if region != "image":  # unpaired frames whole, dropout the boxes
                present = keep_masks(batch.present, len(batch.ids), 0.0, None, self.device)
                spared = spared_parts(len(targets), draws, self.device) if region == "box_parts" else None
                rgb, event = blank_frames(rgb, event, present)
                droppable = (side < 1.0, side > 0.0)  # one-sided dropout never touches the other side
                rgb, event = blank_boxes(
                    rgb, event, present & ~keep, targets, spared=spared, droppable=droppable
                )
            else:
                rgb, event = blank_frames(rgb, event, keep)
        return self.optimize(wrapped, rgb, event, targets, len(batch.ids))

    def dropout_at(self, progress: float) -> float:
        """The modality dropout share at ``progress`` (share of the run's epochs done): rising linearly
        from 0 over the first ``modality_dropout_ramp`` of the run, then the configured share."""
        ramp = self.cfg.modality_dropout_ramp
        return self.dropout * min(1.0, progress / ramp) if ramp > 0 else self.dropout

    def _dropout_generator(self, generator: torch.Generator) -> torch.Generator:
        """The generator of the modality dropout draws: its own stream, seeded from the augmentation
        generator's seed whenever that generator is a new one (each epoch), so the draws are a function
        of (seed, epoch) like the augmentation (resume stays exact) and the augmentation is the same
        whatever the dropout share."""
        if generator is not self._blank_for or self._blank_gen is None:
            self._blank_gen = torch.Generator(device=generator.device)
            self._blank_gen.manual_seed((generator.initial_seed() ^ DROPOUT_SEED_SALT) % 2**63)
            self._blank_for = generator
        return self._blank_gen

    def optimize(
        self,
        wrapped: nn.Module,
        rgb: torch.Tensor | None,
        event: torch.Tensor | None,
        targets: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on an augmented batch of ``n`` images; ``wrapped`` runs the forward
        pass (the model itself, or it under DDP / torch.compile).

        Returns ([loss per image, box, obj, cls, dfl], finite flag), on the device. A step whose loss (or,
        without a GradScaler, which skips those itself, whose gradients) is not finite on any process is
        a no-op: the StepGuard puts the model's parameters and buffers, the optimizer state, the
        GradScaler's scale and the EMA back as they were before it, bit for bit, without waiting for
        the device.
        """
        cfg, scaler, guard = self.cfg, self.scaler, self.guard
        if cfg.channels_last:
            rgb = rgb.contiguous(memory_format=torch.channels_last) if rgb is not None else None
            event = event.contiguous(memory_format=torch.channels_last) if event is not None else None
        if cfg.compile:
            mark_step_begin(cfg.compile_mode)  # CUDA graphs: the previous step's outputs are dead
        guard.begin()
        with autocast(self.device, self.amp_dtype):
            preds = wrapped(rgb, event)
        loss, parts = self.compute_loss([p.float() for p in preds], targets)
        self.optimizer.zero_grad(set_to_none=True)
        n = max(n, 1)
        # the losses return mean * batch; scaling to the nominal batch (64) gives every batch size the
        # per-image step of a 64-image batch, so Init_lr * batch / 64 is a plain linear-scaling rule.
        scaler.scale(loss * (cfg.nominal_batch / n)).backward()
        bad = self.update(loss.detach())
        return torch.cat([loss.detach().reshape(1) / n, parts.detach().float()]), ~bad

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """After backward: clip, optimizer step, GradScaler and EMA update, undone where the step is bad.

        Returns the bad flag (0-dim bool, on the device): ``loss`` or, without a GradScaler, the
        gradient norm not finite, on any process.
        """
        optimizer, scaler, guard = self.optimizer, self.scaler, self.guard
        scaler.unscale_(optimizer)
        params = list(unwrap(self.model).parameters())
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=10.0)
        bad = ~torch.isfinite(loss)
        if not scaler.is_enabled():
            bad = bad | ~torch.isfinite(norm)
        if self.world_size > 1:  # every process undoes the same steps: the ranks stay equal
            flag = bad.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag.bool()
        guard.save(self._written_by_update())
        scaler.step(optimizer)
        scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        guard.end(bad)
        return bad

    def _written_by_update(self) -> list[torch.Tensor]:
        """The tensors the optimizer step, the GradScaler update and the EMA update may write."""
        stepped = prepare_state(self.optimizer)
        tensors = list(stepped)
        for p in stepped:
            tensors.extend(v for v in self.optimizer.state[p].values() if isinstance(v, torch.Tensor))
        if self.scaler.is_enabled():
            tensors.extend(
                t for t in (self.scaler._scale, self.scaler._growth_tracker) if isinstance(t, torch.Tensor)
            )
        if self.ema is not None:
            tensors.extend(self.ema.tensors())
        return tensors

    def reset_after_oom(self) -> None:
        """Drop the gradients of a step cut short by out of memory; a GradScaler left mid-iteration is
        replaced by a fresh one that keeps only its scale."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            scaler_state = self.scaler.state_dict()
            self.scaler = torch.amp.GradScaler("cuda", enabled=True)
            self.scaler.load_state_dict(scaler_state)
