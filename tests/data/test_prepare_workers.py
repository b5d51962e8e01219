"""Prepare with worker processes in a process that already ran synth and imported torch (the demo's path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch
from pathlib import Path
from fredfusion.data.synth import write_sample
from fredfusion.data.prepare import prepare
root = Path(sys.argv[1])
torch.zeros(64, 64) @ torch.zeros(64, 64)
write_sample(root / "fred", sequences=3, frames=8, width=320, height=180, seed=2)
summary = prepare(root / "fred", root / "prepared", imgsz=128, workers=2, progress=False, log=lambda m: None)
print("images", sum(1 for _ in (root / "prepared" / "store").glob("seq_*.rgb.json")))
"""


def test_prepare_with_workers_after_synth_does_not_hang(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "images 3" in proc.stdout
