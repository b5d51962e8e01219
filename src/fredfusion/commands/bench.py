"""`fredfusion bench`: store read, augment, model step, end-to-end and eval rates; the bottleneck named."""

from __future__ import annotations

import argparse
from pathlib import Path

from fredfusion.commands import flags
from fredfusion.config import ConfigError, TrainConfig, load_config
from fredfusion.spec import DEFAULT_INPUT_HW, FUSIONS, MODALITIES, SIZES


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion bench``."""
    p = sub.add_parser(
        "bench",
        help="measure store read, augment, model step, end-to-end and eval rates; name the bottleneck",
    )
    flags.add_data(p)
    p.add_argument("--modality", choices=MODALITIES, default="dual", help="default: dual")
    p.add_argument("--model", choices=tuple(SIZES), default="s", help="model size (default: s)")
    p.add_argument("--fusion", choices=FUSIONS, default="concat", help="dual models (default: concat)")
    flags.add_batch(p, 32)
    p.add_argument("--eval-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--steps", type=int, default=20, help="timed iterations per part")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before each part")
    flags.add_input_shape(p, default=list(DEFAULT_INPUT_HW), help="network input H W (default: 384 640)")
    flags.add_workers(p, 2, "loader worker processes")
    flags.add_device(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    flags.add_out(p, Path("runs/bench"), "folder of bench.json (default: runs/bench)")
    p.add_argument(
        "--skip", nargs="+", default=[], metavar="PART", help="parts to skip: read augment step train eval"
    )
    flags.add_seed(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.set_defaults(func=run)


FLAGS = {
    "data": "--data",
    "modality": "--modality",
    "model": "--model",
    "fusion": "--fusion",
    "input_shape": "--input-shape",
    "unfreeze_batch_size": "--batch",
    "num_workers": "--workers",
    "device": "--device",
    "compile": "--compile",
    "seed": "--seed",
}
"""The TrainConfig field each bench flag sets."""


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the bench flags, validated by the config; an invalid value is a ConfigError
    naming the flag (``bench: --batch must be >= 1, got 0``)."""
    values = {field: getattr(args, flag.lstrip("-").replace("-", "_")) for field, flag in FLAGS.items()}
    values["data"] = str(values["data"])
    try:
        return load_config(overrides=values)
    except ConfigError as exc:
        text = str(exc).removesuffix(" in command line")
        field = text.split(":")[0].split(" ")[0]
        flag = FLAGS.get(field, field)
        raise ConfigError(f"bench: {flag}{text[len(field) :].removeprefix(':')}") from None


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table."""
    from fredfusion.bench import run_bench

    run_bench(
        config_from_args(args),
        steps=args.steps,
        warmup=args.warmup,
        out=args.out,
        skip=args.skip,
        eval_batch=args.eval_batch,
        threads=args.threads,
    )
    return 0
