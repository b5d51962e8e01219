"""The `fredfusion` command: synth, prepare, train, eval, predict, show, export, demo, bench."""

from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from fredfusion.config import (
    ALIASES,
    CHOICES,
    FIELDS,
    ConfigError,
    TrainConfig,
    load_config,
    parse_bool,
)
from fredfusion.spec import DEFAULT_INPUT_HW, FUSIONS, MODALITIES, NMS_IOU, SIZES

DEFAULT_FRED_ROOT = "/mnt/data/datasets/fred"


def default_fred_root() -> str:
    """$FRED_ROOT or the conventional mount point."""
    return os.environ.get("FRED_ROOT", DEFAULT_FRED_ROOT)


# ---------------------------------------------------------------------------------------------- synth
def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic sample in the exact FRED layout")
    p.add_argument("--out", type=Path, required=True, help="folder to write the sequences into")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--frames", type=int, default=90, help="RGB frames per sequence")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=("flat", "official"),
        default="flat",
        help="flat: <id>/ side by side; official: train/<id>/ and test/<id>/ with real FRED ids",
    )
    p.add_argument("--workers", type=int, default=None, help="threads writing sequences (default: CPU cores)")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
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


# -------------------------------------------------------------------------------------------- prepare
def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="index, pair, split a FRED tree; write COCO files and the frame store")
    p.add_argument("--fred-root", type=Path, default=None, help=f"default: $FRED_ROOT or {DEFAULT_FRED_ROOT}")
    p.add_argument("--out", type=Path, default=Path("datasets/fred_coco"))
    p.add_argument("--split", default="canonical", help="canonical | challenging | a split file")
    p.add_argument("--stride", type=int, default=1, help="keep every K-th frame of each sequence")
    p.add_argument("--tolerance-ms", type=float, default=33.0, help="max |dt| of an RGB/Event pair")
    p.add_argument("--imgsz", type=int, default=640, help="frame store width (16:9 height follows)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from fredfusion.data.prepare import prepare

    root = args.fred_root or Path(default_fred_root())
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


# ---------------------------------------------------------------------------------------------- train
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


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an rgb | event | dual detector on a prepared folder")
    add_train_flags(p)
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config and the flags given on the command line."""
    skip = {"func", "config", "command"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    return load_config(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    from fredfusion.engine.trainer import Trainer

    cfg = config_from_args(args)
    summary = Trainer(cfg).fit()
    if summary.get("mAP50") is not None:
        print(
            f"final: mAP50 {summary['mAP50']:.4f}  mAP50:95 {summary['mAP50_95']:.4f}  "
            f"(best epoch {summary['best_epoch']}, run {summary['run_dir']})"
        )
    return 0


# ----------------------------------------------------------------------------------------------- eval
def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO mAP of one or more checkpoints on a split, with breakdowns")
    p.add_argument("--weights", type=Path, nargs="+", required=False, help="checkpoint(s) (best.pth)")
    p.add_argument("--compare", type=Path, nargs="+", default=None, help="several checkpoints side by side")
    p.add_argument("--data", type=Path, default=Path("datasets/fred_coco"))
    p.add_argument("--split", default="test")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=NMS_IOU, help=f"NMS IoU threshold (default {NMS_IOU})")
    p.add_argument("--input-shape", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--device", default="")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=None, help="report folder (default: runs/eval/<checkpoint name>)"
    )
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from fredfusion.eval.run import evaluate_checkpoints

    weights = list(args.weights or []) + list(args.compare or [])
    if not weights:
        raise ConfigError("eval: give --weights W (or --compare W1 W2 ...)")
    evaluate_checkpoints(
        weights,
        data=args.data,
        split=args.split,
        batch=args.batch,
        conf=args.conf,
        iou=args.iou,
        input_hw=tuple(args.input_shape) if args.input_shape else None,
        device=args.device,
        workers=args.workers,
        out=args.out,
    )
    return 0


# ----------------------------------------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole job on the built-in synthetic sample: synth, prepare, train, eval"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--sequences", type=int, default=10)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--epochs", type=int, default=None, help="default: 7 on CPU, 60 on GPU")
    p.add_argument("--modality", choices=MODALITIES, default="dual")
    p.add_argument("--model", choices=tuple(SIZES), default="n")
    p.add_argument("--device", default="")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from fredfusion.demo import run_demo as demo

    demo(
        out=args.out,
        sequences=args.sequences,
        frames=args.frames,
        epochs=args.epochs,
        modality=args.modality,
        model=args.model,
        device=args.device,
    )
    return 0


# ---------------------------------------------------------------------------------------------- bench
def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure store read, augment, model step, end-to-end and eval rates; name the bottleneck",
    )
    p.add_argument("--data", type=Path, default=Path("datasets/fred_coco"), help="prepared folder")
    p.add_argument("--modality", choices=MODALITIES, default="dual")
    p.add_argument("--model", choices=tuple(SIZES), default="s")
    p.add_argument("--fusion", choices=FUSIONS, default="concat")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--steps", type=int, default=20, help="timed iterations per part")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before each part")
    p.add_argument("--input-shape", type=int, nargs=2, default=list(DEFAULT_INPUT_HW), metavar=("H", "W"))
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder of bench.json")
    p.add_argument(
        "--skip", nargs="+", default=[], metavar="PART", help="parts to skip: read augment step train eval"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from fredfusion.bench import run_bench as bench

    bench(
        args.data,
        modality=args.modality,
        model=args.model,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        input_hw=tuple(args.input_shape),
        workers=args.workers,
        device=args.device,
        compile=args.compile,
        out=args.out,
        skip=args.skip,
        eval_batch=args.eval_batch,
        fusion=args.fusion,
        seed=args.seed,
        threads=args.threads,
    )
    return 0


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fredfusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from fredfusion import export, predict, show

    for add in (
        add_synth,
        add_prepare,
        add_train,
        add_eval,
        predict.add_parser,
        show.add_parser,
        export.add_parser,
        add_demo,
        add_bench,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fredfusion` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"fredfusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
