"""Flag groups shared by the commands: one declaration per option, the same name in every command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fredfusion.spec import NMS_IOU

DEFAULT_DATA = Path("datasets/fred_coco")
DEFAULT_FRED_ROOT = "/mnt/data/datasets/fred"


def default_fred_root() -> str:
    """$FRED_ROOT or the conventional mount point."""
    return os.environ.get("FRED_ROOT", DEFAULT_FRED_ROOT)


def add_data(p: argparse.ArgumentParser, default: Path = DEFAULT_DATA) -> None:
    """``--data``: a prepared folder (the output of ``fredfusion prepare``)."""
    p.add_argument("--data", type=Path, default=default, help=f"prepared folder (default: {default})")


def add_weights(p: argparse.ArgumentParser, required: bool = True, **kwargs: Any) -> None:
    """``--weights``: a fredfusion checkpoint (``best.pth``)."""
    p.add_argument("--weights", type=Path, required=required, help="checkpoint (best.pth)", **kwargs)


def add_input_shape(p: argparse.ArgumentParser, default: Any = None, help: str = "") -> None:
    """``--input-shape H W``: the network input, positive multiples of 32."""
    p.add_argument(
        "--input-shape",
        "--input_shape",
        dest="input_shape",
        type=int,
        nargs=2,
        default=default,
        metavar=("H", "W"),
        help=help or "network input height and width, multiples of 32 (default: the training shape)",
    )


def input_hw(args: argparse.Namespace) -> tuple[int, int] | None:
    """``--input-shape`` as a tuple, or None when not given."""
    return tuple(args.input_shape) if args.input_shape else None


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device``: cpu, cuda, cuda:1; default cuda when available."""
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: cuda when available, else cpu)")


def add_out(p: argparse.ArgumentParser, default: Path | None, help: str) -> None:
    """``--out``: where the command writes."""
    p.add_argument("--out", type=Path, default=default, help=help)


def add_batch(p: argparse.ArgumentParser, default: int, help: str = "images per batch") -> None:
    """``--batch``: images per batch."""
    p.add_argument("--batch", type=int, default=default, help=f"{help} (default: {default})")


def add_thresholds(p: argparse.ArgumentParser, conf: float) -> None:
    """``--conf`` and ``--iou``: score threshold and NMS IoU threshold."""
    p.add_argument("--conf", type=float, default=conf, help=f"score threshold (default: {conf})")
    p.add_argument("--iou", type=float, default=NMS_IOU, help=f"NMS IoU threshold (default: {NMS_IOU})")


def add_workers(p: argparse.ArgumentParser, default: int, help: str) -> None:
    """``--workers``: processes or threads a command may use."""
    p.add_argument("--workers", type=int, default=default, help=f"{help} (default: {default})")


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed``: the random seed."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
