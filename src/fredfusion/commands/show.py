"""`fredfusion show`: a grid of RGB | Event pairs with boxes, and a report of a prepared split."""

from __future__ import annotations

import argparse

from fredfusion.commands import flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion show``."""
    p = sub.add_parser("show", help="grid of RGB | Event pairs with boxes and a dataset report of a split")
    flags.add_data(p)
    p.add_argument("--split", default="train", help="split to show (default: train)")
    p.add_argument("--n", type=int, default=16, help="pairs in the grid")
    p.add_argument("--augment", action="store_true", help="show frames after training augmentation")
    flags.add_out(p, None, "output folder (default: runs/show/<split>)")
    flags.add_seed(p)
    flags.add_input_shape(
        p, help="augmentation output size (default: 384 640, scaled down to a smaller store)"
    )
    p.add_argument("--cols", type=int, default=None, help="pairs per grid row (default: about sqrt(n/2))")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Render the grid and the report of ``--split``."""
    from fredfusion.show import show

    show(
        args.data,
        split=args.split,
        n=args.n,
        augment=args.augment,
        out=args.out,
        seed=args.seed,
        input_hw=flags.input_hw(args),
        cols=args.cols,
    )
    return 0
