"""Training checkpoints: atomic writes and copies, the best / last / epNNN payloads, and resume.

Reading a checkpoint file is ``model.weights``; this module decides what a training run writes and how
a run continues from its ``last.pth``.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from fredfusion.config import TrainConfig
from fredfusion.engine.ema import ModelEMA, unwrap
from fredfusion.engine.errors import TrainingStopped
from fredfusion.files import atomic_write
from fredfusion.model.weights import CheckpointError, load_checkpoint, model_meta


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    previous = "the previous checkpoint is intact" if path.is_file() else "no previous checkpoint there"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return CheckpointError(f"cannot write checkpoint {path}: {reason}; {previous}")


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` to a temp file in path's folder, fsync, rename over path.

    Any failure removes the temp file and leaves the file at path as it was; an OSError (disk full,
    no permission, ...) becomes a CheckpointError naming the path and the reason.
    """
    path = Path(path)
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise _write_error(path, exc) from exc


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write payload atomically: a temp file in the same folder, fsync, then rename over path.

    A crash or a full disk during the write leaves the previous file at path byte-identical and
    no temp file behind; write errors raise CheckpointError("cannot write checkpoint PATH: REASON; ...").
    """
    _atomic_write(Path(path), lambda handle: torch.save(payload, handle))


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint file atomically (same guarantees and errors as save_checkpoint)."""

    def write(handle: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, handle, length=16 << 20)

    _atomic_write(Path(dst), write)


def claim_run_dir(run_dir: Path) -> Path:
    """The folder a new run writes: ``run_dir`` when it is free (missing or empty), else the first free
    one of ``<name>2``, ``<name>3``, ... (created here, so two runs started together differ)."""
    for n in itertools.count(1):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if candidate.is_dir() and not any(candidate.iterdir()):
                return candidate
        except OSError:
            return candidate  # prepare_run_dir names the problem
    raise AssertionError("unreachable")


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder and remove temp files of a save that was killed; TrainingStopped when the
    folder cannot be created or written (checked before any work)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
        for stale in run_dir.glob(".*.pth.*.tmp"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
    except OSError as exc:
        raise TrainingStopped(
            f"run folder {run_dir} is not writable ({exc.strerror or exc}); "
            f"fix its permissions or free space, or choose another save_dir / name"
        ) from None


def best_score(row: dict[str, Any], cfg: TrainConfig) -> float | None:
    """How good an epoch's ``row`` is, higher is better: ``best_metric`` (mAP) when evaluated, else minus
    the validation (or training) loss; None when there is nothing finite to compare."""
    metric = cfg.best_metric
    if metric != "val_loss" and not cfg.no_eval_map and row.get(metric) is not None:
        return float(row[metric])
    loss = row.get("val_loss") if row.get("val_loss") is not None else row.get("train_loss")
    return None if loss is None or not math.isfinite(loss) else -float(loss)


def save_training_checkpoints(
    run_dir: Path,
    cfg: TrainConfig,
    *,
    model: nn.Module,
    ema: ModelEMA | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    row: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """The checkpoints after ``epoch`` (0-based): best.pth when the row's ``best_score`` beats
    ``state["best"]`` (``state`` updated, a copy at ``best_alias``), last.pth (everything resume needs)
    and a copy epNNN.pth every ``save_period`` epochs. A failed write raises CheckpointError."""
    meta = model_meta(unwrap(model))
    score = best_score(row, cfg)
    if score is not None and (state["best"] is None or score > state["best"]):
        state["best"], state["best_epoch"] = score, epoch + 1
        best = {
            "meta": meta,
            "model": (ema.state_dict() if ema is not None else unwrap(model).state_dict()),
            "epoch": epoch + 1,
            "metrics": {k: v for k, v in row.items() if v is not None},
            "config": cfg.to_dict(),
        }
        save_checkpoint(best, run_dir / "best.pth")
        if cfg.best_alias:
            copy_checkpoint(run_dir / "best.pth", Path(cfg.best_alias))
    last = {
        "meta": meta,
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else {},
        "ema_updates": ema.updates if ema is not None else 0,
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
    save_checkpoint(last, run_dir / "last.pth")
    if cfg.save_period > 0 and (epoch + 1) % cfg.save_period == 0:
        copy_checkpoint(run_dir / "last.pth", run_dir / f"ep{epoch + 1:03d}.pth")


def resume_training(
    run_dir: Path,
    *,
    model: nn.Module,
    ema: ModelEMA | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Load ``run_dir/last.pth`` into the model, EMA, optimizer, scaler and torch's RNG; returns the
    checkpoint. A missing or foreign file, or one of another modality / size / fusion, is a SystemExit
    naming ``--resume``."""
    path = run_dir / "last.pth"
    if not path.is_file():
        raise SystemExit(f"--resume: {path} not found (nothing to resume in {run_dir})")
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        raise SystemExit(f"--resume: {exc}") from None
    missing = [k for k in ("model", "optimizer", "epoch", "rng") if k not in payload]
    if missing:
        raise SystemExit(f"--resume: {path} is not a training checkpoint (no {', '.join(missing)})")
    meta = payload.get("meta", {})
    mine = model_meta(unwrap(model))
    saved = {"arch": "yolov5", **meta}  # checkpoints of before the second family are YOLOv5
    for key in ("arch", "modality", "size", "fusion"):
        if saved.get(key) != mine[key]:
            raise SystemExit(
                f"--resume: {path} holds a {key}={saved.get(key)} model, this run asks for {key}={mine[key]}"
            )
    unwrap(model).load_state_dict(payload["model"], strict=True)
    if ema is not None and payload.get("ema"):
        ema.module.load_state_dict(payload["ema"], strict=True)
        ema.updates = int(payload.get("ema_updates", 0))
    optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng"]["torch"])
    cuda_states = payload["rng"].get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return payload
