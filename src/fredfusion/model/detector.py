"""The FusionYOLO detector: RGB, Event or dual-branch YOLOv5 (v6-style) with a PAN neck.

Module names (they define the state-dict keys, which the weight mapping relies on):

- ``modality="rgb"`` / ``"event"``: ``backbone`` (3 input channels), ``neck``, ``head``.
- ``modality="dual"``, ``fusion="early"``: ``backbone`` (6 input channels: RGB then Event),
  ``neck``, ``head``.
- ``modality="dual"``, ``fusion="concat"`` / ``"attention"``: ``backbone_rgb``, ``backbone_event``,
  ``fusion_p3``, ``fusion_p4``, ``fusion_p5``, ``neck``, ``head``.

So an RGB model's ``backbone.*`` maps onto ``backbone_rgb.*`` and ``backbone_event.*`` of a dual
model (see ``model.weights.load_weights``); neck and head keys are the same in every model.
The fusion name is ignored by single-modality models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fredfusion.model.backbone import BASE_REPEATS, CSPDarknet
from fredfusion.model.blocks import C3, Conv, scale_depth
from fredfusion.model.fusion import make_fusion
from fredfusion.spec import DEFAULT_INPUT_HW, FUSIONS, INPUT_MULTIPLE, MODALITIES, SIZES, frames_for

NUM_ANCHORS = 3


def _check_choice(what: str, value: str, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _check_anchors(anchors: torch.Tensor) -> torch.Tensor:
    if not isinstance(anchors, torch.Tensor):
        raise TypeError(f"anchors must be a torch.Tensor of shape (3, 3, 2), got {type(anchors).__name__}")
    if tuple(anchors.shape) != (3, NUM_ANCHORS, 2):
        raise ValueError(f"anchors must have shape (3, 3, 2) (level, anchor, wh), got {tuple(anchors.shape)}")
    a = anchors.detach().float()
    if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError("anchors must be finite and positive (width, height in input pixels)")
    return a


class PANNeck(nn.Module):
    """YOLOv5 v6 PAN neck: top-down FPN path then bottom-up path; returns P3, P4, P5 outputs."""

    def __init__(self, channels: tuple[int, int, int], n: int) -> None:
        super().__init__()
        c3, c4, c5 = channels
        self.lateral_p5 = Conv(c5, c4, 1)
        self.top_down_p4 = C3(2 * c4, c4, n, shortcut=False)
        self.lateral_p4 = Conv(c4, c3, 1)
        self.top_down_p3 = C3(2 * c3, c3, n, shortcut=False)
        self.down_p3 = Conv(c3, c3, 3, 2)
        self.bottom_up_p4 = C3(2 * c3, c4, n, shortcut=False)
        self.down_p4 = Conv(c4, c4, 3, 2)
        self.bottom_up_p5 = C3(2 * c4, c5, n, shortcut=False)
        self.upsample = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.out_channels: tuple[int, int, int] = (c3, c4, c5)

    def forward(
        self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3, p4, p5 = feats
        h5 = self.lateral_p5(p5)
        h4 = self.lateral_p4(self.top_down_p4(torch.cat((self.upsample(h5), p4), dim=1)))
        out3 = self.top_down_p3(torch.cat((self.upsample(h4), p3), dim=1))
        out4 = self.bottom_up_p4(torch.cat((self.down_p3(out3), h4), dim=1))
        out5 = self.bottom_up_p5(torch.cat((self.down_p4(out4), h5), dim=1))
        return out3, out4, out5


class DetectHead(nn.Module):
    """One 1x1 Conv2d (with bias) per level to ``3 * (5 + nc)`` raw outputs, reshaped per anchor."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int, strides: tuple[int, ...]) -> None:
        super().__init__()
        self.num_outputs = 5 + num_classes
        self.convs = nn.ModuleList(nn.Conv2d(c, NUM_ANCHORS * self.num_outputs, 1) for c in channels)
        self._init_biases(num_classes, strides)

    @torch.no_grad()
    def _init_biases(self, num_classes: int, strides: tuple[int, ...]) -> None:
        # objectness prior: ~8 objects per 640x640 image; class prior 0.6 / (nc - 0.99)
        for conv, stride in zip(self.convs, strides):
            b = conv.bias.view(NUM_ANCHORS, self.num_outputs)
            b[:, 4] += math.log(8.0 / (640.0 / stride) ** 2)
            b[:, 5:] += math.log(0.6 / (num_classes - 0.99))

    def forward(self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for conv, x in zip(self.convs, feats):
            y = conv(x)
            b, _, h, w = y.shape
            outs.append(y.reshape(b, NUM_ANCHORS, self.num_outputs, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return outs


class FusionYOLO(nn.Module):
    """YOLOv5-style detector on RGB, Event, or both (fused at P3/P4/P5 or at the input)."""

    arch = "yolov5"
    strides: tuple[int, int, int] = (8, 16, 32)
    anchors: torch.Tensor

    def __init__(
        self,
        modality: str = "dual",
        size: str = "s",
        fusion: str = "concat",
        num_classes: int = 1,
        *,
        anchors: torch.Tensor,
    ) -> None:
        super().__init__()
        _check_choice("modality", modality, MODALITIES)
        _check_choice("model size", size, list(SIZES))
        _check_choice("fusion", fusion, FUSIONS)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.modality = modality
        self.size = size
        self.fusion = fusion
        self.inputs = frames_for(modality)
        self.num_classes = num_classes
        self.depth, self.width = SIZES[size]
        self.register_buffer("anchors", _check_anchors(anchors).clone())

        self.dual_backbones = modality == "dual" and fusion != "early"
        if self.dual_backbones:
            self.backbone_rgb = CSPDarknet(3, self.depth, self.width)
            self.backbone_event = CSPDarknet(3, self.depth, self.width)
            c3, c4, c5 = self.backbone_rgb.out_channels
            self.fusion_p3 = make_fusion(fusion, c3)
            self.fusion_p4 = make_fusion(fusion, c4)
            self.fusion_p5 = make_fusion(fusion, c5)
            channels = (c3, c4, c5)
        else:
            in_ch = 6 if modality == "dual" else 3
            self.backbone = CSPDarknet(in_ch, self.depth, self.width)
            channels = self.backbone.out_channels
        self.neck = PANNeck(channels, scale_depth(BASE_REPEATS[0], self.depth))
        self.head = DetectHead(self.neck.out_channels, num_classes, self.strides)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor | None, name: str) -> torch.Tensor:
        if x is None:
            raise ValueError(f"modality {self.modality!r} needs the {name} input, got None")
        if torch.jit.is_tracing():  # shapes are fixed by the example inputs of an export
            return x
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} input must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} input must be a float tensor in [0, 1], got {x.dtype}")
        if x.shape[2] % INPUT_MULTIPLE != 0 or x.shape[3] % INPUT_MULTIPLE != 0:
            raise ValueError(
                f"{name} input height and width must be multiples of {INPUT_MULTIPLE}, "
                f"got {tuple(x.shape[2:])}"
            )
        return x

    def forward(self, rgb: torch.Tensor | None, event: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Raw (not decoded) maps ``(B, 3, H/s, W/s, 5 + nc)`` for strides 8, 16, 32."""
        given = {"rgb": rgb, "event": event}
        x = [self._check_input(given[kind], kind) for kind in self.inputs]
        if len(x) == 1:
            feats = self.backbone(x[0])
        else:
            r, e = x
            if not torch.jit.is_tracing() and r.shape != e.shape:
                raise ValueError(
                    f"rgb and event inputs differ in shape: {tuple(r.shape)} vs {tuple(e.shape)}"
                )
            if self.dual_backbones:
                fr = self.backbone_rgb(r)
                fe = self.backbone_event(e)
                feats = (
                    self.fusion_p3(fr[0], fe[0]),
                    self.fusion_p4(fr[1], fe[1]),
                    self.fusion_p5(fr[2], fe[2]),
                )
            else:
                feats = self.backbone(torch.cat((r, e), dim=1))
        return self.head(self.neck(feats))

    def decode(self, preds: list[torch.Tensor]) -> torch.Tensor:
        """``(B, N, 5 + nc)`` rows ``cx, cy, w, h`` (input pixels), objectness, class probabilities."""
        from fredfusion.model.postprocess import decode

        return decode(preds, self.anchors, self.strides)

    # ------------------------------------------------------------------ helpers
    def backbone_modules(self) -> list[nn.Module]:
        """The backbone(s): what a freeze phase freezes (both backbones for a dual model)."""
        if self.dual_backbones:
            return [self.backbone_rgb, self.backbone_event]
        return [self.backbone]

    def set_anchors(self, anchors: torch.Tensor) -> None:
        """Replace the anchors, shape ``(3, 3, 2)`` (w, h in input pixels; rows for P3, P4, P5)."""
        a = _check_anchors(anchors)
        with torch.no_grad():
            self.anchors.copy_(a.to(device=self.anchors.device, dtype=self.anchors.dtype))


def build_model(
    modality: str = "dual",
    size: str = "s",
    fusion: str = "concat",
    num_classes: int = 1,
    anchors: torch.Tensor | None = None,
) -> FusionYOLO:
    """Build a FusionYOLO; ``anchors`` default to ``fredfusion.model.anchors.default_anchors()``."""
    _check_choice("modality", modality, MODALITIES)
    _check_choice("model size", size, list(SIZES))
    _check_choice("fusion", fusion, FUSIONS)
    if anchors is None:
        from fredfusion.model.anchors import default_anchors

        anchors = default_anchors()
    return FusionYOLO(modality, size, fusion, num_classes, anchors=anchors)


def model_info(model: FusionYOLO, input_hw: tuple[int, int] = DEFAULT_INPUT_HW) -> dict:
    """``{"params": int, "gflops": float}``: parameter count and GFLOPs of one 1-image forward pass.

    FLOPs are 2x the multiply-adds of all Conv2d layers, counted from their output shapes with
    forward hooks during a real pass at ``input_hw`` (height, width; multiples of 32).
    """
    h, w = (int(v) for v in input_hw)
    params = sum(p.numel() for p in model.parameters())
    macs = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        macs += (output.numel() // output.shape[0]) * per_out

    ref = next(model.parameters())
    x = torch.zeros(1, 3, h, w, device=ref.device, dtype=ref.dtype)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x, x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"params": int(params), "gflops": 2.0 * macs / 1e9}


__all__ = [
    "DetectHead",
    "FusionYOLO",
    "PANNeck",
    "build_model",
    "model_info",
]
