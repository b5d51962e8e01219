"""`fredfusion train`: one flag per TrainConfig field (and the seed tool's spellings); YAML + flags."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

from fredfusion.config import ALIASES, CHOICES, FIELDS, TrainConfig, load_config, parse_bool


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (snake_case, dashed and the seed's spelling all accepted)."""
    p.add_argument("--config", type=Path, default=None, help="YAML file; flags override it")
    seed_names: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        if target is not None:
            seed_names.setdefault(target, []).append(alias)
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for name in FIELDS:
        spellings = [f"--{name}"]
        if "_" in name:
            spellings.append(f"--{name.replace('_', '-')}")
        spellings += [f"--{a}" for a in seed_names.get(name, [])]
        kind = hints[name]
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": f"(default: {getattr(defaults, name)})",
        }
        if name in CHOICES:
            kwargs["help"] = f"{' | '.join(CHOICES[name])} {kwargs['help']}"
        if kind is bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif name == "input_shape":
            kwargs.update(nargs=2, type=int, metavar=("H", "W"))
        else:
            kwargs.update(type=kind if kind in (int, float) else str)
        p.add_argument(*spellings, **kwargs)
    p.add_argument(
        "--no_fp16",
        "--no-fp16",
        dest="fp16",
        action="store_const",
        const=False,
        default=argparse.SUPPRESS,
        help="full precision",
    )
    p.add_argument(
        "--batch_size",
        "--batch-size",
        dest="batch_size",
        type=int,
        default=argparse.SUPPRESS,
        help="batch size of both phases",
    )
    p.add_argument(
        "--imgsz",
        dest="imgsz",
        type=int,
        default=argparse.SUPPRESS,
        help="input width; height = 16:9 rounded to 32",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion train``."""
    p = sub.add_parser("train", help="train an rgb | event | dual detector on a prepared folder")
    add_train_flags(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config and the flags given on the command line."""
    skip = {"func", "config", "command"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Train with the config of ``--config`` and the flags; print the final mAP."""
    from fredfusion.engine.trainer import Trainer

    cfg = config_from_args(args)
    summary = Trainer(cfg).fit()
    if summary.get("mAP50") is not None:
        print(
            f"final: mAP50 {summary['mAP50']:.4f}  mAP50:95 {summary['mAP50_95']:.4f}  "
            f"(best epoch {summary['best_epoch']}, run {summary['run_dir']})"
        )
    return 0
