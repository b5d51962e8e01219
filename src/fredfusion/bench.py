"""Throughput of the training path, part by part: `fredfusion bench`.

One run measures, on a prepared folder and with the package's own components:

1. ``read``: frame store -> pinned host memory -> device through ``BatchLoader`` (pairs/s), plus the
   one-process ``PreparedDataset.load`` gather rate (what one loader worker delivers);
2. ``augment``: ``augment_batch`` with Mosaic + MixUp on the device (pairs/s);
3. ``step``: one training step (forward, loss, backward, clipped optimizer step, EMA) on synthetic
   data already on the device (pairs/s, ms/step, effective TFLOP/s = GFLOPs/pair x 3 x pairs/s);
4. ``train``: the end-to-end loop loader -> augment -> step (pairs/s, share of wall time waiting on data,
   and the share of the augment+step bound ``1 / (1/augment + 1/step)``: both run on the device);
5. ``eval``: the evaluator's batched inference + NMS (pairs/s, no COCO metrics).

Warm-up iterations are excluded from every timing (the loader parts warm up for at least the
batches their workers prefetch, workers x prefetch_factor); on CUDA the device is synchronized around each
timed region, the model runs in bf16 autocast (fp16 where bf16 is missing) with channels_last, as in
training. The slowest of read / augment / step bounds the end-to-end rate; the verdict names it and
flags a data-wait share above 5%. Results are printed as a table and written to ``OUT/bench.json``.

What is measured when not told fits the device (``device_defaults``), and the batch is checked against
the free memory first (``engine.memory``): a default batch is halved until it fits, a batch asked for
that does not fit is an error naming ``--batch``. The loader's worker processes (shared by the read and
end-to-end parts) start before any part runs, so they never inherit the heap a part grows. Each part
shows a progress bar (stderr).

With ``compile`` the model and the loss run through ``torch.compile`` (``compile_mode``) with the
persistent cache of ``engine.compiled`` (``compile_cache``): the first call of each part that runs the
compiled model (step, end to end, eval) is timed on its own, before that part's warm-up (``CompileClock``:
seconds and Inductor's cache hits and misses), so the rates are compiled rates and the report says what
compiling cost and whether the cache served it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fredfusion.config import ConfigError, TrainConfig, validate
from fredfusion.data.augment import augment_batch
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import BatchLoader, DeviceBatch
from fredfusion.engine.compiled import (
    CompileClock,
    CompileReport,
    compile_callable,
    use_compile_cache,
    without_cuda_graphs,
)
from fredfusion.engine.ema import unwrap
from fredfusion.engine.memory import GiB, PeakMemory, training_need
from fredfusion.engine.optim import resolve_optimizer
from fredfusion.engine.runtime import amp_dtype_for, pick_device
from fredfusion.engine.step import TrainStep, augment_config
from fredfusion.spec import frames_for

__all__ = [
    "BOUND_PARTS",
    "DATA_WAIT_LIMIT",
    "LABELS",
    "PARTS",
    "FirstCalls",
    "compile_line",
    "device_defaults",
    "environment",
    "format_table",
    "run_bench",
    "torch_threads",
    "verdict",
]

PARTS = ("read", "augment", "step", "train", "eval")
"""The five measurements, in the order they run (names accepted by ``skip``)."""
BOUND_PARTS = ("read", "augment", "step")
"""The parts whose rates bound the end-to-end rate."""
DATA_WAIT_LIMIT = 0.05
"""End-to-end data-wait share above which the verdict flags the loader."""
LABELS = {
    "read": "store read",
    "augment": "augment",
    "step": "model step",
    "train": "end to end",
    "eval": "eval",
}
_KIND = {"read": "data", "augment": "augmentation", "step": "model"}


def device_defaults(device: torch.device) -> dict[str, Any]:
    """What bench measures when not told: on a GPU the sizes of the targets (YOLO-s, batch 128, 384x640,
    up to 12 loader workers); on a CPU a run of about a minute on 2 cores (YOLO-n, batch 16, 192x320,
    8 steps, loading in the main process)."""
    if device.type == "cuda":
        workers = min(12, os.cpu_count() or 1)
        return {
            "model": "s",
            "batch": 128,
            "input_hw": (384, 640),
            "steps": 20,
            "warmup": 3,
            "workers": workers,
        }
    return {"model": "n", "batch": 16, "input_hw": (192, 320), "steps": 8, "warmup": 2, "workers": 0}


def _bar(part: str, total: int) -> tqdm:
    """The progress bar of one part (stderr, removed when done)."""
    return tqdm(total=total, desc=f"bench {LABELS[part]}", leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(rate: float) -> str:
    """A rate with as many decimals as it needs to be readable (3 significant digits below 100)."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


def _open_split(data: Path, split: str, modality: str, pairs: str) -> PreparedDataset:
    return PreparedDataset(data, split, modality=modality, pairs=pairs)


def _train_dataset(data: Path, modality: str) -> PreparedDataset:
    """The train split, with the checks that make a missing or unbuilt folder a one-line error."""
    if not data.is_dir():
        raise FileNotFoundError(
            f"bench: prepared folder {data} does not exist; run `fredfusion prepare --out {data}` first"
        )
    train_json = data / "annotations" / "instances_train.json"
    if not train_json.is_file():
        raise FileNotFoundError(
            f"bench: {data} is not a prepared folder ({train_json} is missing); "
            f"run `fredfusion prepare --out {data}` first"
        )
    ds = _open_split(data, "train", modality, "required")
    if ds.store is None:
        raise FileNotFoundError(
            f"bench: {data} has no frame store ({ds.store_dir / 'manifest.json'} is missing); "
            f"run `fredfusion prepare --out {data}` to build it"
        )
    if len(ds) == 0:
        raise ValueError(f"bench: the train split of {data} has no images for modality {modality}")
    return ds


def _eval_dataset(data: Path, modality: str, fallback: PreparedDataset) -> tuple[PreparedDataset, str]:
    """The split the trainer evaluates on (val, true pairs), else test, else train."""
    for split in ("val", "test"):
        try:
            ds = _open_split(data, split, modality, "dual")
        except FileNotFoundError:
            continue
        if len(ds):
            return ds, split
    return fallback, "train"


def _cycle(loader: BatchLoader, epoch: int = 0) -> Iterator[DeviceBatch]:
    """Batches of ``loader`` over consecutive epochs, without end."""
    while True:
        loader.set_epoch(epoch)
        count = 0
        for item in loader:
            count += 1
            yield item
        if count == 0:
            raise ValueError("bench: the loader yields no batches")
        epoch += 1


def _loader(
    ds: PreparedDataset, cfg: TrainConfig, workers: int, device: torch.device, **extra: Any
) -> BatchLoader:
    """A training loader with the trainer's settings (shuffled, last partial batch dropped)."""
    batch = cfg.unfreeze_batch_size
    return BatchLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        drop_last=len(ds) >= batch,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor,
        persistent_workers=workers > 0,
        device=device,
        seed=cfg.seed,
        **extra,
    )


def _loader_warmup(warmup: int, loader: BatchLoader) -> int:
    """Warm-up batches of a loader part: at least the batches its workers prefetch while starting, so
    that batches made ready before the timed region do not inflate the rate."""
    return max(warmup, loader.num_workers * loader.prefetch_factor) if warmup else 0


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``threads`` > 0: that many torch CPU threads inside the block, the previous count after it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _commit() -> str | None:
    """Short git commit of the source tree, when it is a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Date, versions, device and CPU names, thread count and commit of a benchmark run."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": _commit(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


class FirstCalls:
    """Under ``compile``: the first call of each part that runs the compiled model, timed apart from the
    part's warm-up and timed steps (``CompileClock``), one log line each; ``summary`` for bench.json."""

    def __init__(self, device: torch.device, mode: str, cache_dir: Path, say: Callable[[str], None]) -> None:
        self.device = device
        self.mode = mode
        self.cache_dir = cache_dir
        self.say = say
        self.reports: dict[str, CompileReport] = {}

    def first(self, part: str, what: str, call: Callable[[], object]) -> None:
        """Run ``call`` (the part's first call of the compiled model) under a CompileClock and log it."""
        with CompileClock(self.device, what, self.cache_dir) as clock:
            call()
        if clock.report is not None:
            self.reports[part] = clock.report
            self.say(f"bench: {clock.report.line()}")

    def summary(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Mode, cache folder, seconds and cache state of all first calls (counts summed), each first call,
        and the compiled model-step rate (None when the step part was skipped)."""
        reports = list(self.reports.values())
        counts = {k: sum(r.counts[k] for r in reports) for k in ("fx_hit", "fx_miss", "aot_hit", "aot_miss")}
        total = CompileReport("the first calls", sum(r.seconds for r in reports), counts, str(self.cache_dir))
        step = results.get("step")
        return {
            "mode": self.mode,
            "cache_dir": str(self.cache_dir),
            "seconds": total.seconds,
            "cache": total.state,
            **counts,
            "compiled_pairs_per_s": None if step is None else step["pairs_per_s"],
            "first_calls": {
                part: {"what": r.what, "seconds": r.seconds, "cache": r.state, **r.counts}
                for part, r in self.reports.items()
            },
        }


def compile_line(summary: dict[str, Any]) -> str:
    """The table's compile line: mode, what the cache gave, the first calls' seconds, the compiled rate."""
    graphs = summary["fx_hit"] + summary["fx_miss"]
    cache = {
        "hit": f"cache hit (all {graphs} graphs loaded)",
        "miss": f"cache miss ({graphs} graphs compiled and stored)",
        "partial": f"cache partial ({summary['fx_hit']} of {graphs} graphs loaded)",
        "none": "no Inductor graphs",
    }[summary["cache"]]
    parts = ", ".join(f"{LABELS[p]} {c['seconds']:.1f} s" for p, c in summary["first_calls"].items())
    rate = summary["compiled_pairs_per_s"]
    return (
        f"compile: mode {summary['mode']}, {cache} in {summary['cache_dir']}; first calls (untimed) "
        f"{summary['seconds']:.1f} s ({parts or 'none'})"
        + ("" if rate is None else f"; compiled model step {_fmt(float(rate))} pairs/s")
    )


# ----------------------------------------------------------------------------------- synthetic data
def _synthetic_batch(
    modality: str, batch: int, input_hw: tuple[int, int], device: torch.device, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Random [0, 1] frames of the model's input size and 2 drone-sized boxes per image, on the device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, w = input_hw
    mods = frames_for(modality)
    rgb = torch.rand((batch, 3, h, w), generator=gen) if "rgb" in mods else None
    event = torch.rand((batch, 3, h, w), generator=gen) if "event" in mods else None
    per = 2
    size = (torch.rand((batch * per, 2), generator=gen) * 0.04 + 0.02) * torch.tensor([w, h])
    centre = torch.rand((batch * per, 2), generator=gen) * 0.8 * torch.tensor([w, h]) + 0.1 * torch.tensor(
        [w, h]
    )
    targets = torch.zeros((batch * per, 6))
    targets[:, 0] = torch.arange(batch).repeat_interleave(per).float()
    targets[:, 2:4] = centre - size / 2
    targets[:, 4:6] = centre + size / 2

    def dev(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    return dev(rgb), dev(event), targets.to(device)


# ------------------------------------------------------------------------------------- the parts
def _bench_read(
    ds: PreparedDataset,
    cfg: TrainConfig,
    steps: int,
    warmup: int,
    device: torch.device,
    loader: BatchLoader,
    batches: Iterator[DeviceBatch],
) -> dict[str, Any]:
    batch, workers = cfg.unfreeze_batch_size, cfg.num_workers
    mods = frames_for(ds.modality)
    h, w = ds.store_hw
    bytes_per_pair = (
        sum(ds.store.stored_bytes(m) for m in mods) if ds.store is not None else h * w * 3 * len(mods)
    )
    # one process: PreparedDataset.load (the store gather) into pinned buffers, random batches
    n = min(batch, len(ds))
    pin = device.type == "cuda"
    bufs = {m: torch.empty((n, h, w, 3), dtype=torch.uint8, pin_memory=pin).numpy() for m in mods}
    rng = np.random.default_rng(cfg.seed)
    lead = _loader_warmup(warmup, loader)
    with _bar("read", 2 * (warmup + steps) + lead) as bar:
        for _ in range(warmup):
            ds.load(ds.ids[rng.choice(len(ds), n, replace=False)], mods, out=bufs)
            bar.update()
        t0 = time.perf_counter()
        for _ in range(steps):
            ds.load(ds.ids[rng.choice(len(ds), n, replace=False)], mods, out=bufs)
            bar.update()
        gather = steps * n / max(time.perf_counter() - t0, 1e-9)
        # the loader: worker processes -> pinned batches -> device (side stream on CUDA)
        for _ in range(lead + warmup):
            next(batches)
            bar.update()
        _sync(device)
        seen = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            seen += len(next(batches).ids)
            bar.update()
        _sync(device)
        rate = seen / max(time.perf_counter() - t0, 1e-9)
    where = (
        f"{'+'.join(loader.device_kinds)} decoded on {device.type}"
        if loader.device_kinds
        else "decoded on the CPU"
    )
    return {
        "pairs_per_s": rate,
        "gib_per_s": rate * bytes_per_pair / 2**30,
        "gather_pairs_per_s": gather,
        "gather_gib_per_s": gather * bytes_per_pair / 2**30,
        "bytes_per_pair": bytes_per_pair,
        "codecs": {m: str(ds.store.codecs[m]) for m in mods} if ds.store is not None else {},
        "device_decoded": list(loader.device_kinds),
        "workers": workers,
        "pinned": pin,
        "detail": (
            f"BatchLoader {workers} workers -> {device.type} ({where}), {bytes_per_pair / 1e3:.0f} KB/pair "
            f"stored, {rate * bytes_per_pair / 2**30:.2f} GiB/s; 1 process read+decode {_fmt(gather)} pairs/s"
        ),
    }


def _bench_augment(
    ds: PreparedDataset, cfg: TrainConfig, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    input_hw = _input_hw(cfg)
    aug = augment_config(cfg)
    loader = _loader(ds, cfg, 0, device, max_batches=1)
    item = next(_cycle(loader))
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)

    def once() -> None:
        augment_batch(item.rgb, item.event, item.targets, input_hw, aug, special=True, generator=gen)

    with _bar("augment", warmup + steps) as bar:
        for _ in range(warmup):
            once()
            bar.update()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            once()
            bar.update()
        _sync(device)
        rate = steps * len(item.ids) / max(time.perf_counter() - t0, 1e-9)
    h, w = ds.store_hw
    return {
        "pairs_per_s": rate,
        "batch": len(item.ids),
        "detail": (
            f"Mosaic {aug.mosaic_prob:g} + MixUp {aug.mixup_prob:g}, {h}x{w} -> {input_hw[0]}x{input_hw[1]}"
        ),
    }


def _bench_step(
    step: TrainStep,
    wrapped: nn.Module,
    steps: int,
    warmup: int,
    gflops: float,
    estimate: int,
    compiled: FirstCalls | None = None,
) -> dict[str, Any]:
    cfg, device = step.cfg, step.device
    batch = cfg.unfreeze_batch_size
    rgb, event, targets = _synthetic_batch(cfg.modality, batch, step.input_hw, device, cfg.seed)
    step.model.train()
    if compiled is not None:
        what = f"the first training step at batch {batch}"
        compiled.first("step", what, lambda: step.optimize(wrapped, rgb, event, targets, batch))
    with _bar("step", warmup + steps) as bar, PeakMemory(device) as peak:
        for _ in range(warmup):
            step.optimize(wrapped, rgb, event, targets, batch)
            bar.update()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step.optimize(wrapped, rgb, event, targets, batch)
            bar.update()
        _sync(device)
        elapsed = max(time.perf_counter() - t0, 1e-9)
    rate = steps * batch / elapsed
    tflops = gflops * 3 * rate / 1000
    ms = 1000 * elapsed / steps
    memory = (
        "" if peak.added is None else f"; peak +{peak.added / GiB:.2f} GiB (estimate {estimate / GiB:.2f})"
    )
    return {
        "pairs_per_s": rate,
        "ms_per_step": ms,
        "tflops": tflops,
        "gflops_per_pair": gflops,
        "peak_added_bytes": peak.added,
        "estimate_bytes": estimate,
        "detail": f"{ms:.1f} ms/step, {tflops:.3g} TFLOP/s ({gflops:.3g} GFLOPs/pair x 3){memory}",
    }


def _bench_train(
    step: TrainStep,
    wrapped: nn.Module,
    steps: int,
    warmup: int,
    loader: BatchLoader,
    batches: Iterator[DeviceBatch],
    compiled: FirstCalls | None = None,
) -> dict[str, Any]:
    cfg, device, workers = step.cfg, step.device, step.cfg.num_workers
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    step.model.train()

    def once() -> tuple[float, int]:
        t0 = time.perf_counter()
        item = next(batches)
        wait = time.perf_counter() - t0
        step.run(wrapped, item, special=True, generator=gen)
        return wait, len(item.ids)

    if compiled is not None:  # augmented batches: the loss sees other target counts than in the step part
        compiled.first("train", "the first end-to-end step", once)
    lead = _loader_warmup(warmup, loader)
    with _bar("train", lead + steps) as bar:
        for _ in range(lead):
            once()
            bar.update()
        _sync(device)
        wait = 0.0
        seen = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            w, n = once()
            wait += w
            seen += n
            bar.update()
        _sync(device)
        elapsed = max(time.perf_counter() - t0, 1e-9)
    rate = seen / elapsed
    return {
        "pairs_per_s": rate,
        "data_wait": wait / elapsed,
        "ms_per_step": 1000 * elapsed / steps,
        "workers": workers,
        "detail": f"data wait {100 * wait / elapsed:.1f}%, {workers} workers, Mosaic + MixUp",
    }


def _bench_eval(
    model: nn.Module,
    ds: PreparedDataset,
    split: str,
    cfg: TrainConfig,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    compiled: FirstCalls | None = None,
) -> dict[str, Any]:
    from fredfusion.eval.evaluator import evaluate

    def run(images: int) -> dict[str, Any]:
        return evaluate(
            model,
            ds,
            batch_size=batch,
            device=device,
            input_hw=_input_hw(cfg),
            amp_dtype=amp_dtype_for(device, cfg.fp16),
            max_images=images,
            num_workers=0,  # as training evaluates
            compute_map=False,
        ).metrics

    if compiled is not None:  # the model in eval mode: another graph
        compiled.first("eval", f"the first evaluation batch of {batch}", lambda: run(min(batch, len(ds))))
    want = steps * batch
    with _bar("eval", want + (min(warmup * batch, len(ds)) if warmup else 0)) as bar:
        if warmup:
            bar.update(int(run(min(warmup * batch, len(ds)))["images"]))
        images = 0
        infer_s = wall_s = 0.0
        while images < want:
            metrics = run(min(want - images, len(ds)))
            images += int(metrics["images"])
            infer_s += float(metrics["infer_s"])
            wall_s += float(metrics["wall_s"])
            bar.update(int(metrics["images"]))
    rate = images / max(infer_s, 1e-9)
    wall_rate = images / max(wall_s, 1e-9)
    return {
        "pairs_per_s": rate,
        "wall_pairs_per_s": wall_rate,
        "images": images,
        "split": split,
        "batch": batch,
        "detail": f"inference + NMS, batch {batch}, {images} {split} images; "
        f"{_fmt(wall_rate)} pairs/s with loading and the host's COCO rows",
    }


# ----------------------------------------------------------------------------------- the verdict
def verdict(results: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
    """One line naming the bottleneck, and the part it names (None when no bound was measured).

    The slowest of read / augment / step bounds the end-to-end rate; an end-to-end data-wait share
    above ``DATA_WAIT_LIMIT`` is flagged.
    """
    bounds = sorted(
        ((part, float(results[part]["pairs_per_s"])) for part in BOUND_PARTS if part in results),
        key=lambda pr: pr[1],
    )
    if bounds:
        slow = bounds[0][0]
        chain = " < ".join(f"{LABELS[p]} {_fmt(r)} pairs/s" for p, r in bounds)
        text = f"bottleneck: {_KIND[slow]} ({chain})"
    else:
        slow = None
        text = "bottleneck: not determined (read, augment and step were skipped)"
    train = results.get("train")
    if train is not None:
        share = float(train["data_wait"])
        text += f"; end to end {_fmt(float(train['pairs_per_s']))} pairs/s, data wait {100 * share:.1f}%"
        if share > DATA_WAIT_LIMIT:
            text += f" > {100 * DATA_WAIT_LIMIT:.0f}%: the loader does not keep up (more --workers?)"
    return text, slow


def format_table(report: dict[str, Any]) -> str:
    """The printed table: a heading line, one row per measured part, the verdict line."""
    cfg = report["config"]
    env = report["environment"]
    h, w = cfg["input_hw"]
    lines = [
        f"fredfusion bench: {cfg['modality']} YOLO-{cfg['model']}, batch {cfg['batch']}, input {h}x{w}, "
        f"{env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up"
        + (f", compiled ({cfg['compile_mode']})" if cfg["compile"] else ""),
        f"{'part':<12} {'pairs/s':>10}  detail",
    ]
    for part in PARTS:
        row = report["results"].get(part)
        if row is None:
            continue
        lines.append(f"{LABELS[part]:<12} {_fmt(float(row['pairs_per_s'])):>10}  {row['detail']}")
    skipped = [p for p in PARTS if p not in report["results"]]
    if skipped:
        lines.append(f"skipped: {', '.join(skipped)}")
    if report.get("compile"):
        lines.append(compile_line(report["compile"]))
    lines.append(report["verdict"])
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- the run
def _input_hw(cfg: TrainConfig) -> tuple[int, int]:
    return int(cfg.input_shape[0]), int(cfg.input_shape[1])


def _check_args(steps: int, warmup: int, skip: Sequence[str], eval_batch: int) -> None:
    """The bench's own arguments (the config checks its fields)."""
    if steps < 1:
        raise ValueError(f"bench: --steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"bench: --warmup must be >= 0, got {warmup}")
    unknown = sorted(set(skip) - set(PARTS))
    if unknown:
        raise ValueError(
            f"bench: unknown part(s) in --skip: {', '.join(unknown)} (parts: {', '.join(PARTS)})"
        )
    if set(PARTS) <= set(skip):
        raise ValueError("bench: every part is skipped; nothing to measure")
    if eval_batch < 1:
        raise ValueError(f"bench: --eval-batch must be >= 1, got {eval_batch}")


def _model(
    cfg: TrainConfig, train_set: PreparedDataset, device: torch.device
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The model as training builds it (anchors, channels_last), compiled when ``cfg.compile``; its
    plain and wrapped forms and ``model_info`` (params, GFLOPs per pair)."""
    from fredfusion.engine.model_setup import run_anchors
    from fredfusion.model import build_model, model_info

    anchors = run_anchors(cfg, train_set, lambda _m: None) if cfg.arch == "yolov5" else None
    net = build_model(cfg.modality, cfg.model, cfg.fusion, num_classes=1, anchors=anchors, arch=cfg.arch)
    info = model_info(net, _input_hw(cfg))
    net = net.to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, (compile_callable(net, cfg.compile_mode) if cfg.compile else net), info


def _report(
    cfg: TrainConfig,
    train_set: PreparedDataset,
    device: torch.device,
    info: dict[str, Any],
    *,
    steps: int,
    warmup: int,
    eval_batch: int,
    skip: Sequence[str],
) -> dict[str, Any]:
    """The report before any measurement: config (what is measured, and how), environment, model."""
    amp_dtype = amp_dtype_for(device, cfg.fp16)
    return {
        "config": {
            "data": str(cfg.data),
            "modality": cfg.modality,
            "model": cfg.model,
            "fusion": cfg.fusion,
            "batch": cfg.unfreeze_batch_size,
            "eval_batch": eval_batch,
            "steps": steps,
            "warmup": warmup,
            "input_hw": list(_input_hw(cfg)),
            "store_hw": list(train_set.store_hw),
            "train_images": len(train_set),
            "workers": cfg.num_workers,
            "compile": bool(cfg.compile),
            "compile_mode": cfg.compile_mode if cfg.compile else None,
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
            "channels_last": bool(cfg.channels_last),
            "skip": [p for p in PARTS if p in set(skip)],
            "seed": cfg.seed,
        },
        "environment": environment(device),
        "model": {"params": info["params"], "gflops_per_pair": info["gflops"]},
        "results": {},
    }


def _measure(
    report: dict[str, Any],
    cfg: TrainConfig,
    train_set: PreparedDataset,
    device: torch.device,
    net: nn.Module,
    wrapped: nn.Module,
    say: Callable[[str], None],
    compiled: FirstCalls | None = None,
) -> None:
    """Run the parts the report's config does not skip, into ``report["results"]``; say each rate; with
    ``compiled`` the compile summary into ``report["compile"]``.

    The loader of the read and end-to-end parts (and its worker processes) starts first."""
    run, results = report["config"], report["results"]
    steps, warmup, skip = run["steps"], run["warmup"], run["skip"]
    loader, batches = None, None
    if "read" not in skip or "train" not in skip:
        loader = _loader(train_set, cfg, cfg.num_workers, device)
        batches = _cycle(loader)
        next(batches)  # the workers start now, before any part grows the heap they would inherit
    try:
        if "read" not in skip:
            results["read"] = _bench_read(train_set, cfg, steps, warmup, device, loader, batches)
            say(f"bench: read {_fmt(results['read']['pairs_per_s'])} pairs/s")
        if "augment" not in skip:
            results["augment"] = _bench_augment(train_set, cfg, steps, warmup, device)
            say(f"bench: augment {_fmt(results['augment']['pairs_per_s'])} pairs/s")
        if "step" not in skip or "train" not in skip:
            _measure_step(report, cfg, device, net, wrapped, loader, batches, say, compiled)
    finally:
        if batches is not None:
            batches.close()
    if "eval" not in skip:
        eval_set, split = _eval_dataset(Path(cfg.data), cfg.modality, train_set)
        evaluated = wrapped  # compiled as training evaluates: without CUDA graphs
        if cfg.compile and without_cuda_graphs(cfg.compile_mode) != cfg.compile_mode:
            evaluated = compile_callable(net, without_cuda_graphs(cfg.compile_mode))
        results["eval"] = _bench_eval(
            evaluated, eval_set, split, cfg, run["eval_batch"], steps, warmup, device, compiled
        )
        say(f"bench: eval {_fmt(results['eval']['pairs_per_s'])} pairs/s")
    unwrap(wrapped).train()
    if compiled is not None:
        report["compile"] = compiled.summary(results)


def _measure_step(
    report: dict[str, Any],
    cfg: TrainConfig,
    device: torch.device,
    net: nn.Module,
    wrapped: nn.Module,
    loader: BatchLoader | None,
    batches: Iterator[DeviceBatch] | None,
    say: Callable[[str], None],
    compiled: FirstCalls | None = None,
) -> None:
    """The model step and end-to-end parts, on one TrainStep."""
    run, results = report["config"], report["results"]
    steps, warmup, skip = run["steps"], run["warmup"], run["skip"]
    step = TrainStep(
        cfg,
        net,
        cfg.unfreeze_batch_size,
        device=device,
        amp_dtype=amp_dtype_for(device, cfg.fp16),
        optimizer_choice=resolve_optimizer(cfg.optimizer, 0),
    )
    if "step" not in skip:
        gflops = report["model"]["gflops_per_pair"]
        estimate = report["memory"]["estimate_bytes"]
        results["step"] = _bench_step(step, wrapped, steps, warmup, gflops, estimate, compiled)
        say(f"bench: model step {_fmt(results['step']['pairs_per_s'])} pairs/s")
    if "train" not in skip and loader is not None and batches is not None:
        results["train"] = _bench_train(step, wrapped, steps, warmup, loader, batches, compiled)
        say(f"bench: end to end {_fmt(results['train']['pairs_per_s'])} pairs/s")
        if "augment" in results and "step" in results:
            # augmentation and the step run one after the other on the device
            bound = 1.0 / (1.0 / results["augment"]["pairs_per_s"] + 1.0 / results["step"]["pairs_per_s"])
            train = results["train"]
            train["augment_step_bound"] = bound
            train["detail"] += f"; {100 * train['pairs_per_s'] / bound:.0f}% of augment+step {_fmt(bound)}"


def _fit_memory(
    cfg: TrainConfig,
    net: nn.Module,
    train_set: PreparedDataset,
    device: torch.device,
    fit_batch: bool,
    say: Callable[[str], None],
) -> tuple[TrainConfig, dict[str, Any]]:
    """The config with a batch whose training step fits the free memory (halved from the default while it
    does not, when ``fit_batch``) and the memory figures; ConfigError naming --batch when the batch asked
    for does not fit."""
    asked = batch = cfg.unfreeze_batch_size
    while True:
        need, fixed = training_need(
            net,
            _input_hw(cfg),
            batch,
            store_hw=train_set.store_hw,
            optimizer=resolve_optimizer(cfg.optimizer, 0)[0],
            workers=cfg.num_workers,
            prefetch=cfg.prefetch_factor,
            device=device,
            half=amp_dtype_for(device, cfg.fp16) is not None,
        )
        if need.fits or not fit_batch or batch == 1:
            break
        batch //= 2
    if not need.fits:
        fits = need.largest_batch(batch, fixed)
        hint = f"about {fits} fits" if fits else "not even 1 fits"
        raise ConfigError(
            f"bench: --batch {batch} at {cfg.input_shape[0]}x{cfg.input_shape[1]} needs about "
            f"{need.need / GiB:.1f} GiB, {need.free / GiB:.1f} GiB are free on {device.type}: lower --batch "
            f"({hint}), --imgsz or --model"
        )
    if batch != asked:
        say(f"bench: batch {batch}: the default {asked} does not fit the free memory")
        cfg = dataclasses.replace(cfg, unfreeze_batch_size=batch, freeze_batch_size=batch)
    say(need.line())
    return cfg, {"estimate_bytes": need.need, "free_bytes": need.free, "batch": batch}


def run_bench(
    cfg: TrainConfig,
    *,
    steps: int = 20,
    warmup: int = 3,
    skip: Sequence[str] = (),
    out: str | Path | None = Path("runs/bench"),
    eval_batch: int | None = None,
    threads: int = 0,
    fit_batch: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Measure the five rates for ``cfg`` (its data, modality, model, fusion, input_shape, batch =
    unfreeze_batch_size, num_workers, device, compile, compile_mode, compile_cache, seed); print the table,
    write ``out/bench.json``.

    Returns the report: ``config``, ``environment``, ``model`` (params, GFLOPs per pair), ``memory``
    (the estimate of a step and the free memory), ``results`` (one dict per measured part, each with
    ``pairs_per_s``), ``verdict`` and ``bottleneck`` (the slowest of read / augment / step); with
    ``compile`` also ``compile`` (``FirstCalls.summary``: mode, cache folder and state, seconds of the
    first calls, the compiled model-step rate).
    ``out=None`` writes no file. ``eval_batch`` defaults to the batch; ``threads`` > 0 sets the torch
    CPU thread count for the run (restored afterwards). With ``fit_batch`` a batch that does not fit the
    free memory is halved until it does, else it is a ConfigError.
    """
    if threads < 0:
        raise ValueError(f"bench: --threads must be >= 0, got {threads}")
    validate(cfg)
    say = log or (lambda _m: None)
    with torch_threads(threads):
        _check_args(steps, warmup, skip, 1 if eval_batch is None else eval_batch)
        device = pick_device(cfg.device)
        compiled = None
        if cfg.compile:  # before anything compiles; an unusable folder is a ConfigError before any work
            compiled = FirstCalls(device, cfg.compile_mode, use_compile_cache(cfg.compile_cache), say)
        train_set = _train_dataset(Path(cfg.data), cfg.modality)
        net, wrapped, info = _model(cfg, train_set, device)
        cfg, memory = _fit_memory(cfg, net, train_set, device, fit_batch, say)
        eval_batch = cfg.unfreeze_batch_size if eval_batch is None else eval_batch
        report = _report(
            cfg, train_set, device, info, steps=steps, warmup=warmup, eval_batch=eval_batch, skip=skip
        )
        report["memory"] = memory
        _measure(report, cfg, train_set, device, net, wrapped, say, compiled)
        report["verdict"], report["bottleneck"] = verdict(report["results"])
        if out is not None:
            from fredfusion.files import write_json_atomic

            path = Path(out) / "bench.json"
            write_json_atomic(path, report, indent=2)
            report["path"] = str(path)
        if log is not None:
            log(format_table(report))
            if "path" in report:
                log(f"wrote {report['path']}")
        return report
