"""The seed workflow: python train_fred_fusion.py --modality ... prepares $FRED_ROOT and trains into logs/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fredfusion.data.synth import write_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train_fred_fusion.py", "train_fred_fusion_optimized.py"])
def test_seed_script_prepares_and_quick_tests(script: str, tmp_path: Path) -> None:
    write_sample(tmp_path / "fred", sequences=4, frames=8, width=320, height=180, seed=3)
    env = {**os.environ, "FRED_ROOT": str(tmp_path / "fred"), "OMP_NUM_THREADS": "2"}
    cmd = [
        sys.executable,
        str(REPO / script),
        "--modality",
        "rgb",
        "--quick_test",
        "--phi",
        "n",
        "--input_shape",
        "64",
        "128",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--quick_test_batches",
        "2",
        "--precise_bn",
        "8",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is not prepared yet" in proc.stdout
    assert (tmp_path / "datasets" / "fred_coco" / "annotations" / "instances_train.json").is_file()
    assert (tmp_path / "logs" / "fred_rgb" / "fred_rgb_best.pth").is_file()
    assert "quick test check list" in proc.stdout

    # a second run finds the prepared folder and resumes the run it left
    cmd += ["--resume", "--epochs", "2"]
    cmd.remove("--quick_test")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is not prepared yet" not in proc.stdout
    assert "resume:" in proc.stdout and "continuing at epoch 2" in proc.stdout
