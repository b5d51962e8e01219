"""`fredfusion prepare`: index, pair and split a FRED tree; write the COCO files and the frame store."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fredfusion.commands import flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion prepare``."""
    p = sub.add_parser("prepare", help="index, pair, split a FRED tree; write COCO files and the frame store")
    p.add_argument(
        "--fred-root", type=Path, default=None, help=f"default: $FRED_ROOT or {flags.DEFAULT_FRED_ROOT}"
    )
    flags.add_out(p, flags.DEFAULT_DATA, f"prepared folder to write (default: {flags.DEFAULT_DATA})")
    p.add_argument("--split", default="canonical", help="canonical | challenging | a split file")
    p.add_argument("--stride", type=int, default=1, help="keep every K-th frame of each sequence")
    p.add_argument("--tolerance-ms", type=float, default=33.0, help="max |dt| of an RGB/Event pair")
    p.add_argument("--imgsz", type=int, default=640, help="frame store width (16:9 height follows)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train sequences kept for val")
    flags.add_workers(p, min(8, os.cpu_count() or 1), "decoding processes")
    flags.add_seed(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare ``--fred-root`` into ``--out``."""
    from fredfusion.data.prepare import prepare

    root = args.fred_root or Path(flags.default_fred_root())
    prepare(
        root,
        args.out,
        split=args.split,
        stride=args.stride,
        tolerance_ms=args.tolerance_ms,
        imgsz=args.imgsz,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    return 0
