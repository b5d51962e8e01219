"""Detector network (RGB / Event / dual-branch YOLO), loss, anchors and post-processing."""

from fredfusion.model.detector import FusionYOLO, build_model, model_info

__all__ = ["FusionYOLO", "build_model", "model_info"]
