"""The weights a training run starts from: asked-for files, the old tool's fallback order, its formats."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from fredfusion.config import load_config
from fredfusion.engine.model_setup import build_run_model
from fredfusion.model.convert import layout_of
from fredfusion.model.detector import build_model
from fredfusion.model.weights import CheckpointError, model_meta

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


def _single(tmp_path: Path, modality: str, seed: int, **kwargs: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """A fredfusion checkpoint of a random single-modality (or dual) model: its file and weights."""
    from fredfusion.model.build import build_model as build_any

    torch.manual_seed(seed)
    model = build_any(modality, kwargs.pop("size", "n"), **kwargs)
    path = tmp_path / f"{modality}_{seed}.pth"
    torch.save({"model": model.state_dict(), "meta": model_meta(model)}, path)
    return path, model.state_dict()


def test_weights_rgb_and_event_fill_each_backbone_with_its_own_file(tmp_path: Path) -> None:
    rgb_path, rgb = _single(tmp_path, "rgb", 1)
    event_path, event = _single(tmp_path, "event", 2)
    model, start, lines = _build(tmp_path, weights_rgb=str(rgb_path), weights_event=str(event_path))
    state = model.state_dict()
    for branch, source in (("backbone_rgb.", rgb), ("backbone_event.", event)):
        names = [n for n in state if n.startswith(branch)]
        assert names and all(torch.equal(state[n], source["backbone." + n[len(branch) :]]) for n in names)
    assert not torch.equal(state["neck.lateral_p5.conv.weight"], rgb["neck.lateral_p5.conv.weight"])
    assert start.backbones  # both backbones trained: the freeze phase runs
    assert "weights: none given for the whole model: neck, head and fusion start at random" in lines
    assert re.search(rf"^weights_rgb: loaded (\d+)/\1 backbone_rgb tensors from {re.escape(str(rgb_path))} "
                     r"\(a fredfusion checkpoint, rgb YOLO-n yolov5; its neck and head not used\)$",
                     lines[-2])  # fmt: skip
    assert lines[-1].startswith("weights_event: loaded ") and str(event_path) in lines[-1]

    _model, start, _lines = _build(tmp_path, weights_event=str(event_path))
    assert not start.backbones  # the RGB backbone is random: no freeze phase unless freeze_untrained

    dual_path, _ = _single(tmp_path, "dual", 3)  # --weights first, then the event backbone over it
    model, start, _lines = _build(tmp_path, weights=str(dual_path), weights_event=str(event_path))
    assert start.backbones and torch.equal(
        model.state_dict()["backbone_event.stem.conv.weight"], event["backbone.stem.conv.weight"]
    )


def test_weights_of_another_modality_family_or_size_are_refused(tmp_path: Path) -> None:
    rgb_path, _ = _single(tmp_path, "rgb", 1)
    cases = [
        ({"weights_event": str(rgb_path)}, "an rgb model's checkpoint, not an event one"),
        ({"weights_rgb": str(_single(tmp_path, "dual", 2)[0])}, "a dual model's checkpoint"),
        ({"weights_rgb": str(_single(tmp_path, "rgb", 3, arch="yolov8")[0])}, "a yolov8 checkpoint"),
        ({"weights_rgb": str(_single(tmp_path, "rgb", 4, size="s")[0])}, "a YOLO-s checkpoint"),
        ({"weights_rgb": str(tmp_path / "nope.pth")}, "checkpoint not found"),
    ]
    for overrides, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(message)) as info:
            _build(tmp_path, **overrides)
        assert str(info.value).startswith(str(tmp_path)) and "\n" not in str(info.value)
    plain = {k: v for k, v in _single(tmp_path, "rgb", 5)[1].items() if not k.startswith("backbone.sppf")}
    torch.save(plain, tmp_path / "cut.pth")  # a state dict that does not say what it is, and lacks tensors
    with pytest.raises(CheckpointError, match=r"cut\.pth: its backbone does not fit backbone_rgb: \d+ of"):
        _build(tmp_path, weights_rgb=str(tmp_path / "cut.pth"))


def test_branch_weights_mistakes_are_one_line_and_exit_2(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fredfusion.cli import main

    event_path, _ = _single(tmp_path, "event", 1)
    base = ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), "--model", "n"]
    cases = [
        (["--weights_rgb", str(tmp_path / "nope.pth")], "nope.pth: checkpoint not found"),
        (["--weights_rgb", str(event_path)], "not an rgb one"),
        (["--modality", "rgb", "--weights_event", str(event_path)], "weights_event: initialise one backbone"),
        (["--fusion", "early", "--weights_event", str(event_path)], "fusion concat or attention"),
        (["--modality", "event", "--modality_dropout", "0.2"], "modality_dropout: blanks one modality"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not list(tmp_path.rglob("*/last.pth"))
