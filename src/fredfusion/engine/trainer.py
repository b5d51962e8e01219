"""The training loop: phases (freeze / unfreeze), AMP, EMA, schedule, evaluation, checkpoints, resume, DDP."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fredfusion.config import TrainConfig, save_config
from fredfusion.data.augment import AugmentConfig, augment_batch
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import BatchLoader
from fredfusion.engine.batchnorm import recalibrate_batchnorm
from fredfusion.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_meta,
    save_checkpoint,
    state_dict_of,
)
from fredfusion.engine.ema import ModelEMA, unwrap
from fredfusion.engine.optim import LRSchedule, build_optimizer, scaled_lr, set_lr
from fredfusion.engine.run_log import RunLog
from fredfusion.model import build_model, model_info
from fredfusion.model.loss import LossConfig, YoloLoss

DEFAULT_RGB_WEIGHTS = Path("logs/fred_rgb/fred_rgb_best.pth")


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


def pick_device(requested: str, dist: Distributed) -> torch.device:
    """cuda:<local_rank> when available (or asked), else cpu."""
    if requested:
        device = torch.device(requested)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (full precision) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Trainer:
    """Runs one training job described by a TrainConfig (see `fredfusion train --help`)."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.dist = Distributed.from_env()
        self._log = log
        self.device = pick_device(cfg.device, self.dist)
        self.amp_dtype = amp_dtype_for(self.device, cfg.fp16)
        self.run_dir = cfg.run_dir()
        self.input_hw = (int(cfg.input_shape[0]), int(cfg.input_shape[1]))
        self.checks: dict[str, Any] = {}

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

    def _datasets(self) -> None:
        cfg = self.cfg
        self.train_set = PreparedDataset(Path(cfg.data), "train", modality=cfg.modality, pairs=cfg.pairs)
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
        return frozen, cfg.freeze_batch_size if frozen else cfg.unfreeze_batch_size

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

    # ----------------------------------------------------------------- main
    def fit(self) -> dict[str, Any]:
        """Train, evaluate every eval_period epochs, save checkpoints; returns the final summary."""
        cfg = self.cfg
        self._setup_distributed()
        torch.manual_seed(cfg.seed + self.dist.rank)
        self._datasets()
        model = self._build_model().to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        end_epoch = cfg.freeze_epoch if cfg.freeze_training else cfg.unfreeze_epoch
        if cfg.quick_test:
            end_epoch = cfg.init_epoch + 1
        _first_frozen, first_batch = self._phase(cfg.init_epoch)
        first_lr = scaled_lr(cfg.init_lr, first_batch, cfg.optimizer, cfg.nominal_batch)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optimizer, first_lr, cfg.momentum, cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEMA(model) if cfg.ema else None
        self.loss_fn = YoloLoss(model.anchors, model.strides, 1, self._loss_config())
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
            save_config(cfg, self.run_dir / "config.yaml")
            self.log("config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
        self.run_log = RunLog(self.run_dir, enabled=self.dist.main, resume=cfg.resume)
        if cfg.no_eval_map or self.val_set is None:
            self.log(
                "mAP evaluation off (--no_eval_map or no val split): best.pth is chosen by "
                + ("validation loss" if self.val_set is not None else "training loss")
            )

        self.aug_cfg = AugmentConfig(
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
        wrapped, current_phase, loader = None, None, None
        summary: dict[str, Any] = {}
        for epoch in range(state["epoch"], end_epoch):
            frozen, batch = self._phase(epoch)
            if current_phase != (frozen, batch):
                self._set_frozen(unwrap(model), frozen)
                wrapped = self._wrap(model)
                loader = self._loader(
                    self.train_set, batch, cfg.quick_test_batches if cfg.quick_test else None
                )
                base_lr = scaled_lr(
                    cfg.init_lr, batch * self.dist.world_size, cfg.optimizer, cfg.nominal_batch
                )
                current_phase = (frozen, batch)
                self.log(
                    f"phase: {'freeze (backbones frozen)' if frozen else 'unfreeze'} from epoch {epoch + 1}, "
                    f"batch {batch}, base lr {base_lr:.2e}"
                )
            special = epoch < cfg.special_aug_ratio * end_epoch
            stats = self._train_epoch(epoch, end_epoch, wrapped, frozen, loader, base_lr, special)
            summary = self._end_epoch(epoch, end_epoch, state, stats)
        if self.dist.main:
            self.run_log.close()
            if cfg.quick_test:
                self._print_checklist(summary)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return summary

    def _train_epoch(
        self,
        epoch: int,
        end_epoch: int,
        wrapped: nn.Module,
        frozen: bool,
        loader: BatchLoader,
        base_lr: float,
        special: bool,
    ) -> dict[str, float]:
        cfg = self.cfg
        model, ema, optimizer, scaler = self.model, self.ema, self.optimizer, self.scaler
        loss_fn, schedule, aug_cfg = self.loss_fn, self.schedule, self.aug_cfg
        self._train_mode(unwrap(model), frozen)
        loader.set_epoch(epoch)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(cfg.seed * 100003 + epoch * 1009 + self.dist.rank)
        steps = len(loader)
        sums = torch.zeros(4, device=self.device)  # total, box, obj, cls
        dual = seen = 0
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
        iterator = iter(loader)
        for i in range(steps):
            t0 = time.perf_counter()
            batch = next(iterator)
            wait += time.perf_counter() - t0
            progress = epoch + i / steps
            lr = base_lr * schedule.factor(progress)
            set_lr(optimizer, lr, schedule.momentum(progress, cfg.momentum))
            rgb, event, targets = augment_batch(
                batch.rgb,
                batch.event,
                batch.targets,
                self.input_hw,
                aug_cfg,
                special=special,
                generator=generator,
            )
            if cfg.channels_last and self.device.type == "cuda":
                rgb = rgb.contiguous(memory_format=torch.channels_last) if rgb is not None else None
                event = event.contiguous(memory_format=torch.channels_last) if event is not None else None
            autocast = (
                torch.autocast(self.device.type, dtype=self.amp_dtype)
                if self.amp_dtype
                else contextlib.nullcontext()
            )
            with autocast:
                preds = wrapped(rgb, event)
            loss, parts = loss_fn([p.float() for p in preds], targets)
            optimizer.zero_grad(set_to_none=True)
            # YoloLoss returns mean * batch; scaling to the nominal batch (64) gives every batch size the
            # per-image step of a 64-image batch, so Init_lr * batch / 64 is a plain linear-scaling rule.
            scaler.scale(loss * (cfg.nominal_batch / max(len(batch.ids), 1))).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), max_norm=10.0)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            sums += torch.cat([loss.detach().reshape(1) / max(len(batch.ids), 1), parts.detach().float()])
            ids = batch.ids.tolist()
            seen += len(ids)
            for image_id in ids:
                if self._dual_flag.get(image_id):
                    dual += 1
                    tdiff_sum += self._tdiff[image_id]
            bar.update(1)
            if (i + 1) % cfg.log_interval == 0 or i + 1 == steps:
                elapsed = time.perf_counter() - t_start
                mean = (sums / (i + 1)).tolist()  # host sync only every log_interval steps
                rate = seen * self.dist.world_size / max(elapsed, 1e-9)
                bar.set_postfix_str(
                    f"loss {mean[0]:.4f} lr {lr:.2e} dual {dual}/{seen} ({100 * dual / max(seen, 1):.1f}%) "
                    f"tdiff {tdiff_sum / max(dual, 1):.1f}ms {rate:.0f} img/s "
                    f"wait {100 * wait / elapsed:.0f}%"
                )
                step = epoch * steps + i
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
                self.run_log.scalars(scalars, step)
        bar.close()
        elapsed = time.perf_counter() - t_start
        mean = (sums / max(steps, 1)).tolist()
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
        }

    def _end_epoch(
        self, epoch: int, end_epoch: int, state: dict[str, Any], stats: dict[str, Any]
    ) -> dict[str, Any]:
        cfg = self.cfg
        model, ema, loss_fn = self.model, self.ema, self.loss_fn
        last = epoch + 1 == end_epoch
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            **{
                k: stats[k]
                for k in ("train_loss", "box_loss", "obj_loss", "cls_loss", "lr", "pairs_per_s", "data_wait")
            },
        }
        eval_model = ema.module if ema is not None else unwrap(model)
        do_eval = self.val_set is not None and ((epoch + 1) % cfg.eval_period == 0 or last or cfg.quick_test)
        if do_eval and self.dist.main:
            from fredfusion.eval.evaluator import evaluate

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
                loss_fn=loss_fn,
                num_workers=0,
                compute_map=not cfg.no_eval_map,
            )
            row["val_loss"] = result.metrics.get("val_loss")
            if not cfg.no_eval_map:
                row["mAP50"] = result.metrics.get("mAP50")
                row["mAP50_95"] = result.metrics.get("mAP50_95")
                self.log(
                    f"epoch {epoch + 1}: mAP50 {row['mAP50']:.4f}  mAP50:95 {row['mAP50_95']:.4f}  "
                    f"val_loss {row['val_loss']:.4f}  ({result.metrics.get('pairs_per_s', 0):.0f} pairs/s)"
                )
            else:
                self.log(f"epoch {epoch + 1}: val_loss {row['val_loss']:.4f}")
            self._log_val_images(eval_model, epoch)
        if self.dist.main:
            self.run_log.scalars(
                {f"val/{k}": row.get(k) for k in ("mAP50", "mAP50_95", "val_loss")}, epoch + 1
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

    def _score(self, row: dict[str, Any]) -> float | None:
        """Higher is better. mAP when evaluated, else minus the validation (or training) loss."""
        metric = self.cfg.best_metric
        if metric != "val_loss" and not self.cfg.no_eval_map and row.get(metric) is not None:
            return float(row[metric])
        loss = row.get("val_loss") if row.get("val_loss") is not None else row.get("train_loss")
        return None if loss is None or not math.isfinite(loss) else -float(loss)

    def _save(self, epoch: int, state: dict[str, Any], row: dict[str, Any]) -> None:
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
                Path(cfg.best_alias).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.run_dir / "best.pth", cfg.best_alias)
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
            shutil.copyfile(self.run_dir / "last.pth", self.run_dir / f"ep{epoch + 1:03d}.pth")

    def _resume(self, state: dict[str, Any]) -> None:
        model, ema, optimizer, scaler = self.model, self.ema, self.optimizer, self.scaler
        path = self.run_dir / "last.pth"
        if not path.is_file():
            raise SystemExit(f"--resume: {path} not found (nothing to resume in {self.run_dir})")
        payload = load_checkpoint(path)
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
