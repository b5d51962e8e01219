"""The network a training run starts from: its anchors (default or k-means), the model, initial weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from fredfusion.config import TrainConfig
from fredfusion.data.dataset import PreparedDataset
from fredfusion.model import build_model, model_info
from fredfusion.model.convert import layout_of, with_layout
from fredfusion.model.weights import BRANCHES, backbone_tensors, load_branch, load_weights, read_weights

DEFAULT_RGB_WEIGHTS = Path("logs/fred_rgb/fred_rgb_best.pth")
"""A dual run without ``weights`` starts from these RGB weights when they exist (the old tool's order) ..."""
COCO_WEIGHTS = "model_data/yolov5{size}.pth"
"""... else from the old tool's COCO-pretrained file of its size when it exists, else at random."""


class StartWeights(NamedTuple):
    """Where a run's initial weights came from (for the check list) and whether they filled every backbone
    tensor (the freeze phase needs that)."""

    summary: str
    backbones: bool


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


def start_weights_path(cfg: TrainConfig, log: Callable[[str], None]) -> Path | None:
    """``cfg.weights``; for a dual run without it the old tool's order, the choice printed:
    DEFAULT_RGB_WEIGHTS, then COCO_WEIGHTS of the run's size, then None (random init)."""
    if cfg.weights:
        return Path(cfg.weights)
    if cfg.modality != "dual":
        log("weights: none given: random init")
        return None
    if cfg.weights_rgb or cfg.weights_event:
        log("weights: none given for the whole model: neck, head and fusion start at random")
        return None
    coco = Path(COCO_WEIGHTS.format(size=cfg.model))
    order = f"{DEFAULT_RGB_WEIGHTS}, {coco}, random init"
    for path, what in ((DEFAULT_RGB_WEIGHTS, "an RGB run's best"), (coco, "the old tool's COCO-pretrained")):
        if path.is_file():
            log(f"weights: none given; starting from {path} ({what}; the order: {order})")
            return path
    log(f"weights: none given; neither {DEFAULT_RGB_WEIGHTS} nor {coco} found: random init")
    return None


def build_run_model(
    cfg: TrainConfig, train_set: PreparedDataset, log: Callable[[str], None]
) -> tuple[nn.Module, StartWeights]:
    """The run's model (on the CPU) in the backbone layout of its starting weights, and what those were:
    ``weights`` (see ``start_weights_path``), then ``weights_rgb`` / ``weights_event`` into their backbone.

    A weights file that is missing, unreadable or of no known layout, or a backbone file of another
    modality, family or size (``model.weights.load_branch``), is a CheckpointError naming it.
    """
    path = start_weights_path(cfg, log)
    source = read_weights(path) if path is not None else None
    branches = {b: Path(p) for b in BRANCHES if (p := getattr(cfg, f"weights_{b}"))}
    branch_sources = {b: read_weights(p) for b, p in branches.items()}
    layouts = [s.layout for s in (source, *branch_sources.values()) if s is not None]
    h, w = int(cfg.input_shape[0]), int(cfg.input_shape[1])
    anchors = run_anchors(cfg, train_set, log) if cfg.arch == "yolov5" else None
    model = build_model(cfg.modality, cfg.model, cfg.fusion, num_classes=1, anchors=anchors, arch=cfg.arch)
    model = with_layout(model, layouts[0] if layouts else "v6")
    info = model_info(model, (h, w))
    layout = ", YOLOv5 v5.0 backbone layout (as its weights)" if layout_of(model) == "v5" else ""
    family = "" if cfg.arch == "yolov5" else f" ({cfg.arch})"
    fusion = cfg.fusion if cfg.modality == "dual" else "-"
    log(
        f"model: {cfg.modality} YOLO-{cfg.model}{family} fusion={fusion} "
        f"params {info['params'] / 1e6:.2f}M, {info['gflops']:.1f} GFLOPs at {w}x{h}{layout}"
    )
    if source is None and not branches:
        return model, StartWeights("random init (no weights)", False)
    summary, loaded = [], set()
    if source is not None:
        report = load_weights(model, source)
        for line in report.lines(path):
            log(line)
        summary.append(f"{len(report.loaded)}/{report.total} tensors from {path}")
        loaded.update(report.loaded)
    for branch, branch_path in branches.items():
        part = load_branch(model, branch_sources[branch], branch, branch_path)
        log(part.line(branch_path))
        summary.append(f"backbone_{branch} from {branch_path}")
        loaded.update(part.loaded)
    return model, StartWeights("; ".join(summary), set(backbone_tensors(model)) <= loaded)
