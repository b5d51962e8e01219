"""Other tools' weights in this package's names: the old tool's checkpoints and COCO files, YOLOv5 ones.

Sources read (key layouts published with each tool):

- **The old tool** (the yolov5-pytorch fork of the seed scripts): ``YoloBody`` (one modality; its COCO files
  ``model_data/yolov5<phi>.pth`` too, 80 classes) and ``YoloFusionBody`` (dual, concat fusion). Backbone
  ``stem`` (Focus), ``dark2`` .. ``dark5`` (YOLOv5 v5.0: SPP before a last C3 without shortcut), neck
  ``conv_for_feat3`` .. ``conv3_for_downsample2``, heads ``yolo_head_P3/P4/P5``, fusion
  ``compression_convs.0/1/2``. Its fusion body joins the neck inputs in the other order than its
  single-modality body (lateral first), so those four C3 blocks get their input halves swapped here.
  The checkpoints hold no anchors: the old tool's ``model_data/yolo_anchors.txt`` values are used.
- **YOLOv5 state dicts** with the official key names (``model.0.conv.weight`` ...): v6 (6x6 stem, SPPF)
  and v5.0 (Focus stem, SPP). Layer index -> module: 0 stem, 1-8 the four [Conv, C3] stages, 9 SPPF
  (v5.0: 8 SPP, 9 C3), 10 / 13 / 14 / 17 the top-down neck, 18 / 20 / 21 / 23 the bottom-up neck, 24 the
  Detect layer (``m.0/1/2``, ``anchors`` in stride units).
- **fredfusion** checkpoints and state dicts, as they are.

A Focus stem (space-to-depth, then a 3x3 conv) is converted exactly into the 6x6 stride-2 stem conv.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fredfusion.model.backbone import BASE_CHANNELS, CSPDarknet
from fredfusion.model.blocks import scale_depth, scale_width
from fredfusion.spec import SIZES

OLD_TOOL_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((10.0, 13.0), (16.0, 30.0), (33.0, 23.0)),
    ((30.0, 61.0), (62.0, 45.0), (59.0, 119.0)),
    ((116.0, 90.0), (156.0, 198.0), (373.0, 326.0)),
)
"""The old tool's anchors (its ``model_data/yolo_anchors.txt``): input pixels at 640, rows P3, P4, P5."""

FOCUS_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))
"""(row, column) offset of each 3-channel block of a Focus input: x[..., ::2, ::2], x[..., 1::2, ::2],
x[..., ::2, 1::2], x[..., 1::2, 1::2]."""

_OLD_BACKBONE = {
    "stem.conv": "stem",
    "dark2": "stage1",
    "dark3": "stage2",
    "dark4": "stage3",
    "dark5": "stage4",
}
_OLD_TOP = {
    "conv_for_feat3": "neck.lateral_p5",
    "conv3_for_upsample1": "neck.top_down_p4",
    "conv_for_feat2": "neck.lateral_p4",
    "conv3_for_upsample2": "neck.top_down_p3",
    "down_sample1": "neck.down_p3",
    "conv3_for_downsample1": "neck.bottom_up_p4",
    "down_sample2": "neck.down_p4",
    "conv3_for_downsample2": "neck.bottom_up_p5",
    "yolo_head_P3": "head.convs.0",
    "yolo_head_P4": "head.convs.1",
    "yolo_head_P5": "head.convs.2",
    "compression_convs.0": "fusion_p3.proj",
    "compression_convs.1": "fusion_p4.proj",
    "compression_convs.2": "fusion_p5.proj",
}
_SWAPPED_INPUTS = {
    f"neck.{block}.{cv}.conv.weight"
    for block in ("top_down_p4", "top_down_p3", "bottom_up_p4", "bottom_up_p5")
    for cv in ("cv1", "cv2")
}
_OFFICIAL = {
    0: "backbone.stem",
    1: "backbone.stage1.0",
    2: "backbone.stage1.1",
    3: "backbone.stage2.0",
    4: "backbone.stage2.1",
    5: "backbone.stage3.0",
    6: "backbone.stage3.1",
    7: "backbone.stage4.0",
    8: "backbone.stage4.1",
    10: "neck.lateral_p5",
    13: "neck.top_down_p4",
    14: "neck.lateral_p4",
    17: "neck.top_down_p3",
    18: "neck.down_p3",
    20: "neck.bottom_up_p4",
    21: "neck.down_p4",
    23: "neck.bottom_up_p5",
}
_OFFICIAL_LAST = {"v6": "backbone.sppf", "v5": "backbone.stage4.2"}
_STRIDES = (8.0, 16.0, 32.0)
_BACKBONE = re.compile(r"^(backbone(?:_rgb|_event)?)\.")


@dataclass
class Converted:
    """Weights in this package's names and what the file said about the model."""

    state: dict[str, torch.Tensor]
    kind: str  # what the file was, for messages
    layout: str  # backbone layout: "v6" or "v5"
    modality: str | None = None  # None: a single-modality file that does not say which sensor
    fusion: str | None = None
    size: str | None = None
    num_classes: int | None = None
    unknown: list[str] = field(default_factory=list)  # source keys with no place in these models
    arch: str | None = None  # detector family; None: fredfusion weights that do not say


def parse_anchors(text: str) -> torch.Tensor:
    """Anchors in the old tool's ``yolo_anchors.txt`` format (``10,13, 16,30, ...``: 9 width, height pairs,
    P3 first) as (3, 3, 2); ValueError unless 18 positive numbers."""
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError("expected 9 'width,height' pairs of numbers") from None
    if len(values) != 18 or min(values) <= 0:
        raise ValueError(f"expected 9 positive 'width,height' pairs, got {len(values)} numbers")
    return torch.tensor(values).view(3, 3, 2)


def focus_to_stem(weight: torch.Tensor) -> torch.Tensor:
    """The ``(C, 3, 6, 6)`` kernel of the stride-2 (padding 2) conv equal to a Focus layer's ``(C, 12, 3, 3)``
    conv (stride 1, padding 1) on the space-to-depth input: tap (ky, kx) of block (dy, dx) lands on
    (2 ky + dy, 2 kx + dx)."""
    c_out, c12, kh, kw = weight.shape
    c = c12 // len(FOCUS_OFFSETS)
    kernel = weight.new_zeros(c_out, c, 2 * kh, 2 * kw)
    for block, (dy, dx) in enumerate(FOCUS_OFFSETS):
        kernel[:, :, dy::2, dx::2] = weight[:, block * c : (block + 1) * c]
    return kernel


def with_layout(model: nn.Module, layout: str) -> nn.Module:
    """``model`` (a FusionYOLO) with its backbone(s) rebuilt in ``layout`` (fresh weights); v6 is as built."""
    if layout == "v6":
        return model
    for name in ("backbone", "backbone_rgb", "backbone_event"):
        old = getattr(model, name, None)
        if isinstance(old, CSPDarknet):
            setattr(model, name, CSPDarknet(old.in_channels, model.depth, model.width, layout))
    return model


def layout_of(model: nn.Module) -> str:
    """The backbone layout of a model: "v5" or "v6" (models without a CSPDarknet backbone count as v6)."""
    backbone = model.backbone_modules()[0]
    return backbone.layout if isinstance(backbone, CSPDarknet) else "v6"


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    half = weight.shape[1] // 2
    return torch.cat((weight[:, half:], weight[:, :half]), dim=1)


def _from_old_tool(src: Mapping[str, torch.Tensor], anchors: torch.Tensor) -> Converted:
    fusion = any(k.startswith("backbone_rgb.") for k in src)
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in src.items():
        name = None
        match = re.match(r"^(backbone(?:_rgb|_event)?)\.(stem\.conv|dark[2-5])\.(.+)$", key)
        if match:
            name = f"{match[1]}.{_OLD_BACKBONE[match[2]]}.{match[3]}"
            if match[2] == "stem.conv" and match[3] == "conv.weight":
                value = focus_to_stem(value)
        else:
            old = next((o for o in _OLD_TOP if key.startswith(o + ".")), None)
            if old is not None:
                name = _OLD_TOP[old] + key[len(old) :]
                if fusion and name in _SWAPPED_INPUTS:
                    value = _swap_halves(value)
        if name is None:
            unknown.append(key)
        else:
            state[name] = value
    state["anchors"] = anchors
    kind = "the old tool's " + ("YoloFusionBody, concat fusion" if fusion else "YoloBody")
    return Converted(
        state,
        kind,
        "v5",
        "dual" if fusion else None,
        "concat" if fusion else None,
        unknown=unknown,
        arch="yolov5",
    )


def _from_official(src: Mapping[str, torch.Tensor]) -> Converted:
    layout = "v5" if "model.0.conv.conv.weight" in src else "v6"
    table = {**_OFFICIAL, 9: _OFFICIAL_LAST[layout]}
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in src.items():
        match = re.match(r"^model\.(\d+)\.(.+)$", key)
        index, rest = (int(match[1]), match[2]) if match else (-1, "")
        if index == 0 and layout == "v5":
            rest = rest.removeprefix("conv.")  # the Focus wrapper
            if rest == "conv.weight":
                value = focus_to_stem(value)
        if index in table:
            state[f"{table[index]}.{rest}"] = value
        elif index == 24 and (head := re.match(r"^m\.([012])\.(weight|bias)$", rest)):
            state[f"head.convs.{head[1]}.{head[2]}"] = value
        elif index == 24 and rest == "anchors":
            state["anchors"] = value.float() * torch.tensor(_STRIDES).view(-1, 1, 1)
        elif not (index == 24 and rest == "anchor_grid"):
            unknown.append(key)
    return Converted(
        state,
        f"a YOLOv5 {'v5.0' if layout == 'v5' else 'v6'} state dict",
        layout,
        unknown=unknown,
        arch="yolov5",
    )


def _from_fredfusion(src: Mapping[str, torch.Tensor]) -> Converted:
    layout = "v5" if any(re.match(r"^backbone(_rgb|_event)?\.stage4\.2\.", k) for k in src) else "v6"
    modality, fusion = None, None
    if any(k.startswith("backbone_rgb.") for k in src):
        modality = "dual"
    elif (stem := src.get("backbone.stem.conv.weight")) is not None and stem.shape[1] == 6:
        modality, fusion = "dual", "early"
    return Converted(dict(src), "fredfusion weights", layout, modality, fusion)


def _size_of(state: Mapping[str, torch.Tensor]) -> str | None:
    """The model size whose stem width and first-stage depth match these weights."""
    stem = next((v for k, v in state.items() if re.match(r"^backbone(_rgb)?\.stem\.conv\.weight$", k)), None)
    prefix = "backbone_rgb." if "backbone_rgb.stem.conv.weight" in state else "backbone."
    bottlenecks = {k.split(".")[4] for k in state if k.startswith(prefix + "stage1.1.m.")}
    if stem is None:
        return None
    for size, (depth, width) in SIZES.items():
        if stem.shape[0] == scale_width(BASE_CHANNELS[0], width) and len(bottlenecks) == scale_depth(
            3, depth
        ):
            return size
    return None


def convert_state_dict(src: Mapping[str, torch.Tensor], anchors: torch.Tensor | None = None) -> Converted:
    """``src`` (wrapper prefixes such as ``module.`` already stripped) in this package's names.

    ``anchors`` (3, 3, 2) replace the old tool's default ones. ValueError when the key names belong to
    none of the known layouts.
    """
    keys = list(src)
    if any(k.startswith("model.0.") for k in keys):
        out = _from_official(src)
    elif any(re.match(r"^backbone(_rgb)?\.(dark2|stem\.conv\.conv)\.", k) for k in keys):
        old = torch.tensor(OLD_TOOL_ANCHORS) if anchors is None else anchors.float()
        out = _from_old_tool(src, old)
    elif any(_BACKBONE.match(k) or k.startswith(("neck.", "head.")) for k in keys):
        out = _from_fredfusion(src)
    else:
        example = ", ".join(keys[:3]) or "none"
        raise ValueError(
            f"unknown weight names (first keys: {example}); known: fredfusion, the old tool's YoloBody / "
            f"YoloFusionBody and YOLOv5 (model.N...) state dicts"
        )
    out.size = _size_of(out.state)
    head = out.state.get("head.convs.0.bias")
    if head is not None and head.shape[0] % 3 == 0 and head.shape[0] // 3 > 5:
        out.num_classes = head.shape[0] // 3 - 5
    return out


__all__ = [
    "OLD_TOOL_ANCHORS",
    "Converted",
    "convert_state_dict",
    "focus_to_stem",
    "layout_of",
    "parse_anchors",
    "with_layout",
]
