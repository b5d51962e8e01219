"""`fredfusion ablate`: train variants (modalities, fusions, options, seeds) with one recipe on one
prepared folder, evaluate each on the same true pairs, write one table (Markdown, CSV, LaTeX).

The plan, its checks, resuming and the tables are ``fredfusion.ablation``; this module builds the
recipe, trains (``engine.trainer``), evaluates (``commands.eval``) and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fredfusion import ablation
from fredfusion.commands import flags
from fredfusion.config import ConfigError, TrainConfig, apply_overrides, load_yaml
from fredfusion.engine.runtime import pick_device
from fredfusion.spec import ARCHS, SIZES, input_hw_for_width

METRIC_KEYS = ("mAP50_95", "mAP50", "mAP75", "APs", "APm", "AR100", "images")
"""The overall numbers a run's result.json keeps (fractions; ``images`` a count)."""


def recipe(args: argparse.Namespace, file_recipe: dict[str, Any], log=print) -> TrainConfig:
    """The one recipe of every variant: the demo's (YOLO-n, 16:9 input 320 wide on a CPU / 640 on a GPU,
    ``optimizer: auto``, 7 / 60 epochs) <- ``--config`` <- the variants file's ``recipe`` <- the flags
    given. Keys the ablation sets itself (data, seed, run folder, ...) are dropped from the files."""
    from fredfusion.commands.demo import demo_config

    gpu = pick_device(args.device).type == "cuda"
    epochs = args.epochs or (60 if gpu else 7)
    imgsz = args.imgsz or (640 if gpu else 320)
    model, arch = args.model or "n", args.arch or "yolov5"
    cfg = demo_config(args.data, args.out, "dual", model, epochs, imgsz, args.device, 0, arch)
    sources = [(str(args.config), load_yaml(args.config))] if args.config else []
    if file_recipe:
        sources.append((f"{args.variants_file} recipe", file_recipe))
    for source, values in sources:
        dropped = [k for k in values if k in (*ablation.RESERVED, "out", "modality")]
        if dropped:
            log(f"recipe: {', '.join(dropped)} from {source} ignored (the ablation sets them)")
        cfg = apply_overrides(cfg, {k: v for k, v in values.items() if k not in dropped}, source=source)
    given = {
        "unfreeze_epoch": args.epochs,
        "model": args.model,
        "arch": args.arch,
        "input_shape": list(input_hw_for_width(args.imgsz)) if args.imgsz else None,
        "batch": args.batch,
    }
    return apply_overrides(cfg, {k: v for k, v in given.items() if v is not None}, source="command line")


def train_run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) one run; the trainer's summary."""
    from fredfusion.engine.trainer import Trainer

    return Trainer(cfg).fit()


def _evaluator(args: argparse.Namespace, cfg: TrainConfig) -> ablation.Evaluate:
    """Evaluation of one checkpoint on the true pairs of ``--split`` with its report (commands.eval)."""
    from fredfusion.commands.eval import evaluate_checkpoints

    def evaluate(checkpoint: Path, folder: Path) -> dict[str, Any]:
        results = evaluate_checkpoints(
            [checkpoint],
            data=args.data,
            split=args.split,
            batch=cfg.eval_batch_size,
            iou=cfg.nms_iou,
            device=args.device,
            out=folder,
        )
        metrics = next(iter(results.values())).metrics
        saved = json.loads((folder / "metrics.json").read_text())
        return {"metrics": {k: metrics.get(k) for k in METRIC_KEYS}, "conditions": saved.get("conditions")}

    return evaluate


def _merger(args: argparse.Namespace, cfg: TrainConfig) -> ablation.MergeLate:
    """Late fusion of two evaluated runs from their detections.json files, with the same report."""
    from fredfusion.commands.eval import report_result
    from fredfusion.data.dataset import PreparedDataset
    from fredfusion.eval.evaluator import EvalResult, restrict_gt
    from fredfusion.eval.late_fusion import late_fusion

    def merge(rgb: Path, event: Path, folder: Path) -> dict[str, Any]:
        dataset = PreparedDataset(args.data, args.split, modality="dual", pairs="dual")
        gt = restrict_gt(dataset.coco, dataset.ids)
        single = [EvalResult({}, json.loads((f / "detections.json").read_text()), gt) for f in (rgb, event)]
        print(f"late fusion of {rgb} and {event} on {len(dataset)} {args.split} pairs")
        result = late_fusion(*single, iou=cfg.nms_iou)
        parts = report_result(result, dataset, folder)
        metrics = {k: result.metrics.get(k) for k in METRIC_KEYS}
        return {"metrics": metrics, "conditions": parts.get("conditions")}

    return merge


def _check_data(data: Path, split: str) -> tuple[dict[str, Any], int]:
    """The ``split`` COCO dict of ``data`` and its number of true pairs; FileNotFoundError / ConfigError
    naming the flag without a train split or without a true pair to evaluate on."""
    from fredfusion.data.dataset import PreparedDataset

    if not Path(data).is_dir():
        raise FileNotFoundError(
            f"--data {data}: prepared folder not found; run `fredfusion prepare --out {data}`"
        )
    if not (Path(data) / "annotations" / "instances_train.json").is_file():
        raise FileNotFoundError(f"--data {data}: no annotations/instances_train.json (a prepared folder?)")
    dataset = PreparedDataset(data, split, modality="dual", pairs="dual")
    if len(dataset) == 0:
        raise ConfigError(f"--split {split}: no true RGB/Event pairs to evaluate on in {data}")
    return dataset.coco, len(dataset)


def _variants(args: argparse.Namespace) -> tuple[list[ablation.Variant], list[int], dict[str, Any]]:
    """Variants (file first, then flags), seeds (flags, file, else 0) and the file's recipe."""
    variants: list[ablation.Variant] = []
    seeds, file_recipe = None, {}
    if args.variants_file is not None:
        variants, seeds, file_recipe = ablation.read_variants_file(args.variants_file)
    variants += [ablation.parse_variant(text) for text in args.variants or []]
    return variants, list(args.seeds or seeds or [0]), file_recipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion ablate``."""
    p = sub.add_parser(
        "ablate",
        help="train variants (modalities, fusions, options) over seeds with one recipe; one mAP table",
    )
    flags.add_data(p)
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="variants as MODALITY[:FUSION][+KEY=VALUE...], e.g. rgb event dual:attention "
        "dual:concat+modality_dropout=0.3 dual:concat+weights_rgb=@rgb+weights_event=@event",
    )
    p.add_argument(
        "--variants-file",
        type=Path,
        default=None,
        help="YAML / JSON file with variants, seeds and recipe keys",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default: 0)")
    p.add_argument("--config", type=Path, default=None, help="YAML of training config keys (the recipe)")
    p.add_argument(
        "--epochs", type=flags.int_at_least(1), default=None, help="epochs (default: 7 on CPU, 60 on GPU)"
    )
    p.add_argument("--model", choices=tuple(SIZES), default=None, help="model size (default: n)")
    p.add_argument("--arch", choices=ARCHS, default=None, help="detector family (default: yolov5)")
    p.add_argument(
        "--imgsz",
        type=flags.int_at_least(32),
        default=None,
        metavar="W",
        help="input width; the height follows at 16:9 (default: 320 on CPU, 640 on GPU)",
    )
    flags.add_batch(p, None, "training batch", default_text="16 on CPU, 32 on GPU")
    p.add_argument("--split", default="test", help="split every variant is evaluated on (default: test)")
    p.add_argument(
        "--checkpoint",
        choices=ablation.CHECKPOINTS,
        default="last",
        help="checkpoint evaluated (default: last)",
    )
    p.add_argument(
        "--paper",
        choices=("auto", "on", "off"),
        default="auto",
        help="rows of the FRED paper's published numbers; auto: when the data is FRED (default: auto)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check the variants and print the plan; train nothing"
    )
    flags.add_device(p)
    flags.add_out(p, Path("runs/ablate"), "folder of the runs, their evaluations and the table (runs/ablate)")
    p.set_defaults(func=run)


def _print_plan(plan: ablation.Plan, log=print) -> None:
    words = {"done": "finished (kept)", "resume": "resume from last.pth", "train": "train"}
    for r in plan.runs:
        log(f"  {r.variant.name:<40} seed {r.seed}: {words[r.status]}  {r.folder}")
    if plan.late:
        log(f"  {ablation.late_name(plan)}: merged per seed after both runs")


def run(args: argparse.Namespace) -> int:
    """Check everything, then train and evaluate what is not finished, rewriting the table after each."""
    coco, pairs = _check_data(args.data, args.split)
    variants, seeds, file_recipe = _variants(args)
    cfg = recipe(args, file_recipe)
    plan = ablation.build_plan(cfg, variants, seeds, args.out, args.checkpoint)
    title = ablation.title(plan, args.split, pairs)
    paper = ablation.paper_split(coco, args.paper)
    print(f"ablate: {len(plan.runs)} run(s) -> {plan.out}\n{title}")
    _print_plan(plan)
    if args.dry_run:
        return 0
    names = [v.name for v in plan.variants] + ([ablation.late_name(plan)] if plan.late else [])

    latest: dict[str, Any] = {}  # the table and files of the last rewrite (after every run)

    def tables(results: dict[tuple[str, int], dict]) -> None:
        columns, rows = ablation.summarize(names, results, paper)
        latest["files"] = ablation.write_tables(plan.out, columns, rows, results, title)
        latest["table"] = ablation.markdown_table(columns, rows)

    ablation.run_plan(plan, train_run, _evaluator(args, cfg), _merger(args, cfg), on_result=tables)
    print(latest["table"])
    print(f"ablate done: {', '.join(str(p) for p in latest['files'].values())}")
    return 0
