"""Detector networks (YOLOv5 anchor-based and YOLOv8-style anchor-free; RGB / Event / dual), losses,
anchors and post-processing."""

from fredfusion.model.build import build_loss, build_model
from fredfusion.model.detector import FusionYOLO, model_info

__all__ = ["FusionYOLO", "build_loss", "build_model", "model_info"]
