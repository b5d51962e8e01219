"""`fredfusion bench`: store read, augment, model step, end-to-end and eval rates; the bottleneck named."""

from __future__ import annotations

import argparse
from pathlib import Path

from fredfusion.commands import flags
from fredfusion.config import COMPILE_MODES, ConfigError, TrainConfig, load_config
from fredfusion.spec import ARCHS, FUSIONS, MODALITIES, SIZES

DEFAULTS_TEXT = "fits the device: {cpu} on a CPU, {gpu} on a GPU"


def _fits(cpu: object, gpu: object) -> str:
    return DEFAULTS_TEXT.format(cpu=cpu, gpu=gpu)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion bench``."""
    p = sub.add_parser(
        "bench",
        help="measure store read, augment, model step, end-to-end and eval rates; name the bottleneck",
    )
    flags.add_data(p)
    p.add_argument(
        "--modality", choices=MODALITIES, default="dual", help="what the model looks at (default: dual)"
    )
    p.add_argument(
        "--model", choices=tuple(SIZES), default=None, help=f"model size (default: {_fits('n', 's')})"
    )
    p.add_argument(
        "--fusion", choices=FUSIONS, default="concat", help="how a dual model fuses (default: concat)"
    )
    p.add_argument("--arch", choices=ARCHS, default="yolov5", help="detector family (default: yolov5)")
    flags.add_batch(
        p, None, "images per batch", _fits(16, 128) + ", halved while it does not fit the free memory"
    )
    p.add_argument(
        "--eval-batch",
        type=flags.int_at_least(1),
        default=None,
        help="images per evaluation batch (default: --batch)",
    )
    p.add_argument(
        "--steps",
        type=flags.int_at_least(1),
        default=None,
        help=f"timed iterations per part (default: {_fits(8, 20)})",
    )
    p.add_argument(
        "--warmup",
        type=flags.int_at_least(0),
        default=None,
        help=f"untimed iterations before each part (default: {_fits(2, 3)})",
    )
    flags.add_input_shape(p, help=f"network input H W (default: {_fits('192 320', '384 640')})")
    p.add_argument(
        "--workers",
        type=flags.int_at_least(0),
        default=None,
        help=f"loader worker processes (default: {_fits(0, 'up to 12')})",
    )
    flags.add_device(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model and the loss with a persistent cache; the first call of each part is "
        "timed apart (compile seconds, cache hit or miss)",
    )
    p.add_argument(
        "--compile-mode",
        "--compile_mode",
        dest="compile_mode",
        choices=COMPILE_MODES,
        default="default",
        metavar="MODE",
        help=f"torch.compile mode: {' | '.join(COMPILE_MODES)}; reduce-overhead and max-autotune record "
        "CUDA graphs (default: default)",
    )
    p.add_argument(
        "--compile-cache",
        "--compile_cache",
        dest="compile_cache",
        default="",
        metavar="DIR",
        help="folder of the persistent compile cache, as train's compile_cache (default: "
        "$FREDFUSION_CACHE/compile, else $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/fredfusion/compile)",
    )
    flags.add_out(p, Path("runs/bench"), "folder of bench.json (default: runs/bench)")
    p.add_argument(
        "--skip", nargs="+", default=[], metavar="PART", help="parts to skip: read augment step train eval"
    )
    flags.add_seed(p)
    p.add_argument(
        "--threads", type=flags.int_at_least(0), default=0, help="torch CPU threads (0: leave as is)"
    )
    p.set_defaults(func=run)


FLAGS = {
    "data": "--data",
    "modality": "--modality",
    "model": "--model",
    "fusion": "--fusion",
    "arch": "--arch",
    "input_shape": "--input-shape",
    "unfreeze_batch_size": "--batch",
    "num_workers": "--workers",
    "device": "--device",
    "compile": "--compile",
    "compile_mode": "--compile-mode",
    "compile_cache": "--compile-cache",
    "seed": "--seed",
}
"""The TrainConfig field each bench flag sets."""


def with_device_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the flags not given set to ``bench.device_defaults`` of the device asked for."""
    from fredfusion.bench import device_defaults
    from fredfusion.engine.runtime import pick_device

    defaults = device_defaults(pick_device(args.device))
    values = dict(vars(args))
    for flag, key in (("model", "model"), ("batch", "batch"), ("steps", "steps"), ("warmup", "warmup")):
        if values[flag] is None:
            values[flag] = defaults[key]
    if values["workers"] is None:
        values["workers"] = defaults["workers"]
    if values["input_shape"] is None:
        values["input_shape"] = list(defaults["input_hw"])
    return argparse.Namespace(**values)


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

    full = with_device_defaults(args)
    run_bench(
        config_from_args(full),
        steps=full.steps,
        warmup=full.warmup,
        out=args.out,
        skip=args.skip,
        eval_batch=args.eval_batch,
        threads=args.threads,
        fit_batch=args.batch is None,
    )
    return 0
