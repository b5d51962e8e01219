"""What a detector and its input are: modalities, fusions, sizes, input shapes and NMS default.

This module is the one source of these rules and imports nothing of the package, so every layer
(data, model, config, engine, eval, commands) reads them from here. Adding a modality, a fusion or
a size starts here; the model, the loader, export and the command-line choices follow from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

MODALITIES: tuple[str, ...] = ("rgb", "event", "dual")
"""What a model looks at: RGB frames, event frames, or both of one RGB/Event pair."""

ARCHS: tuple[str, ...] = ("yolov5", "yolov8")
"""Detector families: anchor-based YOLOv5 v6 (the old tool's) and anchor-free YOLOv8-style."""

FRAME_KINDS: tuple[str, ...] = ("rgb", "event")
"""The kinds of frame a prepared folder holds, one per sensor."""

FUSIONS: tuple[str, ...] = ("concat", "attention", "early")
"""How a dual model joins its two inputs: per-scale fusion blocks after two backbones (concat,
attention) or one backbone on the 6-channel stack (early). Ignored by single-modality models."""

DROPOUT_REGIONS: tuple[str, ...] = ("image", "boxes", "box_parts")
"""What modality dropout blanks in a dual model's input: the whole frame, the target boxes, or the
target boxes less a random part of each (data/blanking.py)."""

DROPOUT_SIDES: dict[str, float] = {"both": 0.5, "rgb": 0.0, "event": 1.0}
"""Which modality dropout blanks, with the chance that a dropped sample loses its events (else its RGB)."""

SIZES: dict[str, tuple[float, float]] = {
    "n": (0.33, 0.25),
    "s": (0.33, 0.50),
    "m": (0.67, 0.75),
    "l": (1.0, 1.0),
    "x": (1.33, 1.25),
}
"""Model sizes: (depth multiple, width multiple) of the YOLOv5 v6 family."""

INPUT_MULTIPLE = 32
"""Input height and width must be multiples of the largest stride."""

DEFAULT_INPUT_HW: tuple[int, int] = (384, 640)
"""Training / inference input (height, width): 16:9 like FRED, both sides multiples of 32."""

NMS_IOU = 0.45
"""Default NMS IoU threshold. Drones are a few pixels wide, so a duplicate box from a neighbouring cell,
shifted by a pixel, overlaps the first one by only IoU 0.3-0.6; 0.45 removes most of them while two
real drones rarely overlap that much (measured in docs/DESIGN.md)."""

_FRAMES: dict[str, tuple[str, ...]] = {"rgb": ("rgb",), "event": ("event",), "dual": ("rgb", "event")}

T = TypeVar("T")


def check_modality(modality: str) -> str:
    """``modality`` when it is one of MODALITIES, else ValueError listing them."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    return modality


def frames_for(modality: str) -> tuple[str, ...]:
    """The frame kinds a model of ``modality`` reads: rgb -> (rgb,), event -> (event,), dual -> both."""
    return _FRAMES[check_modality(modality)]


def model_inputs(modality: str, rgb: T | None, event: T | None) -> tuple[T | None, T | None]:
    """(rgb, event) as a model of ``modality`` takes them: the frames it does not read become None,
    and a frame it needs but did not get is a ValueError naming it."""
    wanted = frames_for(modality)
    given = {"rgb": rgb, "event": event}
    missing = [kind for kind in wanted if given[kind] is None]
    if missing:
        need = " and ".join("RGB" if k == "rgb" else "event" for k in wanted)
        raise ValueError(
            f"a {modality} model needs {need} frames"
            + (" of the same pair" if modality == "dual" else "")
            + f" (no {' / '.join(missing)} frames given)"
        )
    return (rgb if "rgb" in wanted else None), (event if "event" in wanted else None)


def check_hw(hw: Sequence[Any], what: str, multiple: int = 1) -> tuple[int, int]:
    """``(height, width)`` as ints when both are positive (multiples of ``multiple``), else ValueError
    naming ``what`` (a flag or a file)."""
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two integers H W, got {hw!r}") from None
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        kind = "positive" if multiple == 1 else f"positive multiples of {multiple}"
        raise ValueError(f"{what} H W must be {kind}, got {h} {w}")
    return h, w


def check_input_hw(hw: Sequence[Any], what: str = "input shape") -> tuple[int, int]:
    """``check_hw`` for a network input: both sides multiples of INPUT_MULTIPLE."""
    return check_hw(hw, what, INPUT_MULTIPLE)


def input_hw_for_width(width: int, aspect: float = 9 / 16) -> tuple[int, int]:
    """The input shape of a 16:9 source at ``width`` (the seed tool's ``imgsz``): height rounded to 32."""
    return round(width * aspect / INPUT_MULTIPLE) * INPUT_MULTIPLE, int(width)
