"""Ablation (``fredfusion ablate``): train a list of variants with one recipe on one prepared folder,
evaluate each on the same true pairs, and table the mean and spread over training seeds.

A variant is written ``MODALITY[:FUSION][+KEY=VALUE...]`` (``dual:attention+modality_dropout=0.3``)
or given as a mapping in a variants file (``{name, modality, fusion, KEY: VALUE}``); KEY is any
training config key. A value ``@NAME`` is the checkpoint of the earlier variant NAME trained with
the same seed (``dual:concat+weights_rgb=@rgb+weights_event=@event``).

Output folder (``OUT``)::

    OUT/plan.json                          the variants, seeds and recipe of the last invocation
    OUT/<variant>/seed<S>/                 the training run (config.yaml, last.pth, best.pth, results.csv)
    OUT/<variant>/seed<S>/eval/            its test evaluation (metrics.json, detections.json, ...)
    OUT/<variant>/seed<S>/result.json      written last (atomically): the run is finished
    OUT/late_<rgb>+<event>/seed<S>/        late fusion of the two runs of that seed (eval/, result.json)
    OUT/ablation.md, .csv, .tex            the table (rewritten after every finished run)
    OUT/runs.csv                           one row per finished run and seed

A run whose ``result.json`` exists is not trained again; one with a ``last.pth`` resumes from it;
either refuses to continue when its saved recipe differs from the planned one. The table's cells are
the mean over seeds with the spread as ``[min, max]`` (not a standard deviation), in %.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fredfusion.config import ConfigError, TrainConfig, apply_overrides, load_yaml, resolve_key, resolved
from fredfusion.eval.report import format_table
from fredfusion.files import write_json_atomic, write_text_atomic
from fredfusion.spec import FUSIONS, MODALITIES

__all__ = [
    "PAPER",
    "Plan",
    "Run",
    "Variant",
    "aggregate",
    "build_plan",
    "parse_variant",
    "read_variants_file",
    "run_plan",
    "summarize",
    "variant_from_mapping",
    "write_tables",
]

PAPER: dict[str, dict[str, tuple[float, float | None]]] = {
    "Event": {"canonical": (87.68, 49.25), "challenging": (79.60, 41.63)},
    "RGB": {"canonical": (76.23, None)},
}
"""The FRED paper's published single-modality test numbers (YOLO11 at 640): split -> (mAP50, mAP50:95)."""

RESERVED = ("data", "save_dir", "name", "resume", "exist_ok", "seed", "device", "best_alias", "quick_test")
"""Config keys the ablation sets itself (a variant may not; a recipe's are dropped)."""

RUNTIME = (
    "device",
    "num_workers",
    "persistent_workers",
    "prefetch_factor",
    "resume",
    "exist_ok",
    "log_interval",
    "wandb",
    "mlflow",
    "eval_batch_size",
    "compile",
)
"""Config keys that do not change what a run learns: a finished or interrupted run with other values
is still the planned run."""

OFFICIAL = ("canonical", "challenging")
"""FRED's official test lists (prepare's split schemes, and conditions of real FRED sequences)."""

RESULT = "result.json"
CHECKPOINTS = ("last", "best")


# ------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One model to train: modality, fusion (None: the recipe's) and config options."""

    name: str
    modality: str
    fusion: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def folder(self) -> str:
        """The variant's folder name under OUT."""
        return re.sub(r"[^A-Za-z0-9._=+@-]+", "_", self.name.replace(":", "-")).strip("._") or "variant"


def _check_head(modality: str, fusion: str | None, where: str) -> None:
    """ConfigError naming ``where`` for an unknown modality or fusion, or a fusion on one modality."""
    if modality not in MODALITIES:
        raise ConfigError(f"{where}: unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if fusion is not None and fusion not in FUSIONS:
        raise ConfigError(f"{where}: unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
    if fusion is not None and modality != "dual":
        raise ConfigError(f"{where}: a fusion applies to dual variants only, not {modality}")


def _option_value(text: str) -> Any:
    """A ``KEY=VALUE`` value: ``@NAME`` kept as text, else read as YAML (0.3, true, [192, 320])."""
    if text.startswith("@"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_variant(text: str) -> Variant:
    """``MODALITY[:FUSION][+KEY=VALUE...]`` as a Variant named ``text``; ConfigError naming it."""
    where = f"variant {text!r}"
    head, *parts = text.strip().split("+")
    modality, _, fusion = head.partition(":")
    _check_head(modality, fusion or None, where)
    options: list[tuple[str, Any]] = []
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key or not value:
            raise ConfigError(f"{where}: option {part!r} is not KEY=VALUE")
        options.append((key, _option_value(value)))
    return Variant(text.strip(), modality, fusion or None, tuple(options))


def variant_from_mapping(item: Mapping[str, Any], where: str) -> Variant:
    """A variant from a variants-file mapping ``{name?, modality, fusion?, KEY: VALUE...}``."""
    if "modality" not in item:
        raise ConfigError(f"{where}: a variant needs a modality (one of {', '.join(MODALITIES)})")
    modality, fusion = str(item["modality"]), item.get("fusion")
    fusion = None if fusion is None else str(fusion)
    _check_head(modality, fusion, where)
    options = tuple((str(k), v) for k, v in item.items() if k not in ("name", "modality", "fusion"))
    name = item.get("name")
    if name is None:
        name = modality + (f":{fusion}" if fusion else "") + "".join(f"+{k}={v}" for k, v in options)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: name must be a non-empty string, got {name!r}")
    return Variant(name.strip(), modality, fusion, options)


def read_variants_file(path: Path) -> tuple[list[Variant], list[int] | None, dict[str, Any]]:
    """A YAML / JSON variants file: ``variants`` (strings or mappings), optional ``seeds`` and ``recipe``
    (config keys for every variant). Returns (variants, seeds or None, recipe)."""
    data = load_yaml(Path(path))
    unknown = sorted(set(data) - {"variants", "seeds", "recipe"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (expected variants, seeds, recipe)")
    items = data.get("variants") or []
    if not isinstance(items, list):
        raise ConfigError(f"{path}: variants must be a list")
    variants = []
    for k, item in enumerate(items):
        where = f"{path}: variant {k + 1}"
        if isinstance(item, str):
            variants.append(parse_variant(item))
        elif isinstance(item, dict):
            variants.append(variant_from_mapping(item, where))
        else:
            raise ConfigError(f"{where}: expected a string or a mapping, got {item!r}")
    seeds = data.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{path}: seeds must be a list of integers")
    recipe = data.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: recipe must be a mapping of config keys")
    return variants, seeds, recipe


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class Run:
    """One variant at one seed: its config, folder and what is left to do (done / resume / train)."""

    variant: Variant
    seed: int
    cfg: TrainConfig
    status: str = "train"

    @property
    def folder(self) -> Path:
        """The run folder (the trainer's run_dir)."""
        return self.cfg.run_dir()


@dataclass
class Late:
    """Late fusion of an rgb and an event variant at one seed."""

    rgb: Run
    event: Run
    folder: Path


@dataclass
class Plan:
    """Everything ``run_plan`` does, checked before any training."""

    out: Path
    seeds: list[int]
    variants: list[Variant]
    runs: list[Run]
    late: list[Late]
    checkpoint: str
    recipe: dict[str, Any] = field(default_factory=dict)


def _field(key: str, where: str) -> str | None:
    """The config field of a user's key (None for the specially handled ones); reserved keys refused."""
    try:
        name = resolve_key(key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if key == "out" or name in RESERVED or name in ("modality", "fusion"):
        hint = "use --seeds" if name == "seed" else "the ablation sets it"
        raise ConfigError(f"{where}: key {key!r} cannot be set per variant ({hint})")
    return name


def _weights_field(name: str | None) -> bool:
    return name is not None and (name == "weights" or name.startswith("weights_"))


def _resolved_options(
    variant: Variant, seed: int, earlier: Mapping[str, Run], out: Path, checkpoint: str
) -> dict[str, Any]:
    """The variant's options for one seed: ``@NAME`` -> that variant's checkpoint, weights files checked."""
    where = f"variant {variant.name!r}"
    values: dict[str, Any] = {}
    for key, value in variant.options:
        name = _field(key, where)
        if isinstance(value, str) and value.startswith("@"):
            ref = earlier.get(value[1:])
            if not _weights_field(name):
                raise ConfigError(f"{where}: {key}={value}: only weights keys take @VARIANT")
            if ref is None:
                raise ConfigError(f"{where}: {key}={value}: no variant {value[1:]!r} listed before it")
            wanted = name.removeprefix("weights_") if name != "weights" else ref.variant.modality
            if ref.variant.modality != wanted:
                raise ConfigError(f"{where}: {key}={value} is a {ref.variant.modality} variant")
            value = str(ref.folder / f"{checkpoint}.pth")
        elif _weights_field(name) and value:
            if not Path(str(value)).is_file():
                raise FileNotFoundError(f"{where}: {key}={value}: checkpoint not found")
            value = str(Path(str(value)).resolve())
        values[key] = value
    return values


DROPOUT_DETAILS = {
    "modality_dropout_region": "image",
    "modality_dropout_side": "both",
    "modality_dropout_ramp": 0.0,
}
"""The keys that say how modality dropout blanks (they change nothing without dropout), with what runs
saved before they existed did: whole-frame dropout, RGB or events 50/50, from the first step."""


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved or planned config without the keys that do not change what a run learns."""
    return {k: v for k, v in config.items() if k not in RUNTIME}


def _differences(saved: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """``key saved -> planned`` for each key that differs, ``auto`` choices resolved on both sides and
    the dropout's region and side left out where there is no dropout; a key the saved config lacks (a
    run of an earlier version) counts as what runs did before it existed (DROPOUT_DETAILS) or its
    default."""
    defaults = {**TrainConfig().to_dict(), **DROPOUT_DETAILS}
    a, b = comparable(saved), comparable(planned)
    a.update({k: defaults[k] for k in b if k not in a and k in defaults})
    a, b = resolved(a), resolved(b)
    for config in (a, b):  # without dropout, what it would blank does not matter
        if not config.get("modality_dropout"):
            for key in DROPOUT_DETAILS:
                config.pop(key, None)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _status(run: Run) -> str:
    """done (result.json, same recipe), resume (last.pth, same recipe) or train; ConfigError when the
    folder holds another recipe's run."""
    folder, planned = run.folder, run.cfg.to_dict()
    saved: Mapping[str, Any] | None = None
    status = "train"
    if (folder / RESULT).is_file():
        saved, status = json.loads((folder / RESULT).read_text()).get("config", {}), "done"
    elif (folder / "last.pth").is_file() and (folder / "config.yaml").is_file():
        saved, status = load_yaml(folder / "config.yaml"), "resume"
    if saved is not None:
        diff = _differences(saved, planned)
        if diff:
            raise ConfigError(
                f"{folder} holds a run of another recipe ({'; '.join(diff[:3])}); "
                f"remove it or choose another --out"
            )
    return status


def build_plan(
    base: TrainConfig,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    out: Path,
    checkpoint: str = "last",
) -> Plan:
    """Every run's config (``base`` <- the variant's modality, fusion and options <- seed and folder)
    and status, checked up front: ConfigError / FileNotFoundError naming the variant or folder."""
    if not variants:
        raise ConfigError("give at least one variant: --variants VARIANT ... or --variants-file FILE")
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: need distinct seeds >= 0, got {list(seeds)}")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint: {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    out = Path(out).resolve()
    base = dataclasses.replace(base, data=str(Path(base.data).resolve()))
    _check_names(variants)
    runs: list[Run] = []
    for seed in seeds:
        earlier: dict[str, Run] = {}
        for v in variants:
            where = f"variant {v.name!r}"
            values: dict[str, Any] = {"modality": v.modality, **({"fusion": v.fusion} if v.fusion else {})}
            values.update(_resolved_options(v, seed, earlier, out, checkpoint))
            values.update(seed=seed, save_dir=str(out / v.folder), name=f"seed{seed}", exist_ok=True)
            values.update(resume=False)
            run = Run(v, seed, apply_overrides(base, values, source=where))
            earlier[v.name] = run
            runs.append(run)
    _check_duplicates([r for r in runs if r.seed == seeds[0]])
    for run in runs:
        run.status = _status(run)
    return Plan(out, list(seeds), list(variants), runs, _late_runs(runs, out), checkpoint, base.to_dict())


def _check_names(variants: Sequence[Variant]) -> None:
    names: dict[str, str] = {}
    for v in variants:
        if v.name in names.values():
            raise ConfigError(f"variant {v.name!r} is listed twice")
        if v.folder in names:
            raise ConfigError(f"variants {names[v.folder]!r} and {v.name!r} share the folder {v.folder}")
        if v.folder.startswith("late_"):
            raise ConfigError(f"variant {v.name!r}: names starting with 'late_' are the late-fusion rows'")
        names[v.folder] = v.name


def _check_duplicates(runs: Sequence[Run]) -> None:
    """ConfigError when two variants train the same model (same config but folder)."""
    seen: dict[str, str] = {}
    for run in runs:
        key = json.dumps(comparable({**run.cfg.to_dict(), "save_dir": ""}), sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"variants {seen[key]!r} and {run.variant.name!r} train the same model")
        seen[key] = run.variant.name


def _late_runs(runs: Sequence[Run], out: Path) -> list[Late]:
    """Late fusion of the first rgb and the first event variant, per seed (none without both)."""
    rgb = next((r.variant for r in runs if r.variant.modality == "rgb"), None)
    event = next((r.variant for r in runs if r.variant.modality == "event"), None)
    if rgb is None or event is None:
        return []
    late = []
    for a in (r for r in runs if r.variant == rgb):
        b = next(r for r in runs if r.variant == event and r.seed == a.seed)
        late.append(Late(a, b, out / f"late_{rgb.folder}+{event.folder}" / f"seed{a.seed}"))
    return late


def title(plan: Plan, split: str, pairs: int) -> str:
    """One line naming the data, the evaluation and the recipe (the table's heading)."""
    r = plan.recipe
    h, w = r["input_shape"]
    seeds = " ".join(str(s) for s in plan.seeds)
    return (
        f"Ablation on {Path(r['data']).name} ({split} split, {pairs} true pairs): YOLO-{r['model']} "
        f"({r['arch']}) at {w}x{h}, {r['unfreeze_epoch']} epochs, optimizer {r['optimizer']}, "
        f"{plan.checkpoint}.pth evaluated; seeds {seeds}"
    )


def paper_split(coco: Mapping[str, Any], mode: str = "auto") -> str | None:
    """Whether the table gets the FRED paper's rows (None: no) and which published split its overall
    columns compare with (``canonical`` / ``challenging``; ``""``: only the per-condition columns).

    ``auto``: when the data is FRED, i.e. its images carry FRED's official conditions (prepare gives
    real FRED sequences ``canonical`` / ``challenging``; synthetic ones list their scenarios), or, in a
    folder prepared before conditions were recorded, the test split came from an official list.
    """
    if mode == "off":
        return None
    info = coco.get("info") or {}
    scheme = str(info.get("split_scheme") or "")
    official_split = info.get("split_source") in OFFICIAL
    if mode == "on":
        return scheme if scheme in OFFICIAL else ""
    tagged = [img.get("conditions") or [] for img in coco.get("images", []) if "conditions" in img]
    fred = any(c in OFFICIAL for names in tagged for c in names) if tagged else official_split
    if not fred:
        return None
    return scheme if official_split and scheme in OFFICIAL else ""


def late_name(plan: Plan) -> str:
    """The late-fusion row's name."""
    return f"late fusion ({plan.late[0].rgb.variant.name} + {plan.late[0].event.variant.name})"


# ------------------------------------------------------------------------------------------------ run

Evaluate = Callable[[Path, Path], dict[str, Any]]
"""(checkpoint, report folder) -> {"metrics": {...}, "conditions": {...}} (fractions)."""
MergeLate = Callable[[Path, Path, Path], dict[str, Any]]
"""(rgb report folder, event report folder, report folder) -> as Evaluate."""


def _result(run: Run, checkpoint: Path, evaluated: dict[str, Any], summary: dict[str, Any], t: float) -> dict:
    keep = ("best", "best_epoch", "epoch")
    return {
        "variant": run.variant.name,
        "modality": run.variant.modality,
        "fusion": run.cfg.fusion if run.variant.modality == "dual" else None,
        "options": dict(run.variant.options),
        "seed": run.seed,
        "checkpoint": str(checkpoint),
        "config": run.cfg.to_dict(),
        "metrics": evaluated.get("metrics", {}),
        "conditions": evaluated.get("conditions") or {},
        "train": {k: summary.get(k) for k in keep if k in summary},
        "seconds": round(t, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _train_and_evaluate(
    run: Run, checkpoint: str, train: Callable[[TrainConfig], dict[str, Any]], evaluate: Evaluate
) -> dict[str, Any]:
    """Train (or resume) one run, evaluate its checkpoint, write its result.json last."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(run.cfg, resume=(run.folder / "last.pth").is_file())
    summary = train(cfg) or {}
    path = run.folder / f"{checkpoint}.pth"
    evaluated = evaluate(path, run.folder / "eval")
    result = _result(run, path, evaluated, summary, time.perf_counter() - t0)
    write_json_atomic(run.folder / RESULT, result, indent=1)
    return result


def _late_result(late: Late, results: Mapping[tuple[str, int], dict], merge: MergeLate) -> dict | None:
    """The late-fusion result of one seed: read when its inputs did not change, else merged again."""
    a = results.get((late.rgb.variant.name, late.rgb.seed))
    b = results.get((late.event.variant.name, late.event.seed))
    if a is None or b is None:
        return None
    inputs = {"rgb": a["finished"], "event": b["finished"]}
    path = late.folder / RESULT
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("inputs") == inputs:
            return saved
    evaluated = merge(late.rgb.folder / "eval", late.event.folder / "eval", late.folder / "eval")
    result = {
        "variant": "late",
        "modality": "late",
        "fusion": None,
        "options": {"rgb": late.rgb.variant.name, "event": late.event.variant.name},
        "seed": late.rgb.seed,
        "inputs": inputs,
        "metrics": evaluated.get("metrics", {}),
        "conditions": evaluated.get("conditions") or {},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(path, result, indent=1)
    return result


def run_plan(
    plan: Plan,
    train: Callable[[TrainConfig], dict[str, Any]],
    evaluate: Evaluate,
    merge: MergeLate,
    on_result: Callable[[dict[tuple[str, int], dict]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[tuple[str, int], dict]:
    """Do the plan seed by seed (every variant at the first seed first): finished runs are read, the
    others trained (or resumed) and evaluated; late fusion follows its two runs. ``on_result`` gets
    every result so far after each one (the tables are rewritten there). Returns (name, seed) -> result.
    """
    write_json_atomic(
        plan.out / "plan.json",
        {
            "variants": [dataclasses.asdict(v) for v in plan.variants],
            "seeds": plan.seeds,
            "checkpoint": plan.checkpoint,
            "recipe": plan.recipe,
        },
        indent=1,
    )
    results: dict[tuple[str, int], dict] = {}
    total = len(plan.runs)
    for k, run in enumerate(plan.runs, 1):
        label = f"[{k}/{total}] {run.variant.name} seed {run.seed}"
        if run.status == "done":
            log(f"{label}: finished before, {run.folder / RESULT}")
            results[(run.variant.name, run.seed)] = json.loads((run.folder / RESULT).read_text())
        else:
            log(f"{label}: {'resume' if run.status == 'resume' else 'train'} -> {run.folder}")
            results[(run.variant.name, run.seed)] = _train_and_evaluate(run, plan.checkpoint, train, evaluate)
            run.status = "done"
        for late in plan.late:
            if late.rgb.seed == run.seed and (late_name(plan), run.seed) not in results:
                merged = _late_result(late, results, merge)
                if merged is not None:
                    results[(late_name(plan), run.seed)] = merged
        if on_result is not None:
            on_result(results)
    return results


# ---------------------------------------------------------------------------------------------- table


def aggregate(values: Sequence[float | None]) -> tuple[float, float, float, int] | None:
    """(mean, min, max, count) of the defined values (None and negatives, COCO's "undefined", skipped);
    None when there is none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) >= 0]
    if not kept:
        return None
    return sum(kept) / len(kept), min(kept), max(kept), len(kept)


def _metric_columns(results: Sequence[dict]) -> tuple[list[str], list[str]]:
    """Overall metric keys and the condition names, in first-seen order."""
    conditions: dict[str, None] = {}
    for r in results:
        for name in r.get("conditions") or {}:
            conditions.setdefault(name, None)
    return ["mAP50", "mAP50_95"], list(conditions)


def _values(result: dict, column: str) -> float | None:
    """A result's value of a column (``mAP50``, ``mAP50_95``, ``<condition>/AP50``), in %."""
    if "/" in column:
        condition, key = column.split("/", 1)
        value = (result.get("conditions") or {}).get(condition, {}).get(key)
    else:
        value = (result.get("metrics") or {}).get(column)
    return None if value is None or value < 0 else 100.0 * float(value)


@dataclass
class Row:
    """One line of the table: a name, what it is, its seeds and column -> (mean, min, max, n) or None."""

    name: str
    kind: str  # ours | late | paper
    seeds: list[int]
    cells: dict[str, tuple[float, float, float, int] | None]
    modality: str = ""
    fusion: str = ""
    options: str = ""


def summarize(
    plan_names: Sequence[str], results: Mapping[tuple[str, int], dict], paper: str | None = None
) -> tuple[list[str], list[Row]]:
    """The table: columns (``mAP50``, ``mAP50_95``, then ``<condition>/AP50`` and ``/mAP50_95``) and a
    row per variant with a finished seed (plan order, late fusion last), then the paper's rows for
    ``paper`` (``canonical`` / ``challenging`` / ``""`` for condition columns only; None: no rows)."""
    overall, conditions = _metric_columns(list(results.values()))
    columns = overall + [f"{c}/{k}" for c in conditions for k in ("AP50", "mAP50_95")]
    rows = []
    for name in plan_names:
        mine = sorted((seed, r) for (n, seed), r in results.items() if n == name)
        if not mine:
            continue
        first = mine[0][1]
        rows.append(
            Row(
                name=name,
                kind="late" if first.get("variant") == "late" else "ours",
                seeds=[s for s, _ in mine],
                cells={c: aggregate([_values(r, c) for _, r in mine]) for c in columns},
                modality=str(first.get("modality") or ""),
                fusion=str(first.get("fusion") or ""),
                options=" ".join(f"{k}={v}" for k, v in (first.get("options") or {}).items()),
            )
        )
    if paper is not None:
        rows += _paper_rows(columns, paper)
    return columns, rows


def _paper_rows(columns: Sequence[str], split: str) -> list[Row]:
    """The published numbers where a column shows them: overall for the prepared split, per condition."""
    rows = []
    for modality, numbers in PAPER.items():
        cells: dict[str, tuple[float, float, float, int] | None] = dict.fromkeys(columns)
        for name, (ap50, ap) in numbers.items():
            for column, value in (("AP50", ap50), ("mAP50_95", ap)):
                target = f"{name}/{column}"
                if value is not None and target in cells:
                    cells[target] = (value, value, value, 1)
                if value is not None and name == split:
                    cells["mAP50" if column == "AP50" else "mAP50_95"] = (value, value, value, 1)
        rows.append(Row(f"FRED paper: {modality} (YOLO11, 640)", "paper", [], cells, modality.lower()))
    return rows


def _cell(value: tuple[float, float, float, int] | None, latex: bool = False) -> str:
    if value is None:
        return "-"
    mean, low, high, n = value
    if n == 1 or low == high:
        return f"{mean:.2f}"
    spread = f"[{low:.2f}, {high:.2f}]"
    return f"{mean:.2f} {{\\scriptsize {spread}}}" if latex else f"{mean:.2f} {spread}"


def _shown(columns: Sequence[str]) -> list[tuple[str, str]]:
    """The columns the markdown and LaTeX tables show (overall mAP50 and mAP50:95, AP50 per condition)."""
    heads = {"mAP50": "mAP50", "mAP50_95": "mAP50:95"}
    return [
        (c, heads.get(c, c.replace("/AP50", " AP50"))) for c in columns if "/" not in c or c.endswith("/AP50")
    ]


def markdown_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The table in Markdown: variant, seeds, then the shown columns."""
    shown = _shown(columns)
    body = [
        [r.name, str(len(r.seeds)) if r.seeds else "-", *(_cell(r.cells[c]) for c, _ in shown)] for r in rows
    ]
    return format_table(body, ["variant", "seeds", *(h for _, h in shown)])


def _latex_escape(text: str) -> str:
    special = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
    return "".join(special.get(ch, ch) for ch in text)


def latex_table(columns: Sequence[str], rows: Sequence[Row], caption: str) -> str:
    """The table as a LaTeX ``tabular`` (booktabs), the paper's rows below a rule."""
    shown = _shown(columns)
    lines = [
        f"% {caption}",
        "\\begin{tabular}{l r " + " ".join("r" for _ in shown) + "}",
        "\\toprule",
        " & ".join(["variant", "seeds", *(_latex_escape(h) for _, h in shown)]) + " \\\\",
        "\\midrule",
    ]
    paper_started = False
    for r in rows:
        if r.kind == "paper" and not paper_started:
            lines.append("\\midrule")
            paper_started = True
        cells = [_latex_escape(r.name), str(len(r.seeds)) if r.seeds else "-"]
        cells += [_cell(r.cells[c], latex=True) for c, _ in shown]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def csv_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The table as CSV: every column's mean, min and max (in %) and the number of seeds it averages."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    head = ["variant", "kind", "modality", "fusion", "options", "seeds"]
    writer.writerow(head + [f"{c}_{s}" for c in columns for s in ("mean", "min", "max", "n")])
    for r in rows:
        line: list[Any] = [r.name, r.kind, r.modality, r.fusion, r.options, " ".join(map(str, r.seeds))]
        for c in columns:
            v = r.cells.get(c)
            line += ["", "", "", 0] if v is None else [f"{v[0]:.4f}", f"{v[1]:.4f}", f"{v[2]:.4f}", v[3]]
        writer.writerow(line)
    return out.getvalue()


def runs_csv(columns: Sequence[str], results: Mapping[tuple[str, int], dict]) -> str:
    """One row per finished run and seed with every column's value (in %)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["variant", "seed", *columns])
    for (name, seed), r in results.items():
        values = [_values(r, c) for c in columns]
        writer.writerow([name, seed, *("" if v is None else f"{v:.4f}" for v in values)])
    return out.getvalue()


def write_tables(
    out: Path,
    columns: Sequence[str],
    rows: Sequence[Row],
    results: Mapping[tuple[str, int], dict],
    title: str,
) -> dict[str, Path]:
    """OUT/ablation.md, ablation.csv, ablation.tex and runs.csv (each written atomically)."""
    out = Path(out)
    note = (
        "Cells: mean [min, max] over the training seeds, in %; overall test mAP50 and mAP50:95, then "
        "AP50 per condition (ablation.csv has every column's mean, min, max and AP50:95 per condition)."
    )
    md = f"# {title}\n\n{note}\n\n{markdown_table(columns, rows)}\n"
    return {
        "md": write_text_atomic(out / "ablation.md", md),
        "csv": write_text_atomic(out / "ablation.csv", csv_table(columns, rows)),
        "tex": write_text_atomic(out / "ablation.tex", latex_table(columns, rows, f"{title}. {note}")),
        "runs": write_text_atomic(out / "runs.csv", runs_csv(columns, results)),
    }
