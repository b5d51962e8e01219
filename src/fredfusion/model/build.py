"""Building a detector of either family and its training objective."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fredfusion.spec import ARCHS


def build_model(
    modality: str = "dual",
    size: str = "s",
    fusion: str = "concat",
    num_classes: int = 1,
    anchors: torch.Tensor | None = None,
    arch: str = "yolov5",
) -> nn.Module:
    """A detector of family ``arch`` (``spec.ARCHS``); ``anchors`` apply to the anchor-based family only."""
    if arch == "yolov8":
        from fredfusion.model.yolov8 import FusionYOLOv8

        return FusionYOLOv8(modality, size, fusion, num_classes)
    if arch != "yolov5":
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    from fredfusion.model.detector import build_model as build_yolov5

    return build_yolov5(modality, size, fusion, num_classes, anchors)


LossFn = Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_loss(model: nn.Module, label_smoothing: float = 0.0) -> LossFn:
    """The training loss of ``model``'s family.

    YOLOv5: class gain scaled by classes / 80 as in YOLOv5, but the objectness gain is not shrunk with
    the input area as YOLOv5 does: with few, tiny drones per frame that slowed learning several-fold
    (measured on the synthetic sample at 320x192: mAP50 0.50 vs 0.00 after 40 steps of an overfit run).
    YOLOv8: the published gains (box 7.5, cls 0.5, dfl 1.5).
    """
    if getattr(model, "arch", "yolov5") == "yolov8":
        from fredfusion.model.loss_v8 import V8Loss, V8LossConfig

        return V8Loss(model, V8LossConfig(label_smoothing=label_smoothing))  # type: ignore[arg-type]
    from fredfusion.model.loss import LossConfig, YoloLoss

    config = LossConfig(cls=LossConfig().cls / 80, label_smoothing=label_smoothing)
    return YoloLoss(model.anchors, model.strides, int(model.num_classes), config)
