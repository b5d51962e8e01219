"""Throughput of ``augment_batch`` on random uint8 frame pairs (Mosaic + MixUp on).

Usage: python benchmarks/bench_augment.py [--batch 64] [--device cpu|cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from fredfusion.data.augment import AugmentConfig, augment_batch, letterbox_batch, valid_targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print pairs/s."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--store-hw", type=int, nargs=2, default=(360, 640), metavar=("H", "W"))
    ap.add_argument("--out-hw", type=int, nargs=2, default=(384, 640), metavar=("H", "W"))
    ap.add_argument("--prob", type=float, default=0.5, help="mosaic_prob and mixup_prob")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    b, (h, w) = args.batch, args.store_hw
    rgb = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, device=device, generator=gen)
    event = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, device=device, generator=gen)
    img = torch.arange(b, device=device).repeat_interleave(2).float()
    xy = torch.rand((2 * b, 2), device=device, generator=gen) * torch.tensor([w - 40, h - 30], device=device)
    wh = torch.tensor([25.0, 17.0], device=device)
    targets = torch.cat([img[:, None], torch.zeros_like(img)[:, None], xy, xy + wh], 1)
    cfg = AugmentConfig(mosaic_prob=args.prob, mixup_prob=args.prob)
    out_hw = tuple(args.out_hw)

    def timed(fn, steps: int) -> float:
        for _ in range(args.warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        return time.perf_counter() - t0

    dt = timed(lambda: augment_batch(rgb, event, targets, out_hw, cfg, generator=gen), args.steps)
    n_out = valid_targets(augment_batch(rgb, event, targets, out_hw, cfg, generator=gen)[2]).shape[0]
    lb = timed(lambda: letterbox_batch(rgb, event, out_hw), args.steps)
    print(
        f"device={device} batch={b} {h}x{w}->{out_hw[0]}x{out_hw[1]} mosaic_prob=mixup_prob={args.prob} "
        f"threads={torch.get_num_threads()} targets_in={targets.shape[0]} targets_out={n_out}"
    )
    print(f"augment_batch:   {args.steps * b / dt:9.1f} pairs/s  ({1000 * dt / args.steps:8.2f} ms/step)")
    print(f"letterbox_batch: {args.steps * b / lb:9.1f} pairs/s  ({1000 * lb / args.steps:8.2f} ms/step)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
