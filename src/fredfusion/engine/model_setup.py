"""The network a training run starts from: its anchors (default or k-means), the model, initial weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fredfusion.config import TrainConfig
from fredfusion.data.dataset import PreparedDataset
from fredfusion.model import build_model, model_info
from fredfusion.model.weights import CheckpointError, load_checkpoint, state_dict_of

DEFAULT_RGB_WEIGHTS = Path("logs/fred_rgb/fred_rgb_best.pth")
"""A dual run without ``weights`` (and not resuming) starts from these RGB weights when they exist."""


def run_anchors(cfg: TrainConfig, train_set: PreparedDataset, log: Callable[[str], None]) -> torch.Tensor:
    """Default anchors (tuned at 640 wide) scaled to the input width, or k-means ones (--autoanchor)."""
    from fredfusion.model.anchors import anchor_recall, default_anchors, kmeans_anchors

    input_w = int(cfg.input_shape[1])
    scaled = default_anchors() * (input_w / 640)
    if not cfg.autoanchor:
        return scaled

    scale = input_w / train_set.store_hw[1]
    wh = [b[:, 2:4] - b[:, 0:2] for b in (train_set.boxes_for(i) for i in train_set.ids) if len(b)]
    if not wh:
        log("autoanchor: no train boxes; default anchors kept")
        return scaled
    wh_np = np.concatenate(wh) * scale
    defaults = scaled.reshape(-1, 2).numpy()
    base = anchor_recall(wh_np, defaults, 4.0)
    try:
        anchors, recall = kmeans_anchors(wh_np, n=9, seed=cfg.seed)
    except ValueError as exc:
        log(f"autoanchor: {exc}; default anchors kept (recall {base:.3f})")
        return scaled
    log(f"autoanchor: k-means recall {recall:.3f} vs default {base:.3f} on {len(wh_np)} boxes")
    if recall <= base:
        return scaled
    return torch.as_tensor(anchors, dtype=torch.float32).reshape(3, 3, 2)


def build_run_model(
    cfg: TrainConfig, train_set: PreparedDataset, log: Callable[[str], None]
) -> tuple[nn.Module, str]:
    """The run's model (on the CPU) and where its initial weights came from."""
    h, w = int(cfg.input_shape[0]), int(cfg.input_shape[1])
    model = build_model(
        cfg.modality, cfg.model, cfg.fusion, num_classes=1, anchors=run_anchors(cfg, train_set, log)
    )
    info = model_info(model, (h, w))
    log(
        f"model: {cfg.modality} YOLO-{cfg.model} fusion={cfg.fusion if cfg.modality == 'dual' else '-'} "
        f"params {info['params'] / 1e6:.2f}M, {info['gflops']:.1f} GFLOPs at {w}x{h}"
    )
    return model, load_init_weights(model, cfg, log)


def load_init_weights(model: nn.Module, cfg: TrainConfig, log: Callable[[str], None]) -> str:
    """Load ``cfg.weights`` (or DEFAULT_RGB_WEIGHTS for a new dual run) into ``model`` (rgb -> dual
    mapping); a missing file means random init. Returns what was loaded, for the check list."""
    path = Path(cfg.weights) if cfg.weights else None
    if path is None and cfg.modality == "dual" and not cfg.resume and DEFAULT_RGB_WEIGHTS.is_file():
        path = DEFAULT_RGB_WEIGHTS
    if path is None:
        return "random init (no --weights)"
    if not path.is_file():
        log(f"weights: {path} not found; training from random init")
        return f"{path} not found: random init"
    try:
        loaded, total = model.load_rgb_weights(state_dict_of(load_checkpoint(path)))
    except CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    log(f"weights: loaded {loaded}/{total} tensors from {path}")
    return f"{loaded}/{total} tensors from {path}"
