"""`fredfusion prepare`: index, pair and split a FRED tree; write the COCO files and the frame store."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fredfusion.commands import flags
from fredfusion.spec import MODALITIES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion prepare``."""
    p = sub.add_parser("prepare", help="index, pair, split a FRED tree; write COCO files and the frame store")
    p.add_argument(
        "--fred-root",
        type=Path,
        default=None,
        help=f"the FRED tree to read (default: $FRED_ROOT or {flags.DEFAULT_FRED_ROOT})",
    )
    flags.add_out(p, flags.DEFAULT_DATA, f"prepared folder to write (default: {flags.DEFAULT_DATA})")
    p.add_argument("--split", default="canonical", help="canonical | challenging | a split file")
    p.add_argument("--stride", type=int, default=1, help="keep every K-th frame of each sequence")
    p.add_argument("--tolerance-ms", type=float, default=33.0, help="max |dt| of an RGB/Event pair")
    p.add_argument("--imgsz", type=int, default=640, help="frame store width (16:9 height follows)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train sequences kept for val")
    flags.add_workers(p, os.cpu_count() or 1, "decoding processes")
    p.add_argument(
        "--codec",
        default="auto",
        help="how the store keeps frames: auto (RGB JPEG 90, events zstd 3, lossless), raw, jpeg[:Q], "
        "zstd[:L], or per kind: rgb=jpeg:95,event=zstd (default: auto)",
    )
    p.add_argument(
        "--modalities",
        choices=MODALITIES,
        default="dual",
        help="frames the store keeps: rgb, event or both (dual, the default)",
    )
    p.add_argument(
        "--device",
        default="",
        help="cuda: decode, resize and encode the RGB frames on the GPU; cpu: all in --workers processes "
        "(default: cuda when available)",
    )
    flags.add_seed(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare ``--fred-root`` into ``--out``."""
    from fredfusion.data.prepare import prepare
    from fredfusion.data.store import parse_codecs
    from fredfusion.engine.runtime import pick_device

    try:
        parse_codecs(args.codec)
    except ValueError as exc:
        raise ValueError(f"--codec {args.codec!r}: {exc}") from None
    device = pick_device(args.device)
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
        codec=args.codec,
        modalities=args.modalities,
        device=device if device.type == "cuda" else None,
    )
    return 0
