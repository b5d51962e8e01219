"""A short training on the synthetic sample must learn: mAP50 >= 0.5 on its val and test splits.

The demo itself (synth -> prepare -> dual YOLO-n with the AdamW of ``optimizer: auto`` -> test eval),
its 7 epochs: ~2.5 min on 2 cores. Val is one small-drone sequence. Six epochs sit on the edge of
learning: val mAP50 spreads 0.07 to 0.92 over three training seeds (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from pathlib import Path

from fredfusion.commands.demo import run_demo


def test_short_training_reaches_map50(tmp_path: Path) -> None:
    result = run_demo(out=tmp_path, device="cpu")
    train, test = result["train"], result["test"]
    print(f"best val mAP50 {train['best']:.4f} (epoch {train['best_epoch']}), test mAP50 {test['mAP50']:.4f}")
    assert train["best"] is not None and train["best"] >= 0.5, train
    assert test["mAP50"] >= 0.5, test
