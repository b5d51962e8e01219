"""A short training on the synthetic sample must learn: mAP50 >= 0.5 on its val and test splits.

The demo itself (synth -> prepare -> dual YOLO-n with the AdamW of ``optimizer: auto`` -> test eval)
with 6 epochs instead of the demo's 7: ~4 min on 2 cores. Val is one small-drone sequence.
"""

from __future__ import annotations

from pathlib import Path

from fredfusion.commands.demo import run_demo


def test_short_training_reaches_map50(tmp_path: Path) -> None:
    result = run_demo(out=tmp_path, epochs=6, device="cpu")
    train, test = result["train"], result["test"]
    print(f"best val mAP50 {train['best']:.4f} (epoch {train['best_epoch']}), test mAP50 {test['mAP50']:.4f}")
    assert train["best"] is not None and train["best"] >= 0.5, train
    assert test["mAP50"] >= 0.5, test
