"""The anchor-free family through the workflow: train, checkpoint, resume check, eval, predict, export."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fredfusion.cli import main
from fredfusion.config import load_config
from fredfusion.engine.trainer import Trainer
from fredfusion.model.weights import load_checkpoint, load_model
from fredfusion.model.yolov8 import FusionYOLOv8
from shared import TINY_TRAIN

TINY = {**TINY_TRAIN, "arch": "yolov8", "unfreeze_epoch": 1}


@pytest.fixture(scope="module")
def v8_run(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a dual YOLOv8-n run on the tiny sample; its run folder."""
    save_dir = tmp_path_factory.mktemp("v8")
    cfg = load_config(overrides={**TINY, "data": str(tiny_prepared), "save_dir": str(save_dir)})
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.run_dir


def test_training_writes_yolov8_checkpoints_and_loss_parts(v8_run: Path) -> None:
    payload = load_checkpoint(v8_run / "last.pth")
    assert payload["meta"]["arch"] == "yolov8" and "anchors" not in payload["meta"]
    model, _ = load_model(v8_run / "best.pth")
    assert isinstance(model, FusionYOLOv8) and model.modality == "dual"
    rows = list(csv.DictReader((v8_run / "results.csv").open()))
    assert float(rows[0]["obj_loss"]) == 0.0  # no objectness term in this family
    assert (
        float(rows[0]["dfl_loss"]) > 0 and float(rows[0]["box_loss"]) > 0 and float(rows[0]["cls_loss"]) > 0
    )
    assert rows[0]["mAP50"] != ""


def test_resume_refuses_another_family(v8_run: Path, tiny_prepared: Path) -> None:
    cfg = load_config(
        overrides={**TINY, "arch": "yolov5", "data": str(tiny_prepared), "save_dir": str(v8_run.parent),
                   "name": v8_run.name, "resume": True, "exist_ok": True, "unfreeze_epoch": 2}
    )  # fmt: skip
    with pytest.raises(SystemExit, match="holds a arch=yolov8 model, this run asks for arch=yolov5"):
        Trainer(cfg).fit()


def test_eval_predict_and_export_take_a_yolov8_checkpoint(
    v8_run: Path, tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = str(v8_run / "best.pth")
    assert (
        main(["eval", "--weights", weights, "--data", str(tiny_prepared), "--out", str(tmp_path / "e")]) == 0
    )
    assert "dual YOLO-n" in capsys.readouterr().out
    frame = next((tiny_prepared.parent / "fred").glob("*/RGB/*.jpg"))
    seq = frame.parent.parent
    assert main(["predict", "--weights", weights, "--source", str(seq), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "detections.csv").is_file()
    pytest.importorskip("onnxruntime")
    out = tmp_path / "v8.onnx"
    assert main(["export", "--weights", weights, "--out", str(out)]) == 0
    assert "(ok)" in capsys.readouterr().out and out.is_file()


def test_decoded_rows_match_between_families_layout() -> None:
    """Both families decode to (B, N, 5 + nc) rows that the one NMS takes."""
    from fredfusion.model import build_model
    from fredfusion.model.postprocess import non_max_suppression

    x = torch.rand(1, 3, 64, 96)
    for arch in ("yolov5", "yolov8"):
        model = build_model("rgb", "n", arch=arch).eval()
        with torch.no_grad():
            rows = model.decode(model(x, None))
        assert rows.shape[-1] == 6 and len(non_max_suppression(rows, 0.0, 0.45)) == 1
