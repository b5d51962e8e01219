"""The seed tool's second training script, an alias of train_fred_fusion.py: one trainer serves both, so
every flag and behaviour is the same (python train_fred_fusion_optimized.py --modality dual ...)."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().with_name("train_fred_fusion.py")), run_name="__main__")
