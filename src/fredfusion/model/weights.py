"""Reading weights: checkpoints loaded safely (weights_only), the model they describe rebuilt.

Writing checkpoints (atomically, during training) and resuming belong to ``engine.checkpoint``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from fredfusion.spec import DEFAULT_INPUT_HW, check_input_hw


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


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


def input_hw_of(payload: dict[str, Any], given: Any = None, source: str = "checkpoint") -> tuple[int, int]:
    """The input (height, width) to run a checkpoint at: ``given`` (a flag) when set, else the training
    ``config.input_shape`` stored in ``payload``, else DEFAULT_INPUT_HW. ValueError names where a bad
    shape came from (``source`` names the checkpoint)."""
    if given is not None:
        return check_input_hw(given, "--input-shape")
    shape = (payload.get("config") or {}).get("input_shape") or list(DEFAULT_INPUT_HW)
    return check_input_hw(shape, f"input shape from {source} (config.input_shape)")


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a fredfusion checkpoint (best.pth, last.pth, epNNN.pth)."""
    from fredfusion.model.detector import build_model

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
