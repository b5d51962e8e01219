"""`fredfusion eval` on a prepared sample: the per-condition table and metrics.json ``conditions``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fredfusion.cli import main
from fredfusion.data.coco import load_coco, write_coco
from fredfusion.data.dataset import PreparedDataset
from fredfusion.engine.checkpoint import save_checkpoint
from fredfusion.eval.coco_metrics import coco_map
from fredfusion.eval.evaluator import restrict_gt
from fredfusion.model import build_model
from fredfusion.model.weights import model_meta


def _eval(weights: Path, data: Path, out: Path) -> None:
    """``fredfusion eval`` of ``weights`` on the train split of ``data`` at 64x128, report in ``out``."""
    argv = ["eval", "--weights", str(weights), "--data", str(data), "--split", "train"]
    argv += ["--input-shape", "64", "128", "--batch", "16", "--out", str(out)]
    assert main(argv) == 0


def test_eval_reports_conditions(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    model = build_model("dual", "n")
    weights = tmp_path / "w.pth"
    save_checkpoint({"meta": model_meta(model), "model": model.state_dict(), "config": {}}, weights)
    _eval(weights, tiny_prepared, tmp_path / "new")
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "new" / "metrics.json").read_text())
    coco = load_coco(tiny_prepared / "annotations" / "instances_train.json")
    images = PreparedDataset(tiny_prepared, "train", pairs="dual").images  # eval scores the true pairs
    names = {c for im in images for c in im["conditions"]}
    assert names and set(saved["conditions"]) == names
    assert "| condition | images | boxes | AP50 | AP50:95 |" in out
    detections = json.loads((tmp_path / "new" / "detections.json").read_text())
    for name, row in saved["conditions"].items():
        ids = {im["id"] for im in images if name in im["conditions"]}
        assert set(row) == {"images", "boxes", "AP50", "mAP50_95"} and row["images"] == len(ids)
        ref = coco_map(restrict_gt(coco, ids), [d for d in detections if d["image_id"] in ids])
        assert row["AP50"] == pytest.approx(ref.ap(0.5)) and row["mAP50_95"] == pytest.approx(ref.ap(None))
        assert any(line.startswith(f"| {name} ") for line in out.splitlines())

    # a folder prepared before conditions were recorded still evaluates, without the table
    old = tmp_path / "old"
    shutil.copytree(tiny_prepared, old)
    for split in ("train", "val", "test"):
        path = old / "annotations" / f"instances_{split}.json"
        stripped = load_coco(path)
        for im in stripped["images"]:
            del im["conditions"]
        write_coco(path, stripped)
    _eval(weights, old, tmp_path / "old_report")
    out = capsys.readouterr().out
    assert "| condition " not in out and "| sequence " in out
    saved_old = json.loads((tmp_path / "old_report" / "metrics.json").read_text())
    assert saved_old["conditions"] == {}
    assert saved_old["metrics"]["mAP50"] == pytest.approx(saved["metrics"]["mAP50"])


def test_default_batch_is_larger_on_a_gpu() -> None:
    import torch

    from fredfusion.commands.eval import CPU_BATCH, GPU_BATCH, default_batch

    assert (CPU_BATCH, GPU_BATCH) == (32, 128)
    assert default_batch(torch.device("cpu"), None) == 32
    assert default_batch(torch.device("cuda"), None) == 128  # only the device type is read
    assert default_batch(torch.device("cuda"), 7) == 7 and default_batch(torch.device("cpu"), 64) == 64
