"""Does the store codec cost detection quality? The demo's training on raw and on compressed stores.

One synthetic sample (the demo's: 10 sequences x 60 frames, seed 0) is prepared once per codec at the
demo's store size; the demo's recipe then trains with each training seed on each store and its
best.pth is evaluated on the test split. The table gives test mAP50, mAP50:95 and APs (COCO small:
boxes under 32x32 px) per codec and seed, with the mean and the spread (max - min) over the seeds.
``--arch yolov8`` trains the anchor-free family instead (the comparison of the two families).

    python benchmarks/codec_map.py [--codecs raw auto] [--seeds 0 1 2] [--out runs/codec_map]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codecs", nargs="+", default=["raw", "auto"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--device", default="")
    p.add_argument("--arch", default="yolov5", help="detector family trained on every store")
    p.add_argument("--out", type=Path, default=Path("runs/codec_map"))
    args = p.parse_args()
    from fredfusion.commands.demo import demo_config, train_and_test
    from fredfusion.data.prepare import prepare
    from fredfusion.data.synth import write_sample

    fred = args.out / "fred"
    if not fred.is_dir():
        write_sample(fred, sequences=10, frames=60, seed=0)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for codec in args.codecs:
        prepared = args.out / f"prepared_{codec}"
        summary = prepare(
            fred, prepared, imgsz=args.imgsz, workers=2, progress=False, codec=codec, log=lambda _m: None
        )
        size = sum(f.stat().st_size for f in (prepared / "store").iterdir()) / max(
            summary.store["frames_written"], 1
        )
        rows[codec] = {}
        for seed in args.seeds:
            run = args.out / f"{codec}_seed{seed}"
            cfg = demo_config(
                prepared, run, "dual", "n", args.epochs, args.imgsz, args.device, seed, args.arch
            )
            metrics = train_and_test(cfg, run / "eval")["test"]
            rows[codec][seed] = {k: float(metrics[k]) for k in ("mAP50", "mAP50_95", "APs")}
            print(f"{codec} seed {seed}: {rows[codec][seed]}", flush=True)
        rows[codec]["bytes_per_image"] = size  # type: ignore[index]
    print(f"| codec ({args.arch}) | bytes/image | seed | test mAP50 | test mAP50:95 | APs |")
    print("|---|---:|---|---:|---:|---:|")
    for codec, by_seed in rows.items():
        size = by_seed.pop("bytes_per_image")  # type: ignore[call-overload]
        for seed, m in by_seed.items():
            values = " | ".join(f"{m[k]:.4f}" for k in ("mAP50", "mAP50_95", "APs"))
            print(f"| {codec} | {size:,.0f} | {seed} | {values} |")
        for key in ("mAP50", "mAP50_95", "APs"):
            values = np.array([m[key] for m in by_seed.values()])
            print(
                f"| {codec} | | mean {key} | {values.mean():.4f} | spread {values.max() - values.min():.4f} |"
            )
        by_seed["bytes_per_image"] = size  # type: ignore[index]
    (args.out / f"codec_map_{args.arch}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
