"""The seed workflow (`python train_fred_fusion.py --modality dual ...`) on top of the fredfusion trainer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fredfusion.cli import USER_ERRORS
from fredfusion.commands.flags import Parser, default_fred_root
from fredfusion.commands.train import add_train_flags, config_from_args
from fredfusion.engine.loggers import check_loggers

PREPARED = Path("datasets/fred_coco")


def run_name(modality: str) -> str:
    """logs/fred_fusion for dual, logs/fred_rgb and logs/fred_event otherwise."""
    return "fred_fusion" if modality == "dual" else f"fred_{modality}"


def main(argv: list[str] | None = None) -> int:
    """Prepare $FRED_ROOT into datasets/fred_coco when needed, then train with logs under logs/fred_*.

    A user's mistake (a missing or unreadable weights file, a bad config value) is one line on stderr and
    exit status 2, as with ``fredfusion train``.
    """
    try:
        return _train(argv)
    except USER_ERRORS as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2


def _train(argv: list[str] | None) -> int:
    parser = Parser(description="Train an RGB / Event / dual fusion drone detector on FRED.")
    add_train_flags(parser)
    parser.add_argument(
        "--fred_root", "--fred-root", default=None, help="default: $FRED_ROOT or /mnt/data/datasets/fred"
    )
    args = parser.parse_args(argv)
    fred_root = Path(args.fred_root or default_fred_root())
    del args.fred_root
    args.data = getattr(args, "data", str(PREPARED))
    modality = getattr(args, "modality", "dual")
    name = run_name(modality)
    args.save_dir = getattr(args, "save_dir", "logs")
    args.name = getattr(args, "name", name)
    args.best_alias = getattr(args, "best_alias", str(Path(args.save_dir) / args.name / f"{name}_best.pth"))
    cfg = config_from_args(args)
    check_loggers(cfg)
    if not (Path(cfg.data) / "annotations" / "instances_train.json").is_file():
        from fredfusion.data.prepare import prepare

        print(f"{cfg.data} is not prepared yet: preparing {fred_root} (one time)")
        prepare(fred_root, Path(cfg.data), workers=os.cpu_count() or 1)
    from fredfusion.engine.trainer import Trainer

    Trainer(cfg).fit()
    return 0
