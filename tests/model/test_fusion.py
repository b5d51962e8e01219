"""Tests for the fusion blocks (concat, attention) and make_fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fredfusion.model.fusion import AttentionFusion, ConcatFusion, make_fusion


def _inputs(b: int = 2, c: int = 8, h: int = 4, w: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)


def _proj_reference(conv_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # eval-mode BatchNorm with fresh statistics (mean 0, var 1, weight 1, bias 0, eps 1e-3), then SiLU
    y = torch.einsum("oc,bchw->bohw", conv_weight[:, :, 0, 0], x) / (1.0 + 1e-3) ** 0.5
    return F.silu(y)


def test_concat_fusion_matches_hand_computation() -> None:
    rgb, event = _inputs()
    block = ConcatFusion(8).eval()
    assert block.proj.conv.weight.shape == (8, 16, 1, 1)
    out = block(rgb, event)
    expected = _proj_reference(block.proj.conv.weight.detach(), torch.cat((rgb, event), dim=1))
    assert out.shape == rgb.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_concat_fusion_param_count() -> None:
    # 1x1 conv 2C -> C without bias, plus BN weight and bias
    c = 16
    assert sum(p.numel() for p in ConcatFusion(c).parameters()) == 2 * c * c + 2 * c


def test_attention_fusion_shape_and_gate_range() -> None:
    rgb, event = _inputs(b=3, c=16, h=5, w=7)
    block = AttentionFusion(16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.05)
    with torch.no_grad():
        out = block(rgb, event)
        gate = block.gate(rgb, event)
    assert out.shape == (3, 16, 5, 7)
    assert gate.shape == (3, 16, 5, 7)
    assert bool(((gate > 0) & (gate < 1)).all())
    # the gate varies over channels and positions once the gate weights are non-zero
    assert float(gate.std()) > 1e-3


def test_attention_fusion_starts_as_average() -> None:
    rgb, event = _inputs()
    block = AttentionFusion(8).eval()
    torch.testing.assert_close(block.gate(rgb, event), torch.full_like(rgb, 0.5))
    expected = _proj_reference(block.proj.conv.weight.detach(), 0.5 * (rgb + event))
    torch.testing.assert_close(block(rgb, event), expected, atol=1e-5, rtol=1e-5)


def test_attention_fusion_gate_selects_branch() -> None:
    rgb, event = _inputs()
    block = AttentionFusion(8).eval()
    w = block.proj.conv.weight.detach()
    with torch.no_grad():
        block.spatial_gate.bias.fill_(30.0)  # gate -> 1: RGB only
    torch.testing.assert_close(block(rgb, event), _proj_reference(w, rgb), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        block.spatial_gate.bias.fill_(-30.0)  # gate -> 0: Event only
    torch.testing.assert_close(block(rgb, event), _proj_reference(w, event), atol=1e-5, rtol=1e-5)


def test_attention_fusion_gradients_reach_gates_and_inputs() -> None:
    rgb, event = _inputs()
    rgb.requires_grad_(True)
    event.requires_grad_(True)
    block = AttentionFusion(8)
    block(rgb, event).square().sum().backward()
    assert rgb.grad is not None and float(rgb.grad.abs().sum()) > 0
    assert event.grad is not None and float(event.grad.abs().sum()) > 0
    assert block.spatial_gate.weight.grad is not None
    assert float(block.spatial_gate.weight.grad.abs().sum()) > 0
    assert float(block.channel_gate[-1].weight.grad.abs().sum()) > 0


def test_attention_fusion_is_cheap() -> None:
    c = 256
    concat = sum(p.numel() for p in ConcatFusion(c).parameters())
    attention = sum(p.numel() for p in AttentionFusion(c).parameters())
    assert attention < concat


def test_make_fusion() -> None:
    assert isinstance(make_fusion("concat", 8), ConcatFusion)
    assert isinstance(make_fusion("attention", 8), AttentionFusion)
    with pytest.raises(ValueError, match=r"concat, attention"):
        make_fusion("sum", 8)
    with pytest.raises(ValueError, match=r"'early'"):
        make_fusion("early", 8)


def test_every_fusion_of_the_spec_builds_a_dual_model() -> None:
    """spec.FUSIONS is the one list: each name builds a dual model whose forward runs (early fusion
    is one 6-channel backbone; the others a block from make_fusion at every scale)."""
    from fredfusion.model.detector import build_model
    from fredfusion.spec import FUSIONS

    x = torch.rand(1, 3, 64, 64)
    for fusion in FUSIONS:
        model = build_model("dual", "n", fusion).eval()
        assert model.fusion == fusion
        with torch.no_grad():
            assert [tuple(p.shape[2:4]) for p in model(x, x)] == [(8, 8), (4, 4), (2, 2)]
        if fusion != "early":
            assert type(model.fusion_p3) is type(make_fusion(fusion, 8))
