"""Checkpoints: atomic writes, safe loading (weights_only), and model reconstruction."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


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
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True): files that would run code are refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"(a pickle that could run code, or not a fredfusion checkpoint). "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a fredfusion checkpoint (expected a mapping)")
    return payload


def model_meta(model: torch.nn.Module) -> dict[str, Any]:
    """What it takes to rebuild the network: modality, size, fusion, classes, anchors."""
    return {
        "modality": model.modality,
        "size": model.size,
        "fusion": model.fusion,
        "num_classes": model.num_classes,
        "anchors": model.anchors.detach().cpu().tolist(),
    }


def state_dict_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to use from a checkpoint: EMA when present, else the raw model."""
    for key in ("ema", "model"):
        if isinstance(payload.get(key), dict) and payload[key]:
            return payload[key]
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload  # a bare state dict
    raise CheckpointError("checkpoint has no model weights")


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a fredfusion checkpoint (best.pth, last.pth, epNNN.pth)."""
    from fredfusion.model import build_model

    payload = load_checkpoint(path)
    meta = payload.get("meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: no model description ('meta'); not a fredfusion checkpoint")
    model = build_model(
        meta["modality"],
        meta["size"],
        meta["fusion"],
        num_classes=int(meta["num_classes"]),
        anchors=torch.tensor(meta["anchors"], dtype=torch.float32),
    )
    try:
        model.load_state_dict(state_dict_of(payload), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the described model ({exc})") from None
    return model.to(device).eval(), payload
