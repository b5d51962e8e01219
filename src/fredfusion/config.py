"""One typed training configuration: defaults, YAML files, CLI overrides and the seed tool's names."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fredfusion.files import write_text_atomic
from fredfusion.spec import (
    ARCHS,
    DEFAULT_INPUT_HW,
    DROPOUT_REGIONS,
    DROPOUT_SIDES,
    FUSIONS,
    MODALITIES,
    NMS_IOU,
    SIZES,
    check_input_hw,
    input_hw_for_width,
)


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key (and file)."""


AUTO_BATCH = -1
"""A batch size of ``auto`` (also written -1, as Ultralytics' ``batch=-1``): the trainer picks the largest
batch that fits (``engine.autobatch``) and records the number it picked."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile modes a run may ask for."""
AUTO_SHARE = -1.0
"""A ``modality_dropout`` of ``auto`` (also written -1): DUAL_TRAINING's share for dual models, else 0."""
DUAL_TRAINING = {"pairs": "any", "modality_dropout": 0.3}
"""What ``pairs: auto`` and ``modality_dropout: auto`` mean for a dual model (docs/PERFORMANCE.md, "Fusion
ablation": with box dropout of the events it finds the hovering drone on every seed); single-modality
models train their required frames without dropout."""


def shown(name: str, value: Any) -> str:
    """A config value as the user writes it (``auto`` for the AUTO sentinels)."""
    auto = (name in BATCH_FIELDS and value == AUTO_BATCH) or (
        name == "modality_dropout" and value == AUTO_SHARE
    )
    return "auto" if auto else str(value)


def parse_share(value: Any) -> float:
    """A modality dropout share: a number in [0, 1], or ``auto`` / -1 (AUTO_SHARE); ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO_SHARE
    if isinstance(value, bool):
        raise ValueError(f"expected a number in [0, 1] or auto, got {value!r}")
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number in [0, 1] or auto, got {value!r}") from None
    if share != AUTO_SHARE and not 0.0 <= share <= 1.0:
        raise ValueError(f"must be within [0, 1] or auto, got {share:g}")
    return share


def train_pairs(cfg: TrainConfig) -> str:
    """The ``pairs`` a run trains on: ``auto`` resolved by modality (DUAL_TRAINING for dual models)."""
    if cfg.pairs != "auto":
        return cfg.pairs
    return str(DUAL_TRAINING["pairs"]) if cfg.modality == "dual" else "required"


def resolved(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping with its ``auto`` training choices (``pairs``, ``modality_dropout``) resolved
    for its modality, as a run trains them."""
    keys = ("modality", "pairs", "modality_dropout")
    cfg = TrainConfig(**{k: config[k] for k in keys if k in config})
    return {**config, "pairs": train_pairs(cfg), "modality_dropout": dropout_share(cfg)}


def dropout_share(cfg: TrainConfig) -> float:
    """The modality dropout share a run trains with: ``auto`` resolved by modality."""
    if cfg.modality_dropout != AUTO_SHARE:
        return cfg.modality_dropout
    return float(DUAL_TRAINING["modality_dropout"]) if cfg.modality == "dual" else 0.0


def parse_batch(value: Any) -> int:
    """A batch size: an integer >= 1, or ``auto`` / -1 (AUTO_BATCH); ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return AUTO_BATCH
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"expected an integer >= 1 or auto, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ValueError(f"expected an integer >= 1 or auto, got {value!r}")
    value = int(value)
    if value != AUTO_BATCH and value < 1:
        raise ValueError(f"must be >= 1 or auto, got {value}")
    return value


@dataclass
class TrainConfig:
    """Everything a training run needs. Names are snake_case; the seed tool's names are accepted too."""

    # data and model
    data: str = "datasets/fred_coco"
    modality: str = "dual"
    model: str = "s"
    arch: str = "yolov5"
    fusion: str = "concat"
    input_shape: list[int] = field(default_factory=lambda: list(DEFAULT_INPUT_HW))  # (height, width)
    weights: str = ""  # initialise from these weights (rgb -> dual mapping supported)
    weights_rgb: str = ""  # dual: the RGB backbone from an RGB model's checkpoint
    weights_event: str = ""  # dual: the event backbone from an event model's checkpoint
    autoanchor: bool = False
    pairs: str = "auto"  # which images train: auto, required (the modality's frames exist), dual, any
    # phases (the seed tool's semantics: epochs counted over the whole run)
    init_epoch: int = 0
    freeze_epoch: int = 50
    unfreeze_epoch: int = 300
    freeze_batch_size: int = 16  # AUTO_BATCH (-1, "auto" in files and flags): the largest that fits
    unfreeze_batch_size: int = 8
    freeze_train: bool = True  # run the freeze phase (backbones frozen) before unfreezing
    freeze_training: bool = False  # train the freeze phase only, then stop
    freeze_untrained: bool = False  # freeze backbones that start from random weights too (default: no phase)
    # optimisation
    optimizer: str = "sgd"  # sgd | adamw | auto (AdamW for short schedules, SGD for long ones)
    init_lr: float = 1e-2
    min_lr_ratio: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    lr_decay_type: str = "cos"
    warmup_epochs: float = 3.0
    nominal_batch: int = 64
    label_smoothing: float = 0.0
    # augmentation
    mosaic: bool = True
    mosaic_prob: float = 0.5
    mixup: bool = True
    mixup_prob: float = 0.5
    special_aug_ratio: float = 0.7
    translate: float = 0.1
    scale: float = 0.5
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    modality_dropout: float = AUTO_SHARE  # dual: share of true pairs trained with one modality blanked
    modality_dropout_region: str = "box_parts"  # what dropout blanks: image, boxes or box_parts
    modality_dropout_side: str = "event"  # which modality dropout blanks: both (50/50), rgb or event
    modality_dropout_ramp: float = 0.5  # share of the run over which the dropout share rises from 0
    # precision and speed
    fp16: bool = True  # mixed precision on GPU (bf16 where supported, else fp16 + GradScaler)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead / max-autotune record CUDA graphs
    compile_cache: str = ""  # "": engine.compiled.compile_cache_dir picks it (environment, XDG)
    ema: bool = True
    num_workers: int = 2
    prefetch_factor: int = 2
    persistent_workers: bool = True
    device: str = ""  # "" = cuda when available, else cpu
    seed: int = 0
    # evaluation and checkpoints
    eval_period: int = 5
    no_eval_map: bool = False
    best_metric: str = "mAP50"
    eval_batch_size: int = 32
    precise_bn: int = 256  # re-estimate BN statistics on this many train images before each evaluation
    conf_thres: float = 0.001
    nms_iou: float = NMS_IOU
    save_period: int = 10
    save_dir: str = "runs/train"
    name: str = ""  # run folder name; "" = modality
    exist_ok: bool = False  # reuse a taken run folder instead of the next free name (dual2, dual3, ...)
    best_alias: str = ""  # also copy best weights here (seed workflow: logs/fred_fusion/fred_fusion_best.pth)
    resume: bool = False
    quick_test: bool = False
    quick_test_batches: int = 100
    log_interval: int = 10
    wandb: bool = False  # also log to Weights & Biases (offline files in the run folder unless WANDB_MODE)
    mlflow: bool = False  # also log to MLflow (files in RUN/mlruns unless MLFLOW_TRACKING_URI)
    # faults: the run goes on through these, and stops with a message beyond them
    max_bad_frame_share: float = 0.01  # share of an epoch's train images that may be unreadable (skipped)
    max_bad_steps: int = 10  # consecutive steps with a non-finite (NaN/inf) loss or gradient

    def run_dir(self) -> Path:
        """Folder of this run's logs and checkpoints."""
        return Path(self.save_dir) / (self.name or self.modality)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON/checkpoint friendly)."""
        return dataclasses.asdict(self)


FIELD_HELP: dict[str, str] = {
    "data": "prepared folder (the output of fredfusion prepare)",
    "modality": "what the model looks at: RGB frames, event frames or both",
    "model": "model size",
    "arch": "detector family: yolov5 (anchor-based, the old tool's) or yolov8 (anchor-free, DFL head)",
    "fusion": "how a dual model joins its two inputs",
    "input_shape": "network input height and width, multiples of 32",
    "weights": "checkpoint to initialise from (an RGB model fills both backbones of a dual one)",
    "weights_rgb": "RGB model checkpoint whose backbone initialises a dual model's RGB backbone",
    "weights_event": "event model checkpoint whose backbone initialises a dual model's event backbone",
    "autoanchor": "fit k-means anchors on the train boxes, kept when their recall is higher",
    "pairs": "which train images: required (the modality's frames exist), dual (true pairs), any (the "
    "unpaired ones too, the missing modality blanked), auto (any for dual models, else required)",
    "init_epoch": "epoch to start counting from",
    "freeze_epoch": "epochs of the freeze phase (backbones frozen)",
    "unfreeze_epoch": "total epochs of the run",
    "freeze_batch_size": "batch size of the freeze phase (auto: the largest that fits, the lr scaled by "
    "batch / nominal_batch)",
    "unfreeze_batch_size": "batch size after the freeze phase (auto: the largest that fits, the lr scaled "
    "by batch / nominal_batch)",
    "freeze_train": "run the freeze phase before unfreezing",
    "freeze_training": "train the freeze phase only, then stop",
    "freeze_untrained": "run the freeze phase even when the backbones start from random weights",
    "optimizer": "sgd, adamw, or auto (AdamW for short schedules, SGD for long ones)",
    "init_lr": "learning rate at batch 64, scaled by batch / 64",
    "min_lr_ratio": "final learning rate as a share of init_lr",
    "momentum": "SGD momentum (AdamW beta1)",
    "weight_decay": "weight decay (not on BN weights and biases)",
    "lr_decay_type": "learning-rate schedule after the warm-up",
    "warmup_epochs": "epochs of learning-rate warm-up",
    "nominal_batch": "batch size the loss is scaled to",
    "label_smoothing": "class label smoothing",
    "mosaic": "Mosaic augmentation",
    "mosaic_prob": "share of images built by Mosaic",
    "mixup": "MixUp augmentation",
    "mixup_prob": "share of images blended by MixUp",
    "special_aug_ratio": "share of the epochs with Mosaic and MixUp",
    "translate": "random translation, share of the input size",
    "scale": "random scale range (1 +- scale)",
    "fliplr": "probability of a horizontal flip",
    "hsv_h": "hue jitter of RGB frames",
    "hsv_s": "saturation jitter of RGB frames",
    "hsv_v": "value (brightness) jitter of RGB frames",
    "modality_dropout": (
        "share of the true pairs of a dual model trained with one modality blanked, drawn per sample "
        "and step (which modality: modality_dropout_side; what: modality_dropout_region); auto: 0.3 for "
        "dual models, 0 otherwise"
    ),
    "modality_dropout_side": "which modality dropout blanks: both (RGB or events, 50/50), rgb or event",
    "modality_dropout_ramp": (
        "share of the run's epochs over which the modality dropout share rises linearly from 0 to "
        "modality_dropout (0: the whole share from the first step)"
    ),
    "modality_dropout_region": (
        "what modality dropout blanks: image (the whole frame, zeros), boxes (the grown target boxes "
        "where the other modality shows them take that modality's content from elsewhere in the frame; "
        "the rest of the frame stays) or box_parts (as boxes, but a random part of each box, up to 0.8 "
        "of its size, is spared)"
    ),
    "fp16": "mixed precision on a GPU (bf16 where supported, else fp16)",
    "channels_last": "channels-last memory format",
    "compile": "torch.compile the model, the loss and the evaluation forward (without CUDA graphs) with a "
    "persistent cache (compile_cache); the first step of each phase and the first evaluation print their "
    "compile time and whether the cache served them",
    "compile_mode": "torch.compile mode; reduce-overhead and max-autotune record CUDA graphs (one process)",
    "compile_cache": "folder of torch.compile's persistent cache (empty: $FREDFUSION_CACHE/compile, else "
    "$TORCHINDUCTOR_CACHE_DIR, else ~/.cache/fredfusion/compile or under $XDG_CACHE_HOME)",
    "ema": "keep an exponential moving average of the weights (evaluated and saved as best)",
    "num_workers": "loader worker processes",
    "prefetch_factor": "batches each loader worker reads ahead",
    "persistent_workers": "keep loader workers alive between epochs",
    "device": "cpu, cuda, cuda:1 or 1 (empty: cuda when available, else cpu)",
    "seed": "random seed of sampling, augmentation and initialisation",
    "eval_period": "evaluate on the val split every this many epochs (and at the end)",
    "no_eval_map": "skip mAP; best.pth by validation loss",
    "best_metric": "what best.pth is chosen by",
    "eval_batch_size": "batch size of evaluation",
    "precise_bn": "train images to re-estimate BatchNorm statistics on before each evaluation",
    "conf_thres": "score threshold of evaluation",
    "nms_iou": "NMS IoU threshold of evaluation",
    "save_period": "also keep epNNN.pth every this many epochs (0: never)",
    "save_dir": "folder of the run folders",
    "name": "run folder name (empty: the modality); a taken one gets the next free number, dual2, dual3",
    "exist_ok": "write into a taken run folder instead of the next free name",
    "best_alias": "also copy best.pth to this path",
    "resume": "continue a run: a run folder or its last.pth (alone: last.pth of the run folder named)",
    "quick_test": "train quick_test_batches batches and print a check list",
    "quick_test_batches": "batches of a quick test",
    "log_interval": "steps between progress updates and logged losses",
    "wandb": "also log to Weights & Biases (offline files in RUN/wandb unless WANDB_MODE is set)",
    "mlflow": "also log to MLflow (files in RUN/mlruns unless MLFLOW_TRACKING_URI is set)",
    "max_bad_frame_share": "share of an epoch's train images that may be unreadable (skipped)",
    "max_bad_steps": "consecutive steps with a NaN / inf loss that stop the run",
}
"""What each field means: the help of its ``fredfusion train`` flag."""


# The seed tool's spellings (train_fred_fusion.py) mapped to ours.
ALIASES: dict[str, str] = {
    "phi": "model",
    "Init_Epoch": "init_epoch",
    "Freeze_Epoch": "freeze_epoch",
    "UnFreeze_Epoch": "unfreeze_epoch",
    "Unfreeze_Epoch": "unfreeze_epoch",
    "epochs": "unfreeze_epoch",
    "Freeze_batch_size": "freeze_batch_size",
    "Unfreeze_batch_size": "unfreeze_batch_size",
    "Freeze_Train": "freeze_train",
    "Init_lr": "init_lr",
    "optimizer_type": "optimizer",
    "model_path": "weights",
    "eval_flag": None,  # handled: eval_flag false == no_eval_map true
    "imgsz": None,  # handled: width; height = 16:9 rounded to 32
    "Min_lr": None,  # handled: ratio to init_lr
    "batch_size": None,  # handled: both phases
    "mixed_precision": "fp16",
    "amp": "fp16",
    "workers": "num_workers",
    # the names eval / predict / bench and Ultralytics use
    "batch": None,  # handled: both phases, like batch_size
    "conf": "conf_thres",
    "iou": "nms_iou",
    "lr0": "init_lr",
    "lr": "init_lr",
    "project": "save_dir",
    "out": None,  # handled: the run folder, save_dir / name
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {
    "modality": MODALITIES,
    "model": tuple(SIZES),
    "arch": ARCHS,
    "fusion": FUSIONS,
    "optimizer": ("sgd", "adamw", "adam", "auto"),
    "lr_decay_type": ("cos", "step", "linear"),
    "pairs": ("auto", "required", "dual", "any"),
    "modality_dropout_region": DROPOUT_REGIONS,
    "modality_dropout_side": tuple(DROPOUT_SIDES),
    "best_metric": ("mAP50", "mAP50_95", "val_loss"),
    "compile_mode": COMPILE_MODES,
}
BATCH_FIELDS = ("freeze_batch_size", "unfreeze_batch_size")
"""The fields that take ``auto`` (stored as AUTO_BATCH until the trainer picks the number)."""


def parse_bool(value: Any) -> bool:
    """Accept true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y"):
        return True
    if text in ("0", "false", "no", "off", "n"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _field_type(name: str) -> Any:
    hints = typing.get_type_hints(TrainConfig)
    return hints[name]


def _as_int(value: Any) -> int:
    if value is None or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _coerce(name: str, value: Any, kind: Any = None) -> Any:
    """``value`` converted to the type of field ``name`` (or ``kind``); ConfigError naming the key."""
    kind = _field_type(name) if kind is None else kind
    try:
        if value is None:
            raise ValueError("a value is required (got null)")
        if name in BATCH_FIELDS or name in ("batch_size", "batch"):
            return parse_batch(value)
        if name == "modality_dropout":
            return parse_share(value)
        if kind is bool:
            return parse_bool(value)
        if kind is int:
            return _as_int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError(f"expected a string, got {value!r}")
            return str(value)
        if typing.get_origin(kind) in (list, types.GenericAlias) or kind == list[int]:
            if isinstance(value, str):
                value = [v for v in value.replace("x", ",").replace(" ", ",").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"expected a list, got {value!r}")
            return [_as_int(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return value


def resolve_key(key: str) -> str | None:
    """Map a user key (ours, the seed's, or dashed) to a field name; None for the specially handled ones."""
    if key in FIELDS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    dashed = key.replace("-", "_")
    if dashed in FIELDS:
        return dashed
    lowered = dashed.lower()
    if lowered in FIELDS:
        return lowered
    known = sorted(set(FIELDS) | set(ALIASES))
    hint = difflib.get_close_matches(key, known, n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(f"unknown config key '{key}'{suggestion}")


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str = "") -> TrainConfig:
    """Return a copy of cfg with values (any accepted spelling) applied and validated."""
    where = f" in {source}" if source else ""
    updates: dict[str, Any] = {}
    for key, value in values.items():
        try:
            name = resolve_key(str(key))
            if name is None:
                updates.update(_special(str(key), value, {**cfg.to_dict(), **updates}))
            else:
                updates[name] = _coerce(name, value)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None
    new = dataclasses.replace(cfg, **updates)
    validate(new, source)
    return new


def _special(key: str, value: Any, current: dict[str, Any]) -> dict[str, Any]:
    if key == "eval_flag":
        return {"no_eval_map": not _coerce(key, value, bool)}
    if key == "imgsz":
        width = _coerce(key, value, int)
        return {"input_shape": list(input_hw_for_width(width))}
    if key == "Min_lr":
        return {"min_lr_ratio": _coerce(key, value, float) / float(current["init_lr"])}
    if key in ("batch_size", "batch"):
        size = _coerce(key, value, int)
        return {"freeze_batch_size": size, "unfreeze_batch_size": size}
    if key == "out":
        folder = Path(_coerce(key, value, str))
        return {"save_dir": str(folder.parent), "name": folder.name}
    raise ConfigError(f"unknown config key '{key}'")


# (fields, lowest, highest) allowed values
RANGES: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (
        (
            "eval_period",
            "log_interval",
            "nominal_batch",
            "eval_batch_size",
            "prefetch_factor",
            "quick_test_batches",
            "max_bad_steps",
        ),
        1,
        math.inf,
    ),
    (
        ("num_workers", "precise_bn", "save_period", "seed", "weight_decay", "warmup_epochs", "scale"),
        0,
        math.inf,
    ),
    (
        (
            "mosaic_prob",
            "mixup_prob",
            "special_aug_ratio",
            "fliplr",
            "max_bad_frame_share",
            "min_lr_ratio",
            "momentum",
            "label_smoothing",
            "translate",
            "conf_thres",
            "nms_iou",
            "hsv_h",
            "hsv_s",
            "hsv_v",
            "modality_dropout_ramp",
        ),
        0.0,
        1.0,
    ),
    (("init_lr",), 0.0, math.inf),
)


def validate(cfg: TrainConfig, source: str = "") -> None:
    """Check choices and ranges; raise ConfigError naming the key."""
    where = f" in {source}" if source else ""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name}: {getattr(cfg, name)!r} is not one of {', '.join(choices)}{where}")
    try:
        check_input_hw(cfg.input_shape, "input_shape")
    except ValueError as exc:
        raise ConfigError(f"{exc}{where}") from None
    for name in BATCH_FIELDS:
        value = getattr(cfg, name)
        if value != AUTO_BATCH and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{name}: must be >= 1 or auto, got {value}{where}")
    for names, low, high in RANGES:
        for name in names:
            value = getattr(cfg, name)
            if not (low <= value <= high and math.isfinite(value)):
                bound = f"within [{low}, {high}]" if high != math.inf else f">= {low}"
                raise ConfigError(f"{name}: must be {bound}, got {value}{where}")
    try:
        parse_share(cfg.modality_dropout)
    except ValueError as exc:
        raise ConfigError(f"modality_dropout: {exc}{where}") from None
    if cfg.init_lr == 0:
        raise ConfigError(f"init_lr: must be > 0, got {cfg.init_lr}{where}")
    _check_dual_options(cfg, where)
    if cfg.unfreeze_epoch < 1 or cfg.init_epoch < 0 or cfg.freeze_epoch < 0:
        raise ConfigError(f"epochs: need unfreeze_epoch >= 1 and non-negative init/freeze epochs{where}")


def _check_dual_options(cfg: TrainConfig, where: str) -> None:
    """The options of dual models only: per-branch weights need two backbones, dropout two modalities."""
    branches = [f"weights_{k}" for k in ("rgb", "event") if getattr(cfg, f"weights_{k}")]
    if branches and (cfg.modality != "dual" or cfg.fusion == "early"):
        raise ConfigError(
            f"{' / '.join(branches)}: initialise one backbone of a dual model with two backbones "
            f"(fusion concat or attention), not modality {cfg.modality} fusion {cfg.fusion}; "
            f"use weights for a single model{where}"
        )
    if cfg.modality_dropout > 0 and cfg.modality != "dual":
        raise ConfigError(
            f"modality_dropout: blanks one modality of a dual model, not of modality {cfg.modality}{where}"
        )


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    return data


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- CLI overrides."""
    cfg = TrainConfig()
    if path is not None:
        cfg = apply_overrides(cfg, load_yaml(path), source=str(path))
    if overrides:
        cfg = apply_overrides(cfg, overrides, source="command line")
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the effective config as YAML (atomically); OSError becomes a ConfigError naming the file."""
    path = Path(path)
    try:
        write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write config ({exc.strerror or exc})") from None
