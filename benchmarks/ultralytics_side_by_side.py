"""Ultralytics YOLOv8 next to fredfusion: training images/s and mAP50 on the same data, device and process.

The prepared sample (``--data``, or a synthetic one generated with ``fredfusion.data.synth`` and
prepared into a temporary folder) is exported to the YOLO format from the RGB frames of the frame
store (``OUT/yolo/``: ``images/{train,val}/<id>.jpg``, ``labels/{train,val}/<id>.txt`` with normalised
``class cx cy w h``, ``data.yaml``). Both splits hold the true RGB/Event pairs only, so Ultralytics
and every fredfusion run (dual and rgb, ``pairs: dual``) train and validate on the same images.
Ultralytics YOLOv8 (built from its yaml: random init, nothing downloaded) and fredfusion train for
the same number of epochs at the same width, batch, device, workers and torch CPU threads. Reported:
training images/s of each (training batches only: from Ultralytics' epoch start/end callbacks, from
fredfusion's per-epoch ``pairs_per_s`` in results.csv; one dual sample = one RGB/Event pair), the
ratio fredfusion / Ultralytics, and mAP50 on the val split (fredfusion: its own evaluator;
Ultralytics: its val metrics on the exported val split). Ultralytics gets fredfusion's default
augmentation (Mosaic 0.5, MixUp 0.5 per image, for the first 70% of the epochs; same scale,
translate, flip and HSV gains) and the same ``--optimizer`` choice (``auto``, the default, is
AdamW at lr 0.002 in both tools for runs of at most 10,000 steps; beyond, fredfusion picks SGD and
Ultralytics 8.4 MuSGD); otherwise each tool keeps its own recipe (schedule, warm-up, loss).
Ultralytics trains square ``imgsz x imgsz`` letterboxed inputs, fredfusion 16:9 ``H x imgsz`` ones
(its training shape; H = imgsz * 9/16 rounded to 32).

Installing Ultralytics (benchmark only; the package never imports it)::

    pip install --no-deps "ultralytics>=8.3" ultralytics-thop polars psutil

Why ``--no-deps``: ``pip install ultralytics`` (8.4.190) also installs ``opencv-python``, which
writes the same ``cv2`` package folder as the project's ``opencv-python-headless``. With both at
5.0.0.93 ``import cv2`` and ``tests/data`` still passed, but only because the versions happen to
match: a later upgrade of either leaves mixed binaries in one ``cv2`` folder and uninstalling
either removes files the other needs. Ultralytics trains and validates with headless OpenCV;
``ultralytics-platform`` and ``nvidia-ml-py`` (its other dependencies) are not needed here.

Offline: before Ultralytics is imported ``YOLO_OFFLINE=1`` is set and ``YOLO_CONFIG_DIR`` points
into ``--out`` (its settings file goes there, with sync/telemetry off), a local font is placed
there as ``Arial.ttf`` (its dataset check otherwise asks the network for one), ``plots=False``,
and on CUDA ``amp="bf16"`` (as fredfusion) skips the AMP check that downloads a checkpoint.

Usage::

    python benchmarks/ultralytics_side_by_side.py --device cuda --model s --imgsz 640 --batch 32 \\
        --epochs 10 --workers 8 --out runs/side_by_side          # generates the synthetic sample
    python benchmarks/ultralytics_side_by_side.py --data datasets/fred_coco ...
    python benchmarks/ultralytics_side_by_side.py --ci --out /tmp/sbs   # CI size, CPU, seconds

Writes ``OUT/side_by_side.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import torch
import yaml

from fredfusion.bench import environment, torch_threads
from fredfusion.data.dataset import PreparedDataset
from fredfusion.files import write_json_atomic

INSTALL_HINT = 'pip install --no-deps "ultralytics>=8.3" ultralytics-thop polars psutil'
CI_SIZE = {
    "sequences": 5,
    "frames": 16,
    "width": 320,
    "height": 180,
    "imgsz": 64,
    "epochs": 1,
    "batch": 4,
    "model": "n",
    "workers": 0,
    "modalities": ["dual"],
}


# ------------------------------------------------------------------------------------ YOLO export
def yolo_label_lines(annotations: Sequence[dict[str, Any]], width: float, height: float) -> list[str]:
    """``0 cx cy w h`` lines (normalised to the image size) for COCO ``[x, y, w, h]`` boxes.

    Boxes are clipped to the image; empty ones (before or after clipping) are dropped.
    """
    lines = []
    for ann in annotations:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            continue
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"0 {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return lines


def export_yolo(
    prepared: Path,
    out: Path,
    splits: Sequence[str] = ("train", "val"),
    pairs: str = "dual",
    quality: int = 95,
    chunk: int = 64,
) -> dict[str, Any]:
    """Write the RGB frames of ``splits`` (from the frame store) and their boxes in the YOLO format.

    Layout: ``out/images/<split>/<image id>.jpg``, ``out/labels/<split>/<image id>.txt`` (one
    ``0 cx cy w h`` line per box, normalised to the COCO image size; empty for background frames)
    and ``out/data.yaml``. ``pairs`` selects the images as ``PreparedDataset`` does. Returns the image
    count per split and the path of data.yaml.
    """
    prepared, out = Path(prepared), Path(out)
    counts: dict[str, Any] = {}
    for split in splits:
        ds = PreparedDataset(prepared, split, modality="rgb", pairs=pairs)
        if len(ds) == 0:
            raise ValueError(f"{ds.path}: no images with RGB frames (pairs={pairs}) to export")
        img_dir, lbl_dir = out / "images" / split, out / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        anns: dict[int, list[dict[str, Any]]] = {}
        for ann in ds.coco.get("annotations") or []:
            anns.setdefault(int(ann["image_id"]), []).append(ann)
        sizes = {int(im["id"]): (float(im["width"]), float(im["height"])) for im in ds.images}
        for start in range(0, len(ds), chunk):
            ids = ds.ids[start : start + chunk]
            frames = ds.load(ids, ("rgb",)).rgb
            for image_id, frame in zip(ids.tolist(), frames):
                ok, buf = cv2.imencode(
                    ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
                )
                if not ok:
                    raise OSError(f"could not encode image {image_id} of {ds.path} as JPEG")
                (img_dir / f"{image_id}.jpg").write_bytes(buf.tobytes())
                lines = yolo_label_lines(anns.get(image_id, []), *sizes[image_id])
                (lbl_dir / f"{image_id}.txt").write_text("".join(line + "\n" for line in lines))
        counts[split] = len(ds)
    data_yaml = out / "data.yaml"
    spec = {"path": str(out.resolve()), "names": {0: "drone"}}
    spec.update({split: f"images/{split}" for split in splits})
    data_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    counts["data_yaml"] = str(data_yaml)
    return counts


# --------------------------------------------------------------------------------------- helpers
def _harmonic(rates: Sequence[float]) -> float | None:
    """Mean rate of equally sized epochs (total images / total time)."""
    rates = [float(r) for r in rates if r and r > 0]
    return len(rates) / sum(1.0 / r for r in rates) if rates else None


def _device(requested: str) -> torch.device:
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input_hw(imgsz: int) -> tuple[int, int]:
    """fredfusion's 16:9 input for a width (height rounded to a multiple of 32, at least 32)."""
    return max(32, round(imgsz * 9 / 16 / 32) * 32), imgsz


def ultralytics_available() -> bool:
    """Whether ``import ultralytics`` would find the package (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ultralytics") is not None


# ---------------------------------------------------------------------------------- fredfusion
def train_fredfusion(
    prepared: Path,
    modality: str,
    model: str,
    epochs: int,
    batch: int,
    imgsz: int,
    device: torch.device,
    workers: int,
    out: Path,
    seed: int = 0,
    log: Callable[[str], None] = print,
    arch: str = "yolov8",
    optimizer: str = "auto",
) -> dict[str, Any]:
    """Train fredfusion with its Trainer on the true pairs; training images/s and val mAP50."""
    import csv

    from fredfusion.config import load_config
    from fredfusion.engine.trainer import Trainer

    input_hw = _input_hw(imgsz)
    cfg = load_config(
        overrides={
            "data": str(prepared),
            "modality": modality,
            "model": model,
            "arch": arch,
            "optimizer": optimizer,
            "pairs": "dual",
            "input_shape": list(input_hw),
            "freeze_train": False,
            "unfreeze_epoch": epochs,
            "unfreeze_batch_size": batch,
            "eval_period": epochs,
            "save_dir": str(out),
            "name": modality,
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "device": str(device),
            "seed": seed,
            "save_period": 0,
        }
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=log)
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    with (trainer.run_dir / "results.csv").open(newline="") as handle:
        rates = [float(row["pairs_per_s"]) for row in csv.DictReader(handle) if row.get("pairs_per_s")]
    n = len(PreparedDataset(prepared, "train", modality=modality, pairs="dual"))
    per_epoch = (n // batch) * batch if n >= batch else n
    return {
        "tool": "fredfusion",
        "model": f"{modality} YOLO-{model} ({arch})",
        "input_hw": list(input_hw),
        "epochs": epochs,
        "train_images_per_epoch": per_epoch,
        "epoch_images_per_s": rates,
        "images_per_s": _harmonic(rates),
        "images_per_s_steady": _harmonic(rates[1:]) if len(rates) > 1 else None,
        "mAP50": summary.get("mAP50"),
        "mAP50_95": summary.get("mAP50_95"),
        "wall_s": wall,
    }


# --------------------------------------------------------------------------------- ultralytics
def _prepare_ultralytics_env(config_dir: Path) -> None:
    """Offline settings that must be in place before ``import ultralytics`` (see module docstring)."""
    import matplotlib

    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ["YOLO_OFFLINE"] = "1"
    font_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (font_dir / name).exists() and font.is_file():
            shutil.copyfile(font, font_dir / name)


def _fredfusion_augmentation(epochs: int) -> dict[str, Any]:
    """Ultralytics augmentation arguments that match fredfusion's defaults: Mosaic and MixUp with the
    same per-image probabilities, switched off for the epochs fredfusion trains without them."""
    from fredfusion.config import TrainConfig

    cfg = TrainConfig()
    special = math.ceil(cfg.special_aug_ratio * epochs)  # epochs with Mosaic/MixUp in fredfusion
    return {
        "mosaic": cfg.mosaic_prob if cfg.mosaic else 0.0,
        "mixup": cfg.mixup_prob if cfg.mixup else 0.0,
        "close_mosaic": max(epochs - special, 0),
        "translate": cfg.translate,
        "scale": cfg.scale,
        "fliplr": cfg.fliplr,
        "hsv_h": cfg.hsv_h,
        "hsv_s": cfg.hsv_s,
        "hsv_v": cfg.hsv_v,
    }


def train_ultralytics(
    data_yaml: Path,
    model: str,
    epochs: int,
    batch: int,
    imgsz: int,
    device: torch.device,
    workers: int,
    out: Path,
    threads: int,
    seed: int = 0,
    optimizer: str = "auto",
) -> dict[str, Any]:
    """Train Ultralytics YOLOv8<model> from its yaml; training images/s and val mAP50."""
    _prepare_ultralytics_env(out / "config")
    from ultralytics import YOLO, settings

    with contextlib.suppress(Exception):  # settings keys differ between versions
        settings.update(
            {k: False for k in ("sync", "hub", "tensorboard", "wandb", "mlflow") if k in settings}
        )

    net = YOLO(f"yolov8{model}.yaml")
    spans: list[float] = []
    start: list[float] = []

    def keep_threads(_owner: Any) -> None:
        # Ultralytics sets min(8, cpus - 1) CPU threads whenever it picks a CPU device (training and
        # the final validation): put the requested count back after each pick
        torch.set_num_threads(threads)

    def on_epoch_start(_trainer: Any) -> None:
        _sync(device)
        start.append(time.perf_counter())

    def on_epoch_end(_trainer: Any) -> None:
        _sync(device)
        spans.append(time.perf_counter() - start[-1])

    net.add_callback("on_train_start", keep_threads)
    net.add_callback("on_val_start", keep_threads)
    net.add_callback("on_train_epoch_start", on_epoch_start)
    net.add_callback("on_train_epoch_end", on_epoch_end)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    aug = _fredfusion_augmentation(epochs)
    t0 = time.perf_counter()
    net.train(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device="cpu" if device.type == "cpu" else str(device.index or 0),
        workers=workers,
        project=str(out.resolve()),
        name="train",
        exist_ok=True,
        seed=seed,
        deterministic=False,
        pretrained=False,
        optimizer={"sgd": "SGD", "adamw": "AdamW"}.get(optimizer, optimizer),
        plots=False,
        val=False,
        amp="bf16" if bf16 else device.type == "cuda",
        verbose=False,
        **aug,
    )
    wall = time.perf_counter() - t0
    trainer = net.trainer
    per_epoch = len(trainer.train_loader.dataset)
    rates = [per_epoch / s for s in spans if s > 0]
    metrics = dict(getattr(trainer, "metrics", None) or {})
    return {
        "tool": "ultralytics",
        "model": f"YOLOv8{model}",
        "input_hw": [imgsz, imgsz],
        "epochs": epochs,
        "train_images_per_epoch": per_epoch,
        "epoch_images_per_s": rates,
        "images_per_s": _harmonic(rates),
        "images_per_s_steady": _harmonic(rates[1:]) if len(rates) > 1 else None,
        "mAP50": metrics.get("metrics/mAP50(B)"),
        "mAP50_95": metrics.get("metrics/mAP50-95(B)"),
        "amp": "bf16" if bf16 else ("fp16" if device.type == "cuda" else "fp32"),
        "augmentation": aug,
        "wall_s": wall,
    }


# ---------------------------------------------------------------------------------------- report
def _rate(run: dict[str, Any]) -> float | None:
    return run.get("images_per_s_steady") or run.get("images_per_s")


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """images/s of every fredfusion run divided by Ultralytics' (steady epochs when there are several)."""
    base = runs.get("ultralytics")
    out: dict[str, float] = {}
    if not base or not _rate(base):
        return out
    for name, run in runs.items():
        if name != "ultralytics" and _rate(run):
            out[f"{name}/ultralytics"] = float(_rate(run)) / float(_rate(base))
    return out


def format_report(report: dict[str, Any]) -> str:
    """The printed table: one row per run, then the ratios."""

    def num(x: Any, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    cfg = report["config"]
    lines = [
        f"side by side: {cfg['epochs']} epochs, batch {cfg['batch']}, width {cfg['imgsz']}, "
        f"device {cfg['device']}, {cfg['workers']} workers, {cfg['threads']} CPU threads; "
        f"{report['export']['train']} train / {report['export']['val']} val images",
        f"{'run':<22} {'input':>9} {'images/s':>10} {'mAP50':>7} {'mAP50:95':>9} {'wall s':>8}",
    ]
    for name, run in report["runs"].items():
        h, w = run["input_hw"]
        label = f"ultralytics {run['model']}" if run["tool"] == "ultralytics" else name
        lines.append(
            f"{label:<22} {f'{h}x{w}':>9} {num(_rate(run), '.1f'):>10} {num(run['mAP50'], '.4f'):>7} "
            f"{num(run['mAP50_95'], '.4f'):>9} {num(run['wall_s'], '.0f'):>8}"
        )
    for key, value in report["ratios"].items():
        lines.append(f"images/s ratio {key}: {value:.2f}x")
    return "\n".join(lines)


def _environment(device: torch.device) -> dict[str, Any]:
    env = environment(device)
    if ultralytics_available():
        from importlib.metadata import version

        with contextlib.suppress(Exception):
            env["ultralytics"] = version("ultralytics")
    return env


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the script."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="prepared folder (default: synthesise one)")
    ap.add_argument("--out", type=Path, default=Path("runs/side_by_side"))
    ap.add_argument("--model", choices=("n", "s", "m", "l", "x"), default="s")
    ap.add_argument(
        "--arch",
        choices=("yolov5", "yolov8"),
        default="yolov8",
        help="fredfusion's family (default yolov8: the same network as Ultralytics' YOLOv8)",
    )
    ap.add_argument("--modalities", nargs="+", choices=("dual", "rgb", "event"), default=["dual", "rgb"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--imgsz", type=int, default=640, help="input width (Ultralytics: square)")
    ap.add_argument("--device", default="", help="default: cuda when available, else cpu")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for both (0: as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--optimizer",
        choices=("auto", "sgd", "adamw"),
        default="auto",
        help="both tools (auto: AdamW at lr 0.002 in both for runs up to 10,000 steps)",
    )
    ap.add_argument("--sequences", type=int, default=10, help="synthetic sample: sequences")
    ap.add_argument("--frames", type=int, default=60, help="synthetic sample: RGB frames per sequence")
    ap.add_argument("--width", type=int, default=1280, help="synthetic sample: frame width")
    ap.add_argument("--height", type=int, default=720, help="synthetic sample: frame height")
    ap.add_argument("--skip-ultralytics", action="store_true", help="export and fredfusion only")
    ap.add_argument(
        "--ci", action="store_true", help="CI size: " + ", ".join(f"{k}={v}" for k, v in CI_SIZE.items())
    )
    return ap


def _check(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch", "imgsz"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.imgsz % 32:
        raise SystemExit(f"--imgsz must be a multiple of 32, got {args.imgsz}")
    if args.data is not None and not (args.data / "annotations" / "instances_train.json").is_file():
        raise SystemExit(
            f"{args.data} is not a prepared folder (no annotations/instances_train.json); "
            f"run `fredfusion prepare --out {args.data}` or leave --data out to synthesise a sample"
        )
    if not args.skip_ultralytics and not ultralytics_available():
        raise SystemExit(f"ultralytics is not installed: {INSTALL_HINT} (or pass --skip-ultralytics)")


def _write_report(out: Path, report: dict[str, Any]) -> None:
    report["ratios"] = ratios(report["runs"])
    write_json_atomic(out / "side_by_side.json", report, indent=2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; print the table and write ``OUT/side_by_side.json``."""
    args = build_parser().parse_args(argv)
    if args.ci:
        for key, value in CI_SIZE.items():
            setattr(args, key, value)
    _check(args)
    device = _device(args.device)
    threads = args.threads or torch.get_num_threads()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
        # inside the thread setting: the environment records the thread count the runs use
        report: dict[str, Any] = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": _environment(device),
            "runs": {},
        }
        report["config"].update(device=str(device), threads=threads)
        prepared = args.data
        if prepared is None:
            from fredfusion.data.prepare import prepare
            from fredfusion.data.synth import write_sample

            fred = Path(tmp) / "fred"
            write_sample(
                fred,
                sequences=args.sequences,
                frames=args.frames,
                width=args.width,
                height=args.height,
                seed=args.seed,
            )
            prepared = Path(tmp) / "prepared"
            prepare(
                fred,
                prepared,
                imgsz=args.imgsz,
                workers=min(2, os.cpu_count() or 1),
                seed=args.seed,
                progress=False,
                log=lambda _m: None,
            )
        report["export"] = export_yolo(prepared, out / "yolo")
        for modality in args.modalities:
            report["runs"][f"fredfusion {modality} {args.model}"] = train_fredfusion(
                prepared,
                modality,
                args.model,
                args.epochs,
                args.batch,
                args.imgsz,
                device,
                args.workers,
                out / "fredfusion",
                seed=args.seed,
                arch=args.arch,
                optimizer=args.optimizer,
            )
            _write_report(out, report)  # a partial report survives a run that is stopped later
        if not args.skip_ultralytics:
            report["runs"]["ultralytics"] = train_ultralytics(
                Path(report["export"]["data_yaml"]),
                args.model,
                args.epochs,
                args.batch,
                args.imgsz,
                device,
                args.workers,
                out / "ultralytics",
                threads,
                seed=args.seed,
                optimizer=args.optimizer,
            )
    _write_report(out, report)
    print(format_report(report))
    print(f"wrote {out / 'side_by_side.json'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        print(f"ultralytics_side_by_side: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
