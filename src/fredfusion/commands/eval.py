"""`fredfusion eval`: evaluate checkpoints on a split, print tables, write the report folder."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fredfusion.commands import flags
from fredfusion.config import ConfigError
from fredfusion.data.dataset import PreparedDataset
from fredfusion.engine.memory import evaluation_need
from fredfusion.engine.runtime import amp_dtype_for, pick_device
from fredfusion.eval.evaluator import EvalResult, evaluate
from fredfusion.eval.late_fusion import late_fusion
from fredfusion.eval.report import breakdowns, compare_table, format_table, write_report
from fredfusion.model.weights import input_hw_of, load_model
from fredfusion.spec import NMS_IOU

#: ``--batch`` when not given: evaluation keeps no activations, and a GPU runs at its pace at large batches.
CPU_BATCH, GPU_BATCH = 32, 128
_LATE_RULE = "merged: a detection overlapping a better kept one of the other model by IoU > --iou is dropped"


def _pct(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{100 * value:.2f}"


def evaluate_checkpoints(
    weights: Sequence[Path],
    data: Path,
    split: str = "test",
    batch: int | None = None,
    conf: float = 0.001,
    iou: float = NMS_IOU,
    input_hw: tuple[int, int] | None = None,
    device: str = "",
    workers: int = 0,
    out: Path | None = None,
    gallery: int = 8,
    log=print,
) -> dict[str, EvalResult]:
    """Evaluate each checkpoint on the true RGB+Event pairs of `split`; write one report folder each.
    ``batch`` None: :data:`GPU_BATCH` on a GPU, :data:`CPU_BATCH` elsewhere."""
    dev = pick_device(device)
    batch = default_batch(dev, batch)
    for path in weights:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--weights {path}: checkpoint not found")
    if not Path(data).is_dir():
        raise FileNotFoundError(
            f"--data {data}: prepared folder not found; run `fredfusion prepare --out {data}`"
        )
    results: dict[str, EvalResult] = {}
    names = _unique_names([Path(w) for w in weights])
    for name, path in zip(names, weights):
        if out:
            folder = Path(out) / name if len(weights) > 1 else Path(out)
        else:
            folder = Path("runs/eval") / name
        settings = dict(batch_size=batch, conf=conf, iou=iou, num_workers=workers)
        results[name] = _evaluate_one(
            Path(path), Path(data), split, input_hw, dev, settings, folder, gallery, log
        )
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if len(results) > 1:
        log(compare_table(results))
    return results


def _evaluate_one(
    path: Path,
    data: Path,
    split: str,
    input_hw: tuple[int, int] | None,
    dev: torch.device,
    settings: dict[str, Any],
    folder: Path,
    gallery: int,
    log: Callable[[str], None],
) -> EvalResult:
    """Evaluate one checkpoint (``settings``: keyword arguments of ``evaluate``), log its metrics and
    breakdowns, and write its report into ``folder``."""
    t0 = time.perf_counter()
    result, dataset = _infer(path, data, split, input_hw, dev, settings, log)
    report_result(result, dataset, folder, gallery, log, t0)
    return result


def _infer(
    path: Path,
    data: Path,
    split: str,
    input_hw: tuple[int, int] | None,
    dev: torch.device,
    settings: dict[str, Any],
    log: Callable[[str], None],
    model: torch.nn.Module | None = None,
    payload: dict[str, Any] | None = None,
) -> tuple[EvalResult, PreparedDataset]:
    """The detections and metrics of one checkpoint (or its already loaded ``model`` and ``payload``)
    on the true pairs of ``split``, after the memory check on a CPU."""
    if model is None or payload is None:
        model, payload = load_model(path, dev)
    if dev.type == "cuda":  # as training runs it; the evaluator then passes channels-last frames
        model = model.to(memory_format=torch.channels_last)
    hw = input_hw_of(payload, input_hw, str(path))
    dataset = PreparedDataset(data, split, modality=model.modality, pairs="dual")
    log(f"eval {path}: {model.modality} YOLO-{model.size} on {len(dataset)} {split} pairs at {hw[1]}x{hw[0]}")
    if dev.type == "cpu":
        batch = settings["batch_size"]
        need = evaluation_need(model, hw, batch, store_hw=dataset.store_hw, workers=settings["num_workers"])
        log(f"  {need.line()}")
        if not need.fits:
            fits = need.largest_batch(batch, 0)
            raise ConfigError(
                f"not enough memory: {need.line().removeprefix('memory: ')}; lower --batch {batch} "
                f"(about {fits} fits at {hw[0]}x{hw[1]}) or free memory"
            )
    amp = amp_dtype_for(dev, True)
    result = evaluate(model, dataset, device=dev, input_hw=hw, amp_dtype=amp, progress=True, **settings)
    return result, dataset


def report_result(
    result: EvalResult,
    dataset: PreparedDataset,
    folder: Path,
    gallery: int = 8,
    log: Callable[[str], None] = print,
    t0: float | None = None,
) -> dict[str, Any]:
    """Log an evaluation's metrics and breakdowns (per condition too) and write its report into
    ``folder``; returns the breakdowns (``conditions`` among them)."""
    m = result.metrics
    log(
        f"  mAP50 {_pct(m['mAP50'])}  mAP50:95 {_pct(m['mAP50_95'])}  AR100 {_pct(m['AR100'])}  "
        f"APs {_pct(m['APs'])}  APm {_pct(m['APm'])}"
    )
    if m.get("pairs_per_s") is not None and t0 is not None:
        log(
            f"  {m['images']} pairs, inference+NMS {m['pairs_per_s']:.1f} pairs/s, "
            f"metrics {m['metrics_s']:.2f} s, "
            f"total {time.perf_counter() - t0:.1f} s"
        )
    parts = breakdowns(result.gt, result.detections, dataset.images)
    _print_breakdowns(parts, log)
    files = write_report(folder, result, parts, dataset=dataset, gallery=gallery)
    log(f"  report: {', '.join(str(p) for p in files.values())}")
    return parts


def evaluate_late(
    rgb: Path,
    event: Path,
    data: Path,
    split: str = "test",
    batch: int | None = None,
    conf: float = 0.001,
    iou: float = NMS_IOU,
    input_hw: tuple[int, int] | None = None,
    device: str = "",
    workers: int = 0,
    out: Path | None = None,
    gallery: int = 8,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Late fusion (``eval.late_fusion``): an rgb and an event checkpoint evaluated on the same true
    pairs of ``split``, their detections merged and scored; the report goes to ``out`` (default
    runs/eval/late_<rgb name>+<event name>). A missing file, or checkpoints that are not one rgb and one
    event model, is a user mistake naming the flag."""
    dev = pick_device(device)
    batch = default_batch(dev, batch)
    checks = (("--weights", rgb, "rgb"), ("--late-event", event, "event"))
    for flag, path, _ in checks:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: checkpoint not found")
    models = {}
    for flag, path, wanted in checks:
        models[wanted] = load_model(Path(path), dev)
        modality = models[wanted][0].modality
        if modality != wanted:
            raise ConfigError(
                f"{flag} {path}: is {'a' if modality == 'dual' else 'an'} {modality} model; late fusion "
                f"merges an rgb model (--weights) "
                f"with an event model (--late-event)"
            )
    if not Path(data).is_dir():
        raise FileNotFoundError(
            f"--data {data}: prepared folder not found; run `fredfusion prepare --out {data}`"
        )
    settings = dict(batch_size=batch, conf=conf, iou=iou, num_workers=workers)
    t0 = time.perf_counter()
    single = {}
    for (name, (model, payload)), path in zip(models.items(), (rgb, event)):
        single[name], dataset = _infer(
            Path(path), Path(data), split, input_hw, dev, settings, log, model, payload
        )
        m = single[name].metrics
        log(f"  {name} alone: mAP50 {_pct(m['mAP50'])}  mAP50:95 {_pct(m['mAP50_95'])}")
    result = late_fusion(single["rgb"], single["event"], iou=iou)
    log(f"late fusion of {rgb} and {event} ({_LATE_RULE})")
    names = _unique_names([Path(rgb), Path(event)])
    folder = Path(out) if out else Path("runs/eval") / f"late_{names[0]}+{names[1]}"
    report_result(result, dataset, folder, gallery, log, t0)
    return result


def default_batch(dev: torch.device, batch: int | None) -> int:
    """``batch``, or the default batch of evaluation on ``dev`` when it is None."""
    if batch is not None:
        return int(batch)
    return GPU_BATCH if dev.type == "cuda" else CPU_BATCH


def _unique_names(paths: list[Path]) -> list[str]:
    """Readable names for checkpoints: the run folder name (dual/rgb/...), or the file stem."""
    names = [p.parent.name if p.stem in ("best", "last") and p.parent.name else p.stem for p in paths]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def _ap_table(groups: dict[str, dict[str, Any]], title: str, images: bool = True) -> str:
    """One breakdown as a table: a row per group with its images (when ``images``), boxes and AP50."""
    counts = ("images", "gt_boxes") if images else ("gt_boxes",)
    rows = [[k, *(v[c] for c in counts), _pct(v["AP50"])] for k, v in groups.items()]
    return format_table(rows, [title, *(("images",) if images else ()), "boxes", "AP50"])


def _condition_table(conditions: dict[str, dict[str, Any]]) -> str:
    """The per-condition breakdown: a row per condition with its images, boxes, AP50 and AP50:95."""
    rows = [[k, v["images"], v["boxes"], _pct(v["AP50"]), _pct(v["mAP50_95"])] for k, v in conditions.items()]
    return format_table(rows, ["condition", "images", "boxes", "AP50", "AP50:95"])


def _print_breakdowns(parts: dict, log) -> None:
    log(_ap_table(parts["per_sequence"], "sequence"))
    if parts["per_drone_model"]:
        log(_ap_table(parts["per_drone_model"], "drone model"))
    log(_ap_table(parts["by_size"]["max_side_px"], "max side px", images=False))
    log(_ap_table(parts["per_pair_status"], "pair status"))
    if parts.get("conditions"):
        log(_condition_table(parts["conditions"]))
    worst = ", ".join(f"{w['sequence_id']} ({_pct(w['AP50'])})" for w in parts["worst_sequences"])
    log(f"worst sequences by AP50: {worst or '-'}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fredfusion eval``."""
    p = sub.add_parser("eval", help="COCO mAP of one or more checkpoints on a split, with breakdowns")
    flags.add_weights(p, required=False, nargs="+")
    p.add_argument("--compare", type=Path, nargs="+", default=None, help="several checkpoints side by side")
    p.add_argument(
        "--late-event",
        type=Path,
        default=None,
        metavar="EVENT_CHECKPOINT",
        help="late fusion: merge the detections of --weights (an rgb model) with this event model's",
    )
    flags.add_data(p)
    p.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    flags.add_batch(p, None, default_text=f"{CPU_BATCH} on a CPU, {GPU_BATCH} on a GPU")
    flags.add_thresholds(p, conf=0.001)
    flags.add_input_shape(p)
    flags.add_device(p)
    flags.add_workers(p, 0, "loader worker processes")
    flags.add_out(p, None, "report folder (default: runs/eval/<checkpoint name>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate ``--weights`` / ``--compare`` and write their reports."""
    weights = list(args.weights or []) + list(args.compare or [])
    if not weights:
        raise ConfigError("eval: give --weights W (or --compare W1 W2 ...)")
    common = {
        "data": args.data,
        "split": args.split,
        "batch": args.batch,
        "conf": args.conf,
        "iou": args.iou,
        "input_hw": flags.input_hw(args),
        "device": args.device,
        "workers": args.workers,
        "out": args.out,
    }
    if args.late_event is None:
        evaluate_checkpoints(weights, **common)
    elif len(weights) != 1:
        raise ConfigError("--late-event: give one rgb checkpoint with --weights (no --compare)")
    else:
        evaluate_late(weights[0], args.late_event, **common)
    return 0
