"""Speed of indexing + pairing a full-size FRED tree (file names and annotations only).

Creates a metadata-only tree (empty frame files, flat layout, realistic names, RGB gaps jittered
33-40 ms, events every 33.333 ms running a few frames longer, one annotation file per sequence)
in a temporary folder, then times scan + read, pairing, splits and building the COCO dicts.

    python benchmarks/bench_index.py [--sequences 230] [--frames 3050] [--keep] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fredfusion.data.coco import build_coco
from fredfusion.data.fred import read_sequence, scan_root
from fredfusion.data.pairing import PairingStats, pair_sequence
from fredfusion.data.prepare import gc_paused
from fredfusion.data.splits import plan_splits

EVENT_PERIOD_US = 33333
MODELS = ("DJI Mini 2", "DJI Mini 3", "DJI Tello EDU", "Betafpv air75", "DarwinFPV cineape20")


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def make_tree(root: Path, sequences: int, frames: int, seed: int = 0) -> int:
    """Write the metadata-only tree; returns the number of files created."""
    rng = np.random.default_rng(seed)
    n_files = 0
    for sid in range(sequences):
        seq = root / str(sid)
        rgb_dir = seq / "RGB"
        ev_dir = seq / "Event" / "Frames"
        rgb_dir.mkdir(parents=True)
        ev_dir.mkdir(parents=True)
        start_us = int(rng.integers(8 * 3600, 18 * 3600)) * 1_000_000
        gaps = rng.integers(33_000, 40_001, size=frames - 1)
        t_us = start_us + np.concatenate([[0], np.cumsum(gaps)])
        for t in t_us.tolist():
            hh, rem = divmod(t, 3_600_000_000)
            mm, rem = divmod(rem, 60_000_000)
            _touch(f"{rgb_dir}/Video_{sid}_{hh:02d}_{mm:02d}_{rem / 1e6:09.6f}.jpg")
        span_us = int(t_us[-1] - t_us[0])
        n_events = span_us // EVENT_PERIOD_US + 1 + int(rng.integers(2, 7))
        for k in range(1, n_events + 1):
            _touch(f"{ev_dir}/Video_{sid}_frame_{k * EVENT_PERIOD_US}.png")
        n_files += frames + n_events
        model = MODELS[sid % len(MODELS)]
        lines = []
        x, y = 600.0, 300.0
        for k in range(1, n_events + 1):
            if k % 7 == 0:
                continue  # some background frames
            x += float(rng.normal(0, 3))
            y += float(rng.normal(0, 2))
            lines.append(f"{k * 0.033333:.6f}: {x:.1f}, {y:.1f}, {x + 50:.1f}, {y + 34:.1f}, 1, {model}\n")
        (seq / "coordinates.txt").write_text("".join(lines))
    return n_files


def run(root: Path, tolerance_ms: float) -> dict[str, float]:
    """Time the indexing stages on an existing tree; returns the numbers."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    scan = scan_root(root)
    seqs = [read_sequence(d, scan.root) for d in scan.sequences.values()]
    t1 = time.perf_counter()
    paired = [pair_sequence(s, tolerance_ms) for s in seqs]
    t2 = time.perf_counter()
    c2 = time.process_time()
    plan = plan_splits([s.seq_id for s in seqs], "canonical")
    t3 = time.perf_counter()
    next_id = 1
    n_images = n_ann = 0
    for name in ("train", "val", "test"):
        images = [im for p in paired if plan.assignment[p.seq_id] == name for im in p.images]
        for im in images:
            im.image_id = next_id
            next_id += 1
        coco = build_coco(images, name, {"fred_root": str(scan.root)})
        n_images += len(coco["images"])
        n_ann += len(coco["annotations"])
    t4 = time.perf_counter()
    stats = PairingStats.merge(p.stats for p in paired)
    frames = stats.rgb_frames + stats.event_frames
    return {
        "sequences": len(seqs),
        "rgb_frames": stats.rgb_frames,
        "event_frames": stats.event_frames,
        "pairs": stats.pairs,
        "dual_rate": stats.dual_rate,
        "avg_tdiff_ms": stats.avg_tdiff_ms,
        "max_tdiff_ms": stats.max_tdiff_ms,
        "boxes": sum(s.n_boxes for s in seqs),
        "images": n_images,
        "annotations": n_ann,
        "index_s": t1 - t0,
        "pair_s": t2 - t1,
        "splits_s": t3 - t2,
        "coco_s": t4 - t3,
        "index_pair_s": t2 - t0,
        "index_pair_cpu_s": c2 - c0,
        "frames_per_s": frames / (t2 - t0),
    }


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=230)
    ap.add_argument("--frames", type=int, default=3050, help="RGB frames per sequence")
    ap.add_argument("--tolerance-ms", type=float, default=33.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated tree (its path is printed)")
    ap.add_argument("--root", type=Path, default=None, help="time an existing tree instead of generating one")
    args = ap.parse_args()

    created = None
    if args.root is None:
        created = Path(tempfile.mkdtemp(prefix="fred_bench_"))
        t = time.perf_counter()
        n = make_tree(created, args.sequences, args.frames)
        print(f"created {n} empty frame files in {time.perf_counter() - t:.1f} s under {created}")
        root = created
    else:
        root = args.root
    try:
        with gc_paused():  # as prepare does
            r = run(root, args.tolerance_ms)
    finally:
        if created is not None and not args.keep:
            shutil.rmtree(created, ignore_errors=True)
    print(
        f"{r['sequences']} sequences, {r['rgb_frames']} RGB + {r['event_frames']} event frames, "
        f"{r['boxes']} boxes; pairs {r['pairs']} (dual {100 * r['dual_rate']:.2f}%, "
        f"avg |dt| {r['avg_tdiff_ms']:.2f} ms, max {r['max_tdiff_ms']:.2f} ms)"
    )
    print(
        f"scan+read {r['index_s']:.2f} s, pair {r['pair_s']:.2f} s, splits {r['splits_s']:.3f} s, "
        f"COCO dicts {r['coco_s']:.2f} s ({r['images']} images, {r['annotations']} annotations)"
    )
    print(
        f"index+pair: {r['index_pair_s']:.2f} s wall ({r['index_pair_cpu_s']:.2f} s CPU), "
        f"{r['frames_per_s']:.0f} frames/s"
    )
    if created is not None and args.keep:
        print(f"tree kept at {created}")


if __name__ == "__main__":
    main()
