"""A short training on the synthetic sample must learn: mAP50 >= 0.5 on its val split.

The demo's training on the demo's sample (val = a small-drone sequence). Marked slow (~9 min on 2 cores)
and deselected by default (pyproject addopts); run it with `python -m pytest -m slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fredfusion.config import load_config
from fredfusion.data.prepare import prepare
from fredfusion.data.synth import write_sample
from fredfusion.engine.trainer import Trainer


@pytest.mark.slow
def test_short_training_reaches_map50(tmp_path: Path) -> None:
    write_sample(tmp_path / "fred", sequences=10, frames=60, seed=0)
    prepare(
        tmp_path / "fred", tmp_path / "prepared", imgsz=320, workers=2, progress=False, log=lambda _m: None
    )
    cfg = load_config(
        overrides={
            "data": str(tmp_path / "prepared"),
            "model": "n",
            "input_shape": [192, 320],
            "freeze_train": False,
            "unfreeze_epoch": 15,
            "unfreeze_batch_size": 16,
            "warmup_epochs": 1,
            "mixup_prob": 0.2,
            "eval_period": 5,
            "num_workers": 0,
            "persistent_workers": False,
            "save_dir": str(tmp_path / "runs"),
            "save_period": 0,
        }
    )
    summary = Trainer(cfg).fit()
    print(f"best val mAP50 {summary['best']:.4f} at epoch {summary['best_epoch']}")
    assert summary["best"] is not None and summary["best"] >= 0.5, summary
