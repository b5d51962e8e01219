"""A full-size dry run without the full dataset: prepare and read rates at FRED's frame counts.

Writes a FRED-shaped tree (official layout, 1280x720 RGB JPEGs and event PNGs, ``coordinates.txt``)
with the real frame count of a FRED sequence (~3,050 RGB frames) for a few sequences, reusing a pool
of synthetic frames through hard links (the pool is rendered once; the tree costs no disk). Then it
runs ``prepare`` with the chosen codec and device, reads the store at random through the training
loader, and extrapolates time and disk to all of FRED (701,500 RGB frames in 230 sequences).

Reused frames stay in the page cache, so the rates are those of decoding and encoding, not of a cold
disk; the store read is random over the whole store, as in training.

    python benchmarks/bench_fred_scale.py --sequences 4 --frames 3050 [--codec auto] [--device cuda]
        [--workers N] [--out runs/bench_fred_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

FRED_PAIRS = 701_500
FRED_SEQUENCES = 230
EVENT_PERIOD_US = 33_333


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_tree(root: Path, sequences: int, frames: int, pool: int, seed: int = 0) -> int:
    """FRED-shaped tree under ``root/train/<id>``; returns the number of RGB frames written."""
    from fredfusion.data.synth import write_sample

    pool_dir = root / "_pool"
    if not pool_dir.exists():
        write_sample(pool_dir, sequences=2, frames=pool // 2, seed=seed, progress=False)
    rgb_pool = sorted(pool_dir.glob("*/RGB/*.jpg"))
    ev_pool = sorted(pool_dir.glob("*/Event/Frames/*.png"))
    rng = np.random.default_rng(seed)
    total = 0
    for s in range(sequences):
        sid = 1000 + s
        seq = root / "train" / str(sid)
        if (seq / "coordinates.txt").is_file():
            total += frames
            continue
        (seq / "RGB").mkdir(parents=True, exist_ok=True)
        (seq / "Event" / "Frames").mkdir(parents=True, exist_ok=True)
        start = int(rng.integers(8 * 3600, 17 * 3600)) * 1_000_000
        lines = []
        wall = start
        for k in range(frames):
            hh, rem = divmod(wall // 1_000_000, 3600)
            mm, ss = divmod(rem, 60)
            _link(
                rgb_pool[k % len(rgb_pool)],
                seq / "RGB" / f"Video_{sid}_{hh:02d}_{mm:02d}_{ss:02d}.{wall % 1_000_000:06d}.jpg",
            )
            _link(
                ev_pool[k % len(ev_pool)],
                seq / "Event" / "Frames" / f"Video_{sid}_frame_{(k + 1) * EVENT_PERIOD_US}.png",
            )
            t = (k + 1) * EVENT_PERIOD_US
            x = 200 + 400 * (k % 97) / 97
            lines.append(
                f"{t // 1_000_000}.{t % 1_000_000:06d}: {x:.1f}, 300.0, {x + 50:.1f}, 334.0, 1, DJI Mini 2"
            )
            wall += int(rng.integers(33_400, 40_001))
        (seq / "coordinates.txt").write_text("\n".join(lines) + "\n")
        total += frames
    return total


def read_rate(prepared: Path, batch: int, workers: int, seconds: float, device: str) -> dict[str, float]:
    """Pairs/s through the training loader (random batches over the whole split) and per process."""
    import torch

    from fredfusion.data.dataset import PreparedDataset
    from fredfusion.data.loader import BatchLoader

    ds = PreparedDataset(prepared, "train", modality="dual", skip_bad=True)
    out: dict[str, float] = {}
    for name, w in (("one_process", 0), ("loader", workers)):
        loader = BatchLoader(ds, batch, num_workers=w, device=device, seed=1, persistent_workers=w > 0)
        it = iter(loader)
        next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            item = next(it, None)
            if item is None:
                it = iter(loader)
                continue
            n += len(item.ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[name] = n / (time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--frames", type=int, default=3050, help="RGB frames per sequence (FRED: ~3,050)")
    p.add_argument("--pool", type=int, default=120, help="distinct synthetic frames reused")
    p.add_argument("--codec", default="auto")
    p.add_argument("--device", default="", help="cuda: prepare encodes RGB on the GPU")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--read-seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("runs/bench_fred_scale"))
    p.add_argument("--keep", action="store_true", help="keep the tree and the prepared folder")
    args = p.parse_args()
    from fredfusion.data.prepare import prepare

    tree, prepared = args.out / "fred", args.out / "prepared"
    t0 = time.perf_counter()
    rgb_frames = make_tree(tree, args.sequences, args.frames, args.pool)
    print(f"tree: {args.sequences} sequences x {args.frames} RGB frames in {time.perf_counter() - t0:.1f} s")
    shutil.rmtree(prepared, ignore_errors=True)
    t0 = time.perf_counter()
    summary = prepare(
        tree, prepared, split="canonical", imgsz=args.imgsz, workers=args.workers, progress=False,
        codec=args.codec, device=args.device if args.device.startswith("cuda") else None, log=lambda _m: None,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    store = summary.store
    images = int(store["frames_written"])
    store_bytes = sum(f.stat().st_size for f in (prepared / "store").iterdir())
    per_pair = store_bytes / max(images, 1)
    rates = read_rate(prepared, args.batch, args.workers, args.read_seconds, args.device or "cpu")
    report = {
        "sequences": args.sequences,
        "rgb_frames": rgb_frames,
        "images": images,
        "codec": store.get("codecs"),
        "device": args.device or "cpu",
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "prepare_s": seconds,
        "store_build_pairs_per_s": float(store["frames_per_s"]),
        "prepare_pairs_per_s": images / seconds,
        "store_bytes_per_pair": per_pair,
        "read_pairs_per_s": rates,
        "fred_extrapolation": {
            "pairs": FRED_PAIRS,
            "prepare_minutes": FRED_PAIRS / (images / seconds) / 60,
            "store_gb": FRED_PAIRS * per_pair / 1e9,
        },
    }
    print(json.dumps(report, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fred_scale.json").write_text(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(prepared, ignore_errors=True)


if __name__ == "__main__":
    main()
