"""The weights a training run starts from: asked-for files, the old tool's fallback order, its formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fredfusion.config import load_config
from fredfusion.engine.model_setup import build_run_model
from fredfusion.model.convert import layout_of
from fredfusion.model.detector import build_model
from fredfusion.model.weights import CheckpointError

KEY_LIST = Path(__file__).resolve().parents[2].parent / "shared" / "old_tool_checkpoint_keys.json"


def _build(tmp_path: Path, **overrides) -> tuple[torch.nn.Module, object, list[str]]:
    cfg = load_config(overrides={"model": "n", "input_shape": [64, 128], "data": str(tmp_path), **overrides})
    lines: list[str] = []
    model, start = build_run_model(cfg, None, lines.append)
    return model, start, lines


def test_a_missing_or_unreadable_weights_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth: checkpoint not found"):
        _build(tmp_path, weights=str(tmp_path / "nope.pth"))
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"broken\.pth: "):
        _build(tmp_path, weights=str(tmp_path / "broken.pth"))


def test_a_dual_run_without_weights_follows_the_old_tools_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _model, start, lines = _build(tmp_path)
    assert start == ("random init (no weights)", False)
    assert (
        "weights: none given; neither logs/fred_rgb/fred_rgb_best.pth nor model_data/yolov5n.pth found: "
        "random init" in lines
    )

    rgb = build_model("rgb", "n").state_dict()
    (tmp_path / "model_data").mkdir()
    torch.save(rgb, tmp_path / "model_data" / "yolov5n.pth")
    model, start, lines = _build(tmp_path)
    assert start.backbones and start.summary.endswith("from model_data/yolov5n.pth")
    assert any(line.startswith("weights: none given; starting from model_data/yolov5n.pth") for line in lines)
    torch.testing.assert_close(
        model.backbone_event.stage2[1].cv1.conv.weight, rgb["backbone.stage2.1.cv1.conv.weight"]
    )

    (tmp_path / "logs" / "fred_rgb").mkdir(parents=True)
    torch.save({"model": rgb}, tmp_path / "logs" / "fred_rgb" / "fred_rgb_best.pth")
    _model, start, lines = _build(tmp_path)
    assert start.summary.endswith("from logs/fred_rgb/fred_rgb_best.pth")
    assert any(
        line.startswith("weights: none given; starting from logs/fred_rgb/fred_rgb_best.pth")
        for line in lines
    )

    _model, start, lines = _build(tmp_path, modality="rgb")  # the fallback is the dual workflow's
    assert start == ("random init (no weights)", False) and "weights: none given: random init" in lines


def test_the_old_tools_coco_file_starts_a_v5_layout_model_with_a_new_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not KEY_LIST.is_file():
        pytest.skip(f"{KEY_LIST} not found (the shared key list of the old tool's checkpoints)")
    shapes = json.loads(KEY_LIST.read_text())["models"]["YoloBody_s"]
    g = torch.Generator().manual_seed(0)
    coco = {}
    for key, shape in shapes.items():
        if key.startswith("yolo_head_"):
            shape = [3 * (5 + 80), *shape[1:]]
        coco[key] = torch.randn(shape, generator=g) if shape else torch.tensor(7)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model_data").mkdir()
    torch.save(coco, tmp_path / "model_data" / "yolov5s.pth")
    model, start, lines = _build(tmp_path, model="s")
    assert layout_of(model) == "v5" and start.backbones
    assert any(re.match(r"model: dual YOLO-s .*YOLOv5 v5\.0 backbone layout", line) for line in lines), lines
    summary = next(line for line in lines if line.startswith("weights: loaded"))
    assert "model_data/yolov5s.pth (the old tool's YoloBody, its backbone in both backbones)" in summary
    assert any("80 classes, the model 1: re-initialised" in line for line in lines), lines
    assert any(
        line.startswith("weights: skipped 18 tensors (fusion_p3, fusion_p4, fusion_p5)") for line in lines
    )
    assert model.head.convs[0].weight.shape[0] == 18
    torch.testing.assert_close(
        model.backbone_rgb.stage4[2].cv3.conv.weight, coco["backbone.dark5.2.cv3.conv.weight"]
    )
