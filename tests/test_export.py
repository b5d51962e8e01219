"""`fredfusion export`: ONNX graph with decoding, parity with PyTorch, dynamic batch, errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fredfusion.export as export_mod
from fredfusion.commands.export import add_parser
from fredfusion.engine.checkpoint import save_checkpoint
from fredfusion.export import ExportError, Parity, compare_outputs, export_onnx, input_names_for, verify_onnx
from fredfusion.model import build_model
from fredfusion.model.weights import load_model, model_meta

H, W = 64, 128
ROWS_64x128 = 3 * (8 * 16 + 4 * 8 + 2 * 4)  # 3 anchors x cells at strides 8, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(path: Path, modality: str) -> Path:
    torch.manual_seed(0)
    m = build_model(modality, "n")
    save_checkpoint({"meta": model_meta(m), "model": m.state_dict(), "config": {"input_shape": [H, W]}}, path)
    return path


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_input_names() -> None:
    assert input_names_for("dual") == ["rgb", "event"]
    assert input_names_for("rgb") == ["rgb"]
    assert input_names_for("event") == ["event"]
    with pytest.raises(ValueError, match="modality"):
        input_names_for("thermal")


def test_dual_dynamic_export_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    weights = _checkpoint(tmp_path / "dual.pth", "dual")
    out = tmp_path / "onnx" / "dual.onnx"
    assert _run_cli(["export", "--weights", str(weights), "--dynamic", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and "batch 2" in printed

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["rgb", "event"]
    assert [o.name for o in session.get_outputs()] == ["predictions"]
    assert session.get_inputs()[0].shape == ["batch", 3, H, W]
    assert session.get_outputs()[0].shape == ["batch", ROWS_64x128, 6]

    model, _ = load_model(weights)
    gen = torch.Generator().manual_seed(3)
    rgb, event = torch.rand((3, 3, H, W), generator=gen), torch.rand((3, 3, H, W), generator=gen)
    (got,) = session.run(None, {"rgb": rgb.numpy(), "event": event.numpy()})
    from fredfusion.model.postprocess import decode

    with torch.no_grad():
        ref = decode(model(rgb, event), model.anchors, model.strides).numpy()
    assert got.shape == (3, ROWS_64x128, 6)
    assert abs(got - ref).max() < 1e-3
    assert verify_onnx(out, model, (H, W), batch=3).ok
    assert sorted(p.name for p in out.parent.iterdir()) == ["dual.onnx"]  # no temp file left


def test_rgb_static_export_with_input_shape(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    weights = _checkpoint(tmp_path / "rgb.pth", "rgb")
    res = export_onnx(weights, input_hw=(32, 96), log=lambda _m: None)
    assert res["path"] == tmp_path / "rgb.onnx" and res["path"].is_file()
    assert res["inputs"] == ["rgb"] and res["input_hw"] == (32, 96)
    assert res["output_shape"] == (1, 3 * (4 * 12 + 2 * 6 + 1 * 3), 6)
    assert res["check_batch"] == 1 and res["parity"].ok and res["parity"].box_abs < 1e-2
    session = ort.InferenceSession(str(res["path"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("rgb", [1, 3, 32, 96])]


def test_parity_is_relative_for_boxes_and_absolute_for_scores() -> None:
    ref = np.zeros((1, 3, 6), np.float32)
    ref[0, :, :4] = [[67.0, 40.0, 12.0, 9.0], [600.0, 300.0, 80.0, 60.0], [0.5, 0.2, 0.1, 0.3]]
    ref[0, :, 4:] = 0.5
    got = ref.copy()
    got[0, 0, 0] += 0.031  # the 2-epoch model of issue 16: 5e-4 of a 67 px coordinate
    got[0, 1, :4] *= 1 + 5e-4  # 5e-4 of each coordinate, 0.3 px of 600 px
    got[0, 2, :4] += 0.02  # sub-pixel coordinates: within the 0.05 px floor
    got[0, :, 4:] += 5e-4
    parity = compare_outputs(got, ref)
    assert parity.ok and parity.box_abs == pytest.approx(0.3, rel=1e-4)
    assert 0.031 > 1e-3  # what an absolute 1e-3 limit on every column refused

    far = ref.copy()
    far[0, 0, 2] += 0.2  # 1.7% of a 12 px width
    assert not compare_outputs(far, ref).ok
    score = ref.copy()
    score[0, 1, 4] += 2e-3  # scores stay absolute: 0.002 of a probability fails
    assert not compare_outputs(score, ref).ok
    nan = ref.copy()
    nan[0, 0, 5] = np.nan
    assert not compare_outputs(nan, ref).ok


def test_a_failed_check_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    weights = _checkpoint(tmp_path / "event.pth", "event")
    out = tmp_path / "onnx" / "e.onnx"
    out.parent.mkdir()
    seen = []

    def unfaithful(path: Path, *args, **kwargs) -> Parity:
        import onnx

        seen.append([i.name for i in onnx.load(str(path)).graph.input])  # the graph was written...
        return Parity(box_abs=3.0, box_used=40.0, score_abs=0.0)

    monkeypatch.setattr(export_mod, "verify_onnx", unfaithful)
    with pytest.raises(ExportError, match=r"e\.onnx: onnxruntime output differs from PyTorch .*3 px") as err:
        export_onnx(weights, out, log=lambda _m: None)
    assert isinstance(err.value, ValueError)  # the CLI reports ValueErrors and exits 2
    assert seen == [["event"]]
    assert list(out.parent.iterdir()) == []  # ...and removed: nothing is left


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        _run_cli(["export", "--weights", str(tmp_path / "missing.pth")])


def test_not_a_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match=r"bad\.pth"):
        export_onnx(bad, log=lambda _m: None)


def test_bad_input_shape(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    weights = _checkpoint(tmp_path / "rgb.pth", "rgb")
    with pytest.raises(ExportError, match="multiples of 32"):
        export_onnx(weights, input_hw=(50, 64), log=lambda _m: None)


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_missing_dependency_names_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    weights = _checkpoint(tmp_path / "rgb.pth", "rgb")
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(ExportError, match=rf"'{module}'.*\.\[export\]"):
        export_onnx(weights, log=lambda _m: None)
