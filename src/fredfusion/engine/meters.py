"""Per-epoch bookkeeping of the training loop: losses, pairs, data wait, unreadable images, rates.

Loss sums and the good-step count stay on the device; ``read`` brings them (with the StepGuard
counters) to the host in one transfer, which the loop does every ``log_interval`` steps only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from fredfusion.data.loader import DeviceBatch

LOSS_PARTS = ("box", "obj", "cls", "dfl")
"""The loss terms a step reports: YOLOv5 has no DFL term, the YOLOv8 family no objectness (zeros)."""


class EpochMeter:
    """What one epoch of training measured so far (one process; ``world_size`` scales the rates)."""

    def __init__(
        self, device: torch.device, dual_flag: dict[int, bool], tdiff: dict[int, float], world_size: int = 1
    ) -> None:
        self.device = device
        self.world_size = world_size
        self._dual_flag = dual_flag
        self._tdiff = tdiff
        self.sums = torch.zeros(1 + len(LOSS_PARTS), device=device)  # total and parts over the good steps
        self.good = torch.zeros((), device=device)  # steps whose loss and gradients were finite
        self.mean = [math.nan] * (1 + len(LOSS_PARTS))  # of the good steps, as of the last ``read``
        self.dual = self.seen = self.bad_images = self.bad_steps = 0
        self.bad_example: tuple[int, str, str] | None = None
        self.tdiff_sum = 0.0
        self.wait = 0.0
        self.t_start = time.perf_counter()

    def next_batch(self, batches: Iterator[DeviceBatch]) -> DeviceBatch:
        """The next batch, its waiting time counted as data wait."""
        t0 = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t0
        return batch

    def add_step(self, values: torch.Tensor, ok: torch.Tensor) -> None:
        """A step's [loss, *LOSS_PARTS] and finite flag, summed on the device when finite."""
        self.sums += torch.where(ok, values, torch.zeros_like(values))
        self.good += ok

    def add_batch(self, batch: DeviceBatch) -> int:
        """Count a batch's images, true pairs and unreadable images (host tensors only); returns the
        number of unreadable ones."""
        ids = batch.ids.tolist()
        self.seen += len(ids)
        for image_id in ids:
            if self._dual_flag.get(image_id):
                self.dual += 1
                self.tdiff_sum += self._tdiff[image_id]
        n_bad = int(batch.bad.sum()) if batch.bad is not None else 0
        if n_bad:
            self.bad_images += n_bad
            self.bad_example = self.bad_example or (batch.problems[0] if batch.problems else None)
        return n_bad

    def read(self, guard_counts: torch.Tensor) -> list[float]:
        """The one host sync: update the mean losses; returns ``guard_counts`` as host floats."""
        host = torch.cat([self.sums, self.good.reshape(1), guard_counts.float()]).tolist()
        n = len(self.sums)
        self.mean = [v / host[n] if host[n] else math.nan for v in host[:n]]
        return host[n + 1 :]

    def progress(self, lr: float) -> tuple[str, dict[str, float]]:
        """The progress-bar postfix and the TensorBoard scalars as of the last ``read``."""
        mean, dual, seen = self.mean, self.dual, self.seen
        elapsed = time.perf_counter() - self.t_start
        rate = seen * self.world_size / max(elapsed, 1e-9)
        postfix = (
            f"loss {mean[0]:.4f} lr {lr:.2e} dual {dual}/{seen} "
            f"({100 * dual / max(seen, 1):.1f}%) tdiff {self.tdiff_sum / max(dual, 1):.1f}ms "
            f"{rate:.0f} img/s wait {100 * self.wait / elapsed:.0f}%"
        )
        scalars = {
            "train/loss": mean[0],
            **{f"train/{part}": value for part, value in zip(LOSS_PARTS, mean[1:])},
            "train/lr": lr,
            "speed/pairs_per_s": rate,
            "speed/data_wait": self.wait / elapsed,
        }
        if self.device.type == "cuda":
            scalars["gpu/memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return postfix, scalars

    def summary(self, lr: float, bad_frames: int) -> dict[str, Any]:
        """The epoch's statistics; ``bad_frames``: unreadable images over every process."""
        elapsed = time.perf_counter() - self.t_start
        return {
            "train_loss": self.mean[0],
            **{f"{part}_loss": value for part, value in zip(LOSS_PARTS, self.mean[1:])},
            "lr": lr,
            "pairs_per_s": self.seen * self.world_size / max(elapsed, 1e-9),
            "data_wait": self.wait / max(elapsed, 1e-9),
            "dual": self.dual,
            "seen": self.seen,
            "bad_frames": bad_frames,
            "bad_steps": self.bad_steps,
        }
