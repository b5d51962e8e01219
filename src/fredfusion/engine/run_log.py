"""What a run leaves to read: TensorBoard events, results.csv and PNG curves, and the experiment loggers
asked for (Weights & Biases, MLflow; rank 0 only)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fredfusion.config import TrainConfig
from fredfusion.engine.loggers import ExperimentLogger, open_loggers

CSV_COLUMNS = (
    "epoch",
    "train_loss",
    "box_loss",
    "obj_loss",
    "cls_loss",
    "dfl_loss",
    "val_loss",
    "mAP50",
    "mAP50_95",
    "lr",
    "pairs_per_s",
    "data_wait",
    "bad_frames",
    "bad_steps",
)


class RunLog:
    """TensorBoard writer + results.csv rows + curves + experiment loggers; a no-op object when enabled
    is False."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        resume_epoch: int | None = None,
        cfg: TrainConfig | None = None,
    ):
        """``resume_epoch``: continue the run's results.csv, dropping rows after that epoch (written
        by a process that stopped before saving the checkpoint it resumes from); ``cfg``: the run's
        config, for the experiment loggers it asks for (``engine.loggers``)."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.csv_path = self.run_dir / "results.csv"
        self.writer = None
        self.loggers: list[ExperimentLogger] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        rows: list[list[str]] = []
        if resume_epoch is not None and self.csv_path.exists():
            with self.csv_path.open(newline="") as handle:
                old = list(csv.reader(handle))
            if old:
                index = dict(zip(old[0], range(len(old[0])), strict=False))
                rows = [
                    [row[index[c]] if c in index and index[c] < len(row) else "" for c in CSV_COLUMNS]
                    for row in old[1:]
                    if row and row[0].isdigit() and int(row[0]) <= resume_epoch
                ]
        with self.csv_path.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(CSV_COLUMNS)
            out.writerows(rows)
        if cfg is not None:
            self.loggers = open_loggers(cfg, self.run_dir, resume=resume_epoch is not None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Per-step or per-epoch scalars, names like 'train/loss'."""
        if self.writer is None:
            return
        for key, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        """An RGB uint8 (H, W, 3) picture."""
        if self.writer is not None:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def epoch_row(self, row: dict[str, Any]) -> None:
        """Append one epoch to results.csv and redraw the curves."""
        if not self.enabled:
            return
        with self.csv_path.open("a", newline="") as handle:
            csv.writer(handle).writerow(["" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS])
        try:
            from fredfusion.eval.plots import plot_curves

            plot_curves(self.csv_path, self.run_dir / "curves.png")
        except (ImportError, ValueError, OSError):
            pass
        if self.writer is not None:
            self.writer.flush()
        for logger in self.loggers:
            logger.epoch(row, int(row["epoch"]))

    def close(self) -> None:
        """Flush and close TensorBoard and the experiment loggers."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def quick_test_checklist(
    checks: dict[str, Any], summary: dict[str, Any], device: torch.device, run_dir: Path
) -> list[str]:
    """The lines ``--quick_test`` prints at the end: data, pairs, weights, speed, faults, memory, mAP."""
    mem = (
        f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak"
        if device.type == "cuda"
        else "n/a (CPU)"
    )
    items = [
        ("data found", checks.get("data", "?")),
        ("dual rate (train split)", checks.get("dual_rate", "?")),
        ("dual rate (batches seen)", f"{summary.get('dual', 0)}/{summary.get('seen', 0)}"),
        ("weights", checks.get("weights", "?")),
        ("throughput", f"{summary.get('pairs_per_s', 0):.1f} pairs/s"),
        ("data-wait share", f"{100 * summary.get('data_wait', 0):.1f}%"),
        (
            "faults",
            f"{summary.get('bad_frames', 0)} unreadable images, "
            f"{summary.get('bad_steps', 0)} non-finite steps skipped",
        ),
        ("GPU memory", mem),
        (
            "mini evaluation",
            "skipped"
            if summary.get("mAP50") is None
            else f"mAP50 {summary['mAP50']:.4f}, mAP50:95 {summary['mAP50_95']:.4f}",
        ),
        ("checkpoints", str(run_dir)),
    ]
    width = max(len(k) for k, _ in items)
    return ["quick test check list:", *(f"  [x] {key.ljust(width)}  {value}" for key, value in items)]
