"""The main job on the built-in synthetic sample: generate, prepare, train, evaluate, print mAP."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fredfusion.commands import flags
from fredfusion.config import TrainConfig, load_config
from fredfusion.engine.runtime import pick_device
from fredfusion.spec import ARCHS, MODALITIES, SIZES, input_hw_for_width


def demo_config(
    prepared: Path,
    out: Path,
    modality: str,
    model: str,
    epochs: int,
    imgsz: int,
    device: str,
    seed: int,
    arch: str = "yolov5",
) -> TrainConfig:
    """The demo's training recipe on ``prepared``: AdamW (``optimizer: auto``) for the short schedule,
    no freeze phase, evaluation every 5 epochs; batch 16 and no loader workers on a CPU."""
    gpu = pick_device(device).type == "cuda"
    return load_config(
        overrides={
            "data": str(prepared),
            "modality": modality,
            "model": model,
            "arch": arch,
            "input_shape": list(input_hw_for_width(imgsz)),
            "freeze_train": False,
            "unfreeze_epoch": epochs,
            "unfreeze_batch_size": 16 if not gpu else 32,
            "optimizer": "auto",  # AdamW for this short schedule (see docs/DESIGN.md)
            "warmup_epochs": 1,
            "eval_period": 5,
            "save_dir": str(out / "runs"),
            "name": modality,
            "num_workers": 0 if not gpu else 4,
            "persistent_workers": False,
            "device": device,
            "seed": seed,
            "mixup_prob": 0.2,
            "save_period": 0,
        }
    )


def train_and_test(cfg: TrainConfig, out: Path) -> dict:
    """Train with ``cfg``, then evaluate its best.pth on the test split into ``out``."""
    from fredfusion.commands.eval import evaluate_checkpoints
    from fredfusion.engine.trainer import Trainer

    trainer = Trainer(cfg)
    summary = trainer.fit()
    print("[4/4] eval on the test split")
    results = evaluate_checkpoints(
        [trainer.run_dir / "best.pth"],
        data=Path(cfg.data),
        split="test",
        batch=32,
        device=cfg.device,
        out=out,
    )
    return {"train": summary, "test": next(iter(results.values())).metrics}


def run_demo(
    out: Path = Path("runs/demo"),
    sequences: int = 10,
    frames: int = 60,
    epochs: int | None = None,
    modality: str = "dual",
    model: str = "n",
    device: str = "",
    imgsz: int | None = None,
    seed: int = 0,
    codec: str = "auto",
    arch: str = "yolov5",
) -> dict:
    """Run synth -> prepare -> train -> eval under `out`.

    Returns ``{"train": the trainer's summary (best val score and its epoch), "test": the test-split
    metrics of best.pth}``.
    """
    from fredfusion.data.prepare import prepare
    from fredfusion.data.synth import write_sample

    gpu = pick_device(device).type == "cuda"
    epochs = epochs or (60 if gpu else 7)
    imgsz = imgsz or (640 if gpu else 320)
    out = Path(out)
    t0 = time.perf_counter()
    fred_root = out / "fred"
    print(f"[1/4] synth: {sequences} sequences x {frames} frames -> {fred_root}")
    write_sample(fred_root, sequences=sequences, frames=frames, seed=seed)
    print(f"[2/4] prepare -> {out / 'prepared'}")
    prepared = out / "prepared"
    prepare(
        fred_root, prepared, split="canonical", imgsz=imgsz, workers=2, seed=seed, progress=False, codec=codec
    )
    cfg = demo_config(prepared, out, modality, model, epochs, imgsz, device, seed, arch)
    family = "" if arch == "yolov5" else f" ({arch})"
    print(f"[3/4] train: {modality} YOLO-{model}{family}, {epochs} epochs at {imgsz}x{cfg.input_shape[0]}")
    result = train_and_test(cfg, out / "eval")
    metrics = result["test"]
    print(
        f"demo done in {time.perf_counter() - t0:.0f} s: test mAP50 {metrics['mAP50']:.4f}  "
        f"mAP50:95 {metrics['mAP50_95']:.4f}"
    )
    return result


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion demo``."""
    p = sub.add_parser(
        "demo", help="the whole job on the built-in synthetic sample: synth, prepare, train, eval"
    )
    flags.add_out(
        p, Path("runs/demo"), "folder of everything: sample, prepared folder, runs, report (runs/demo)"
    )
    p.add_argument("--sequences", type=int, default=10, help="synthetic sequences (default: 10)")
    p.add_argument("--frames", type=int, default=60, help="RGB frames per sequence (default: 60)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 7 on CPU, 60 on GPU)")
    p.add_argument(
        "--modality", choices=MODALITIES, default="dual", help="what the model looks at (default: dual)"
    )
    p.add_argument("--model", choices=tuple(SIZES), default="n", help="model size (default: n)")
    p.add_argument("--codec", default="auto", help="frame store codec, as for prepare (default: auto)")
    p.add_argument("--arch", choices=ARCHS, default="yolov5", help="detector family (default: yolov5)")
    p.add_argument(
        "--imgsz",
        type=flags.int_at_least(32),
        default=None,
        metavar="W",
        help="frame store and input width; the height follows at 16:9 (default: 320 on CPU, 640 on GPU)",
    )
    flags.add_device(p)
    flags.add_seed(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed flags."""
    run_demo(
        out=args.out,
        sequences=args.sequences,
        frames=args.frames,
        epochs=args.epochs,
        modality=args.modality,
        model=args.model,
        device=args.device,
        imgsz=args.imgsz,
        seed=args.seed,
        codec=args.codec,
        arch=args.arch,
    )
    return 0
