"""Seed-compatible entry point: python train_fred_fusion.py --modality dual|rgb|event [--no_eval_map]
[--quick_test] [--resume] [--freeze_training] [any `fredfusion train` flag]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from fredfusion.seed_compat import main

if __name__ == "__main__":
    raise SystemExit(main())
