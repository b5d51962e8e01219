"""Cost of making a NaN/inf step a bit-exact no-op: the training step with and without the StepGuard's
copies (parameters with a gradient, optimizer state, GradScaler scale, EMA, model buffers).

Both variants run the same step; "without" replaces the copy and the masked put-back by nothing (what a
step costs that cannot be undone). Rounds alternate, and the figures are the fastest round of each in
process CPU time (all threads), so that other load on a shared machine counts as little as possible;
wall time is printed too. Also times the copy and the put-back alone.

Usage: python benchmarks/bench_nan_guard.py [--model n] [--batch 16] [--input-shape 192 320]
       [--optimizer sgd adamw] [--device cpu|cuda] [--steps 10] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fredfusion.config import load_config
from fredfusion.engine.step import TrainStep
from fredfusion.engine.step_guard import Snapshot
from fredfusion.model.detector import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(args: argparse.Namespace, optimizer: str, device: torch.device) -> TrainStep:
    torch.manual_seed(0)
    overrides = {"data": "unused", "model": args.model, "input_shape": list(args.input_shape)}
    cfg = load_config(overrides={**overrides, "optimizer": optimizer})
    model = build_model("dual", args.model, "concat", num_classes=1).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    amp = torch.bfloat16 if device.type == "cuda" else None
    return TrainStep(cfg, model, args.batch, device=device, amp_dtype=amp, optimizer_choice=(optimizer, None))


def _time_steps(
    step: TrainStep, batch: tuple[torch.Tensor, ...], steps: int, device: torch.device
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per step."""
    rgb, event, targets = batch
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step.optimize(step.model, rgb, event, targets, rgb.shape[0])
    _sync(device)
    return (time.process_time() - c0) / steps, (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print ms per step with and without the copies."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="n")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-shape", type=int, nargs=2, default=(192, 320), metavar=("H", "W"))
    ap.add_argument("--optimizer", nargs="+", default=["sgd", "adamw"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = args.input_shape
    gen = torch.Generator(device=device).manual_seed(0)
    b = args.batch
    rgb = torch.rand(b, 3, h, w, device=device, generator=gen)
    event = torch.rand(b, 3, h, w, device=device, generator=gen)
    boxes = torch.tensor([[0.4 * w, 0.4 * h, 0.45 * w, 0.46 * h]], device=device).repeat(b, 1)
    targets = torch.cat(
        [torch.arange(b, device=device)[:, None].float(), torch.zeros(b, 1, device=device), boxes], 1
    )
    print(f"dual YOLO-{args.model}, batch {b} at {w}x{h}, {device}, {torch.get_num_threads()} threads")
    for name in args.optimizer:
        step = _step(args, name, device)
        _time_steps(step, (rgb, event, targets), 2, device)  # warm-up; optimizer state created
        guard = step.guard
        tensors = step._written_by_update()
        copied = sum(t.numel() * t.element_size() for t in tensors)
        with_copies, without = [], []
        take, restore = Snapshot.take, Snapshot.restore_where
        for _ in range(args.rounds):
            with_copies.append(_time_steps(step, (rgb, event, targets), args.steps, device))
            Snapshot.take, Snapshot.restore_where = lambda self, t: None, lambda self, f: None
            try:
                without.append(_time_steps(step, (rgb, event, targets), args.steps, device))
            finally:
                Snapshot.take, Snapshot.restore_where = take, restore
        flag = torch.tensor(False, device=device)
        alone = []
        for _ in range(args.rounds * args.steps):
            _sync(device)
            c0 = time.process_time()
            guard.begin()
            guard.save(tensors)
            guard.end(flag)
            _sync(device)
            alone.append(time.process_time() - c0)
        a, c = min(v[0] for v in with_copies), min(v[0] for v in without)
        wall_a, wall_c = (statistics.median(v[1] for v in x) for x in (with_copies, without))
        print(
            f"{name}: {a * 1e3:.0f} ms CPU/step with the copies, {c * 1e3:.0f} without "
            f"({100 * (a - c) / c:+.1f}%); copy + put-back alone {min(alone) * 1e3:.1f} ms CPU for "
            f"{copied / 2**20:.1f} MiB in {len(tensors)} tensors (+ model buffers); "
            f"median wall {wall_a * 1e3:.0f} / {wall_c * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
