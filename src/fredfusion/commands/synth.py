"""`fredfusion synth`: write a synthetic sample in the exact FRED layout."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fredfusion.commands import flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion synth``."""
    p = sub.add_parser("synth", help="write a synthetic sample in the exact FRED layout")
    p.add_argument("--out", type=Path, required=True, help="folder to write the sequences into")
    p.add_argument("--sequences", type=int, default=8, help="sequences to write (default: 8)")
    p.add_argument("--frames", type=int, default=90, help="RGB frames per sequence (default: 90)")
    p.add_argument("--width", type=int, default=1280, help="frame width (default: 1280)")
    p.add_argument("--height", type=int, default=720, help="frame height (default: 720)")
    flags.add_seed(p)
    p.add_argument(
        "--layout",
        choices=("flat", "official"),
        default="flat",
        help="flat: <id>/ side by side; official: train/<id>/ and test/<id>/ with real FRED ids",
    )
    p.add_argument("--workers", type=int, default=None, help="threads writing sequences (default: CPU cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the sample and list its sequences with their scenarios."""
    from fredfusion.data.synth import write_sample

    t0 = time.perf_counter()
    info = write_sample(
        args.out,
        sequences=args.sequences,
        frames=args.frames,
        width=args.width,
        height=args.height,
        seed=args.seed,
        layout=args.layout,
        progress=True,
        workers=args.workers,
    )
    print(
        f"synth: wrote {len(info.sequence_ids)} sequences to {args.out} in {time.perf_counter() - t0:.1f} s"
    )
    for seq_id, scenario in zip(info.sequence_ids, info.scenarios):
        print(f"  sequence {seq_id}: {scenario}")
    return 0
