"""`fredfusion train`: one flag per TrainConfig field (and the seed tool's spellings); YAML + flags."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fredfusion.config import (
    ALIASES,
    BATCH_FIELDS,
    CHOICES,
    FIELD_HELP,
    FIELDS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    load_yaml,
    parse_batch,
    parse_bool,
    parse_share,
    shown,
)


def batch_arg(text: str) -> int:
    """An argparse ``type``: a batch size, an integer >= 1 or ``auto`` (the message names the flag)."""
    try:
        return parse_batch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def share_arg(text: str) -> float:
    """An argparse ``type``: a modality dropout share in [0, 1] or ``auto``."""
    try:
        return parse_share(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


SPECIAL_FLAGS: dict[str, tuple[tuple[str, ...], Callable[[str], Any], str, str]] = {
    "batch_size": (
        ("--batch", "--batch_size", "--batch-size"),
        batch_arg,
        "N|auto",
        "batch size of both phases (auto: the largest that fits, the lr scaled by batch / nominal_batch)",
    ),
    "imgsz": (("--imgsz",), int, "W", "input width; the height follows at 16:9, rounded to 32 (640 -> 352)"),
    "out": (("--out",), str, "RUN_DIR", "the run folder (sets save_dir and name)"),
    "Min_lr": (("--Min_lr", "--min_lr", "--min-lr"), float, "LR", "final learning rate (sets min_lr_ratio)"),
    "eval_flag": (("--eval_flag",), parse_bool, "BOOL", "evaluate mAP (false: same as --no_eval_map)"),
}
"""Flags that set other fields (``config._special``): spellings, type, metavar, help."""


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (snake_case, dashed and the seed's spelling all accepted)."""
    p.add_argument("--config", type=Path, default=None, help="YAML file of config keys; flags override it")
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
        text = FIELD_HELP.get(name, "")
        if name in CHOICES:
            text = f"{text}: {' | '.join(CHOICES[name])}"
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": f"{text} (default: {shown(name, getattr(defaults, name))})" if text else "",
        }
        if name == "resume":
            kwargs.update(nargs="?", const="true", metavar="RUN_DIR|last.pth")
        elif kind is bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif name == "input_shape":
            kwargs.update(nargs=2, type=int, metavar=("H", "W"))
        elif name in BATCH_FIELDS:
            kwargs.update(type=batch_arg, metavar="N|auto")
        elif name == "modality_dropout":
            kwargs.update(type=share_arg, metavar="P|auto")
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
        help="full precision (same as --fp16 false)",
    )
    for dest, (spellings, kind, metavar, text) in SPECIAL_FLAGS.items():
        p.add_argument(
            *spellings, dest=dest, type=kind, metavar=metavar, default=argparse.SUPPRESS, help=text
        )


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion train``."""
    p = sub.add_parser(
        "train",
        help="train an rgb | event | dual detector on a prepared folder",
        usage="%(prog)s [--config FILE.yaml] [--data DIR] [--modality M] [--model S] [--batch N] [--imgsz W] "
        "[--epochs N] [--out RUN_DIR] [--resume [RUN_DIR|last.pth]] [any config key as a flag]",
    )
    add_train_flags(p)
    p.set_defaults(func=run)


def resume_file(value: Any) -> Path | None:
    """The checkpoint ``--resume VALUE`` names: a run folder's last.pth, or that file; None when the
    value is on / off (``--resume`` alone: last.pth of the run folder the config names)."""
    try:
        parse_bool(value)
        return None
    except ValueError:
        pass
    path = Path(str(value)).expanduser()
    file = path / "last.pth" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--resume {value}: {file} not found (give a run folder or its last.pth)")
    if file.name != "last.pth":
        raise ConfigError(
            f"--resume {value}: a run continues from its last.pth (give the run folder or {file.parent}"
            f"/last.pth); to start a new run from these weights use --weights {value}"
        )
    return file


def resume_config(
    file: Path, yaml_file: Path | None, overrides: dict[str, Any], log: Callable[[str], None] = print
) -> TrainConfig:
    """The config saved in ``file`` (a run's last.pth) with ``yaml_file`` and ``overrides`` applied on
    top, one printed line per changed key; the run continues in the checkpoint's folder."""
    from fredfusion.model.weights import load_checkpoint

    saved = load_checkpoint(file).get("config")
    if not isinstance(saved, dict) or not saved:
        raise ConfigError(f"--resume {file}: holds no config; give the whole command with --resume")
    base = apply_overrides(TrainConfig(), {k: v for k, v in saved.items() if k in FIELDS}, str(file))
    given = {**(load_yaml(yaml_file) if yaml_file else {}), **overrides}
    cfg = apply_overrides(base, given, "command line")
    if (cfg.save_dir, cfg.name) != (base.save_dir, base.name) and {"save_dir", "name"} & set(given):
        raise ConfigError(
            f"--resume {file}: the run continues in {file.parent}; --name / --save_dir cannot move it"
        )
    cfg = dataclasses.replace(cfg, save_dir=str(file.parent.parent), name=file.parent.name, resume=True)
    log(f"resume: {file} with its saved config")
    for key, old in base.to_dict().items():
        new = getattr(cfg, key)
        if new != old and key not in ("save_dir", "name", "resume"):
            log(f"resume: {key} {old} -> {new} (given on the command line)")
    return cfg


def config_from_args(args: argparse.Namespace, log: Callable[[str], None] = print) -> TrainConfig:
    """TrainConfig from --config and the flags given on the command line; with ``--resume RUN_DIR``
    (or its last.pth) the config saved in the checkpoint is the base instead of the defaults."""
    skip = {"func", "config", "command"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    file = resume_file(overrides["resume"]) if "resume" in overrides else None
    if file is None:
        return load_config(args.config, overrides)
    del overrides["resume"]
    return resume_config(file, args.config, overrides, log)


def run(args: argparse.Namespace) -> int:
    """Train with the config of ``--config`` and the flags; print the final mAP."""
    from fredfusion.engine.loggers import check_loggers
    from fredfusion.engine.trainer import Trainer

    cfg = config_from_args(args)
    check_loggers(cfg)
    summary = Trainer(cfg).fit()
    if summary.get("mAP50") is not None:
        print(
            f"final: mAP50 {summary['mAP50']:.4f}  mAP50:95 {summary['mAP50_95']:.4f}  "
            f"(best epoch {summary['best_epoch']}, run {summary['run_dir']})"
        )
    return 0
