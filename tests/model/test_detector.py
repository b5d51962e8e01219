"""Tests for the blocks, the CSPDarknet backbone and the FusionYOLO detector."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from fredfusion.model import FusionYOLO, build_model, model_info
from fredfusion.model.backbone import CSPDarknet
from fredfusion.model.blocks import C3, SPPF, Bottleneck, Conv, make_divisible, scale_depth, scale_width
from fredfusion.spec import FUSIONS, MODALITIES, SIZES

# local fallback (YOLOv5 COCO anchors, input pixels) so these tests do not depend on anchors.py
ANCHORS = torch.tensor(
    [
        [[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]],
        [[30.0, 61.0], [62.0, 45.0], [59.0, 119.0]],
        [[116.0, 90.0], [156.0, 198.0], [373.0, 326.0]],
    ]
)


def _model(modality: str = "dual", size: str = "n", fusion: str = "concat", nc: int = 1) -> FusionYOLO:
    return FusionYOLO(modality, size, fusion, nc, anchors=ANCHORS)


def _images(b: int = 2, h: int = 64, w: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine parameters so that copies can be told apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)


def _expected_shapes(b: int, h: int, w: int, nc: int) -> list[tuple[int, ...]]:
    return [(b, 3, h // s, w // s, 5 + nc) for s in (8, 16, 32)]


# ---------------------------------------------------------------- blocks and backbone
def test_scaling_helpers() -> None:
    assert make_divisible(6.4) == 8
    assert make_divisible(16) == 16
    assert make_divisible(100) == 104
    assert [scale_width(c, 0.25) for c in (64, 128, 256, 512, 1024)] == [16, 32, 64, 128, 256]
    assert [scale_width(c, 0.75) for c in (64, 1024)] == [48, 768]
    assert [scale_width(c, 1.25) for c in (64, 1024)] == [80, 1280]
    assert [scale_depth(n, 0.33) for n in (3, 6, 9)] == [1, 2, 3]
    assert [scale_depth(n, 0.67) for n in (3, 6, 9)] == [2, 4, 6]
    assert [scale_depth(n, 1.33) for n in (3, 6, 9)] == [4, 8, 12]
    assert scale_depth(1, 0.1) == 1


def test_blocks_shapes_and_settings() -> None:
    x = torch.rand(2, 8, 12, 16)
    conv = Conv(8, 16, 3, 2)
    assert conv(x).shape == (2, 16, 6, 8)
    assert conv.conv.bias is None
    assert conv.bn.eps == pytest.approx(1e-3)
    assert conv.bn.momentum == pytest.approx(0.03)
    assert isinstance(conv.act, nn.SiLU)
    assert Bottleneck(8, 8).add and not Bottleneck(8, 8, shortcut=False).add and not Bottleneck(8, 16).add
    c3 = C3(8, 24, n=2, shortcut=False)
    assert len(c3.m) == 2 and c3(x).shape == (2, 24, 12, 16)
    assert SPPF(8, 8).eval()(x).shape == (2, 8, 12, 16)


def test_bottleneck_shortcut_adds_input() -> None:
    x = torch.rand(1, 8, 4, 4)
    block = Bottleneck(8, 8).eval()
    with torch.no_grad():
        block.cv2.bn.weight.zero_()
        block.cv2.bn.bias.zero_()  # inner branch outputs silu(0) = 0
    torch.testing.assert_close(block(x), x)


def test_backbone_feature_shapes() -> None:
    net = CSPDarknet(3, *SIZES["n"])
    p3, p4, p5 = net(torch.rand(2, 3, 64, 96))
    assert net.out_channels == (64, 128, 256)
    assert p3.shape == (2, 64, 8, 12)
    assert p4.shape == (2, 128, 4, 6)
    assert p5.shape == (2, 256, 2, 3)
    assert [len(stage[1].m) for stage in (net.stage1, net.stage2, net.stage3, net.stage4)] == [1, 2, 3, 1]


# ---------------------------------------------------------------- sizes and parameter counts
# parameter counts of the YOLOv5 v6.0 models with 80 classes (n, s, m, l, x)
YOLOV5_PARAMS = {"n": 1872157, "s": 7235389, "m": 21190557, "l": 46563709, "x": 86749405}


@pytest.mark.parametrize("size", ["m", "l", "x"])
def test_large_sizes_params_and_forward(size: str) -> None:
    model = _model("rgb", size, nc=80).eval()
    assert sum(p.numel() for p in model.parameters()) == YOLOV5_PARAMS[size]
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == _expected_shapes(1, 32, 32, 80)


@pytest.mark.parametrize("size", ["n", "s"])
def test_small_sizes_params(size: str) -> None:
    assert sum(p.numel() for p in _model("rgb", size, nc=80).parameters()) == YOLOV5_PARAMS[size]


@pytest.mark.parametrize("size", ["n", "s"])
@pytest.mark.parametrize("modality,fusion", [("rgb", "concat"), ("event", "concat"), ("dual", "concat")])
def test_output_shapes_small_sizes(size: str, modality: str, fusion: str) -> None:
    model = _model(modality, size, fusion, nc=2)
    rgb, event = _images()
    outs = model(rgb, event)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == _expected_shapes(2, 64, 96, 2)
    assert all(o.dtype == torch.float32 and o.is_contiguous() for o in outs)


@pytest.mark.parametrize("fusion", ["attention", "early"])
def test_output_shapes_other_fusions(fusion: str) -> None:
    model = _model("dual", "n", fusion)
    outs = model(*_images())
    assert [tuple(o.shape) for o in outs] == _expected_shapes(2, 64, 96, 1)


def test_single_modality_uses_only_its_input() -> None:
    rgb, event = _images(b=1)
    rgb_model = _model("rgb").eval()
    event_model = _model("event").eval()
    with torch.no_grad():
        ref_rgb = rgb_model(rgb, None)
        ref_event = event_model(None, event)
        for a, b in zip(ref_rgb, rgb_model(rgb, event)):
            torch.testing.assert_close(a, b)
        for a, b in zip(ref_event, event_model(rgb, event)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="rgb input"):
        rgb_model(None, event)
    with pytest.raises(ValueError, match="event input"):
        event_model(rgb, None)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_dual_requires_both_inputs(fusion: str) -> None:
    model = _model("dual", "n", fusion)
    rgb, event = _images(b=1)
    with pytest.raises(ValueError, match="'dual' needs the event input"):
        model(rgb, None)
    with pytest.raises(ValueError, match="'dual' needs the rgb input"):
        model(None, event)


def test_bad_inputs_are_rejected() -> None:
    model = _model("dual", "n")
    rgb, event = _images(b=1)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(rgb[..., :48], event[..., :48])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(rgb[:, :1], event)
    with pytest.raises(ValueError, match="float"):
        model((rgb * 255).to(torch.uint8), event)
    with pytest.raises(ValueError, match="differ in shape"):
        model(rgb, torch.cat((event, event)))


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="rgb, event, dual"):
        build_model("thermal", anchors=ANCHORS)
    with pytest.raises(ValueError, match="n, s, m, l, x"):
        build_model("dual", "xl", anchors=ANCHORS)
    with pytest.raises(ValueError, match="concat, attention, early"):
        build_model("dual", "n", "late", anchors=ANCHORS)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("rgb", "n", num_classes=0, anchors=ANCHORS)


def test_build_model_attributes() -> None:
    model = build_model("dual", "n", "attention", num_classes=3, anchors=ANCHORS)
    assert (model.modality, model.size, model.fusion, model.num_classes) == ("dual", "n", "attention", 3)
    assert model.strides == (8, 16, 32)
    assert set(MODALITIES) == {"rgb", "event", "dual"}
    torch.testing.assert_close(model.anchors, ANCHORS)
    assert "anchors" in model.state_dict()
    names = {name for name, _ in model.named_children()}
    assert {"backbone_rgb", "backbone_event", "fusion_p3", "fusion_p4", "fusion_p5", "neck", "head"} <= names
    assert "backbone" in {name for name, _ in _model("rgb").named_children()}
    early = _model("dual", "n", "early")
    assert early.backbone.stem.conv.in_channels == 6


@pytest.mark.skipif(importlib.util.find_spec("fredfusion.model.anchors") is None, reason="anchors.py absent")
def test_build_model_default_anchors() -> None:
    from fredfusion.model.anchors import default_anchors

    model = build_model("rgb", "n")
    torch.testing.assert_close(model.anchors, default_anchors().float())


def test_set_anchors() -> None:
    model = _model("rgb")
    model.set_anchors(ANCHORS * 0.5)
    torch.testing.assert_close(model.anchors, ANCHORS * 0.5)
    with pytest.raises(ValueError, match=r"\(3, 3, 2\)"):
        model.set_anchors(torch.ones(9, 2))
    with pytest.raises(ValueError, match="positive"):
        model.set_anchors(-ANCHORS)
    torch.testing.assert_close(model.anchors, ANCHORS * 0.5)


def test_head_bias_initialisation() -> None:
    nc = 3
    model = _model("rgb", "n", nc=nc)
    for conv, stride in zip(model.head.convs, model.strides):
        bias = conv.bias.detach().view(3, 5 + nc)
        bound = 1.0 / math.sqrt(conv.in_channels)  # default Conv2d bias init is U(-bound, bound)
        obj_prior = math.log(8.0 / (640.0 / stride) ** 2)
        cls_prior = math.log(0.6 / (nc - 0.99))
        assert bool(((bias[:, 4] - obj_prior).abs() <= bound).all())
        assert bool(((bias[:, 5:] - cls_prior).abs() <= bound).all())
        assert bool((bias[:, :4].abs() <= bound).all())


# ---------------------------------------------------------------- dual structure
def test_dual_params_are_two_backbones() -> None:
    rgb = _model("rgb", "s")
    dual = _model("dual", "s")

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # concat fusion at P3/P4/P5 (C = 128, 256, 512): 1x1 conv 2C -> C plus BN weight and bias
    fusion_params = sum(2 * c * c + 2 * c for c in (128, 256, 512))
    assert fusion_params == 689920
    assert count(dual) == count(rgb) + count(rgb.backbone) + fusion_params
    assert 1.6 < count(dual) / count(rgb) < 1.8
    assert count(dual.backbone_rgb) == count(dual.backbone_event) == count(rgb.backbone)


def test_backbone_modules() -> None:
    dual = _model("dual")
    assert [id(m) for m in dual.backbone_modules()] == [id(dual.backbone_rgb), id(dual.backbone_event)]
    rgb = _model("rgb")
    assert [id(m) for m in rgb.backbone_modules()] == [id(rgb.backbone)]
    early = _model("dual", "n", "early")
    assert [id(m) for m in early.backbone_modules()] == [id(early.backbone)]


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_gradients_reach_both_backbones(fusion: str) -> None:
    model = _model("dual", "n", fusion).train()
    sum(o.square().mean() for o in model(*_images(h=64, w=64))).backward()
    for backbone in (model.backbone_rgb, model.backbone_event):
        assert all(p.grad is not None for p in backbone.parameters())
        assert float(backbone.stem.conv.weight.grad.abs().sum()) > 0
        assert float(backbone.sppf.cv2.conv.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------- weight loading
def _load(dst: torch.nn.Module, state: dict, tmp_path) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Save ``state`` as a file and load it the way --weights does: (tensors loaded, tensors of dst)."""
    from fredfusion.model.weights import load_weights, read_weights

    path = tmp_path / "weights.pth"
    torch.save(dict(state), path)
    report = load_weights(dst, read_weights(path))
    return len(report.loaded), report.total


def test_load_rgb_weights_into_dual(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = _model("rgb", "n", nc=1)
    _randomize(src, seed=1)
    dst = _model("dual", "n", "concat", nc=1)
    src_sd = src.state_dict()
    loaded, total = _load(dst, src_sd, tmp_path)
    dst_sd = dst.state_dict()
    assert total == len(dst_sd)
    # everything but the three concat fusion blocks (conv weight + 5 BN tensors each)
    assert loaded == total - 3 * 6
    backbone_keys = [k for k in src_sd if k.startswith("backbone.")]
    assert len(backbone_keys) > 0
    for key in backbone_keys:
        suffix = key[len("backbone.") :]
        assert torch.equal(dst_sd["backbone_rgb." + suffix], src_sd[key])
        assert torch.equal(dst_sd["backbone_event." + suffix], src_sd[key])
    for key in src_sd:
        if key.startswith(("neck.", "head.")):
            assert torch.equal(dst_sd[key], src_sd[key])
    # the two branches are separate tensors, not shared storage
    assert dst.backbone_rgb.stem.conv.weight.data_ptr() != dst.backbone_event.stem.conv.weight.data_ptr()


def test_load_rgb_weights_skips_shape_mismatch_and_strips_prefixes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = _model("rgb", "n", nc=1)
    _randomize(src, seed=2)
    dst = _model("dual", "n", "attention", nc=4)
    head_before = dst.head.convs[0].weight.detach().clone()
    wrapped = {"module._orig_mod." + k: v for k, v in src.state_dict().items()}
    loaded, total = _load(dst, wrapped, tmp_path)
    fusion_tensors = sum(len(getattr(dst, f"fusion_p{i}").state_dict()) for i in (3, 4, 5))
    # head weights and biases (3 levels) have other shapes with 4 classes; the anchors go with the head
    assert loaded == total - fusion_tensors - 6 - 1
    assert torch.equal(dst.head.convs[0].weight, head_before)
    assert torch.equal(
        dst.backbone_event.stage3[1].cv1.bn.running_var, src.backbone.stage3[1].cv1.bn.running_var
    )


def test_load_rgb_weights_into_early_fusion_is_equivalent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = _model("rgb", "n").eval()
    _randomize(src, seed=3)
    dst = _model("dual", "n", "early").eval()
    loaded, total = _load(dst, src.state_dict(), tmp_path)
    assert loaded == total == len(src.state_dict())
    w = src.backbone.stem.conv.weight
    torch.testing.assert_close(dst.backbone.stem.conv.weight, torch.cat((w, w), dim=1) * 0.5)
    rgb, _ = _images(b=1)
    with torch.no_grad():
        for a, b in zip(src(rgb, None), dst(rgb, rgb)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_load_dual_weights_into_dual_and_rgb(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = _model("dual", "n", "concat")
    _randomize(src, seed=4)
    dual = _model("dual", "n", "concat")
    assert _load(dual, src.state_dict(), tmp_path) == (len(src.state_dict()), len(src.state_dict()))
    for a, b in zip(dual.state_dict().values(), src.state_dict().values()):
        assert torch.equal(a, b)
    rgb = _model("rgb", "n")
    loaded, total = _load(rgb, src.state_dict(), tmp_path)
    assert loaded == total
    assert torch.equal(
        rgb.backbone.stage2[1].cv3.bn.running_mean, src.backbone_rgb.stage2[1].cv3.bn.running_mean
    )


# ---------------------------------------------------------------- model_info
def test_model_info_gflops() -> None:
    small = {s: model_info(_model("rgb", s, nc=80), (64, 64)) for s in ("n", "s", "m")}
    assert small["n"]["params"] == YOLOV5_PARAMS["n"]
    assert 0 < small["n"]["gflops"] < small["s"]["gflops"] < small["m"]["gflops"]
    # convolution FLOPs scale exactly with the pixel count; 640x640 gives the published 4.5 / 16.5 GFLOPs
    assert 100 * small["n"]["gflops"] == pytest.approx(4.5, abs=0.1)
    assert 100 * small["s"]["gflops"] == pytest.approx(16.5, abs=0.15)
    model = _model("rgb", "n", nc=80).train()
    assert model_info(model, (128, 128))["gflops"] == pytest.approx(4 * small["n"]["gflops"], rel=1e-9)
    assert model.training
    dual = model_info(_model("dual", "n"), (64, 64))
    assert dual["gflops"] > model_info(_model("rgb", "n"), (64, 64))["gflops"]


# ---------------------------------------------------------------- runtime features
def test_channels_last_and_autocast() -> None:
    model = _model("dual", "n", "attention").eval()
    rgb, event = _images(b=1)
    with torch.no_grad():
        ref = model(rgb, event)
        model_cl = model.to(memory_format=torch.channels_last)
        outs = model_cl(
            rgb.to(memory_format=torch.channels_last), event.to(memory_format=torch.channels_last)
        )
        for a, b in zip(ref, outs):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model_cl(rgb, event)
    assert [o.dtype for o in half] == [torch.bfloat16] * 3
    assert [tuple(o.shape) for o in half] == _expected_shapes(1, 64, 96, 1)


def test_onnx_export_two_inputs(tmp_path) -> None:
    pytest.importorskip("onnx")
    model = _model("dual", "n", "attention").eval()
    rgb, event = _images(b=1, h=64, w=64)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (rgb, event),
        str(path),
        input_names=["rgb", "event"],
        output_names=["p3", "p4", "p5"],
        opset_version=17,
        dynamo=False,
    )
    assert path.stat().st_size > 1_000_000
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"rgb": rgb.numpy(), "event": event.numpy()})
    with torch.no_grad():
        ref = model(rgb, event)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-4, rtol=1e-4)
