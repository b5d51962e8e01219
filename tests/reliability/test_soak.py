"""Soak test in CI size: back-to-back train/resume cycles plus `fredfusion eval` in one process.

In-process on purpose: what one run leaves behind (models, optimizer state, memmaps, loader
workers, TensorBoard writers, figures) accumulates only within one process; cycles in fresh
subprocesses would each start from a clean heap and hide a leak.

Bound: resident memory may grow at most ``GROWTH_BOUND_MIB`` from the end of the first cycle to
the end of the last. The first cycle is the baseline because it pays one-time costs (lazy
imports of evaluation, metrics and TensorBoard code, allocator arenas). One leaked training state
per cycle (YOLO-n dual: 2.98 M parameters, i.e. 12 MB each for weights, gradients, momentum and
EMA, ~48 MB) would add ~95 MiB over the two later cycles, several times what the bound allows.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

from fredfusion.cli import main
from fredfusion.model.weights import load_checkpoint

CYCLES = 3
GROWTH_BOUND_MIB = 40.0


def rss_mib() -> float:
    """Resident set size of this process in MiB (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


@pytest.mark.reliability
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_train_resume_eval_cycles_do_not_grow_memory(
    small_sample: Any, tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture
) -> None:
    data = small_sample.prepared
    run = tmp_path / "soak" / "dual"
    rows: list[dict[str, float]] = []
    for cycle in range(1, CYCLES + 1):
        gc.collect()
        start = rss_mib()
        args = ["train", "--data", str(data), "--save_dir", str(tmp_path / "soak"), "--model", "n"]
        args += ["--input_shape", "64", "128", "--freeze_train", "false", "--batch_size", "8"]
        args += ["--num_workers", "0", "--persistent_workers", "false", "--eval_period", "1"]
        args += ["--precise_bn", "8", "--eval_batch_size", "16", "--save_period", "0", "--device", "cpu"]
        args += ["--unfreeze_epoch", str(cycle), "--resume", str(cycle > 1).lower()]
        assert main(args) == 0
        assert load_checkpoint(run / "last.pth")["epoch"] == cycle
        args = ["eval", "--weights", str(run / "last.pth"), "--data", str(data), "--split", "val"]
        args += ["--input-shape", "64", "128", "--batch", "16", "--device", "cpu"]
        assert main([*args, "--out", str(tmp_path / f"eval{cycle}")]) == 0
        assert (tmp_path / f"eval{cycle}").is_dir()
        gc.collect()
        rows.append({"cycle": cycle, "rss_start_mib": start, "rss_end_mib": rss_mib()})

    growth = rows[-1]["rss_end_mib"] - rows[0]["rss_end_mib"]
    report = {"cycles": rows, "growth_after_first_cycle_mib": growth, "bound_mib": GROWTH_BOUND_MIB}
    (tmp_path / "soak_rss.json").write_text(json.dumps(report, indent=1))
    with capsys.disabled():
        print("\nsoak: host RSS (MiB) per train/resume + eval cycle")
        for r in rows:
            print(f"  cycle {r['cycle']}: start {r['rss_start_mib']:.1f}  end {r['rss_end_mib']:.1f}")
        print(f"  growth after the first cycle {growth:+.1f} MiB (bound {GROWTH_BOUND_MIB:.0f} MiB)")
    assert growth <= GROWTH_BOUND_MIB, report
