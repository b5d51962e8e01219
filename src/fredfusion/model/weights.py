"""Reading weights: checkpoints loaded safely (weights_only), the model they describe rebuilt, and any
supported weights file (``model.convert``) loaded into a model with a report of what was loaded and skipped.

Writing checkpoints (atomically, during training) and resuming belong to ``engine.checkpoint``.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fredfusion.model.convert import Converted, convert_state_dict, layout_of, with_layout
from fredfusion.spec import DEFAULT_INPUT_HW, check_input_hw

_WRAPPERS = ("ema", "model", "state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_BACKBONE = re.compile(r"^backbone(?:_rgb|_event)?\.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True): files that would run code are refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"(a pickle that could run code, or not a fredfusion checkpoint; an Ultralytics .pt holds the "
            f"model object: save its state_dict() and load that). "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a fredfusion checkpoint (expected a mapping)")
    return payload


def model_meta(model: torch.nn.Module) -> dict[str, Any]:
    """What it takes to rebuild the network: family, modality, size, fusion, classes, anchors (YOLOv5
    family) and the backbone layout when it is the old tool's v5.0 one."""
    meta = {
        "arch": getattr(model, "arch", "yolov5"),
        "modality": model.modality,
        "size": model.size,
        "fusion": model.fusion,
        "num_classes": model.num_classes,
    }
    if getattr(model, "anchors", None) is not None:
        meta["anchors"] = model.anchors.detach().cpu().tolist()
    if layout_of(model) != "v6":
        meta["layout"] = layout_of(model)
    return meta


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def state_dict_of(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to use from a checkpoint: EMA when present, else the raw model (the old tool's files:
    ``model``, ``state_dict`` or ``model_state_dict``), else the payload itself when it is a state dict."""
    for key in _WRAPPERS:
        if _is_state_dict(payload.get(key)):
            return payload[key]
    if _is_state_dict(payload):
        return payload
    raise CheckpointError("checkpoint has no model weights")


def read_weights(path: Path, anchors: torch.Tensor | None = None) -> Converted:
    """Any supported weights file (fredfusion, the old tool's, YOLOv5 state dicts) in this package's names.

    ``anchors`` replace the old tool's default anchors. CheckpointError names the file when it is missing,
    unreadable or of no known layout.
    """
    payload = load_checkpoint(path)
    try:
        state = state_dict_of(payload)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    src: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        src[name] = value
    try:
        out = convert_state_dict(src, anchors)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    meta = payload.get("meta")
    if isinstance(meta, dict):
        out.modality, out.fusion = meta.get("modality", out.modality), meta.get("fusion", out.fusion)
        out.size, out.num_classes = meta.get("size", out.size), meta.get("num_classes", out.num_classes)
        out.arch = str(meta.get("arch", "yolov5"))  # checkpoints before the second family: yolov5
        out.kind = "a fredfusion checkpoint"
    return out


@dataclass
class LoadReport:
    """What ``load_weights`` did: tensors of the model loaded, skipped (by reason), and the file's tensors
    with no place in the model (e.g. the event backbone of a dual file loaded into an rgb model)."""

    kind: str
    total: int
    loaded: list[str]
    skipped: dict[str, list[str]]
    unused: list[str]
    backbones: bool  # every backbone tensor of the model came from the file
    shared_backbone: bool  # one source backbone went into both backbones of a dual model

    def lines(self, path: Path) -> list[str]:
        """One summary line, then one line per group of skipped tensors and one for unused file tensors."""
        note = ", its backbone in both backbones" if self.shared_backbone else ""
        lines = [f"weights: loaded {len(self.loaded)}/{self.total} tensors from {path} ({self.kind}{note})"]
        for reason, names in self.skipped.items():
            lines.append(f"weights: skipped {_count(names)} ({_groups(names)}): {reason}")
        if self.unused:
            lines.append(f"weights: unused from the file: {_count(self.unused)} ({_groups(self.unused)})")
        return lines


def _count(names: list[str]) -> str:
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''}"


def _groups(names: list[str]) -> str:
    """Module names of tensors, e.g. ``head, backbone_rgb.stage4`` (at most 8, then a count)."""
    groups = list(dict.fromkeys(".".join(n.split(".")[: 2 if _BACKBONE.match(n) else 1]) for n in names))
    return ", ".join(groups[:8]) + (f" and {len(groups) - 8} more" if len(groups) > 8 else "")


def _source_of(
    name: str, dst: torch.Tensor, src: dict[str, torch.Tensor], other: dict[str, str]
) -> tuple[str | None, torch.Tensor | None]:
    """The source key and value for the model tensor ``name``: the same name and shape, else for a
    backbone tensor the one under the ``other`` backbone prefix (one backbone fills both of a dual model;
    a 3-channel stem kernel fills both halves of a 6-channel one, scaled by 0.5)."""
    prefix = _BACKBONE.match(name)
    keys = [name] if prefix is None else [name, other[prefix[0]] + name[prefix.end() :]]
    for key in keys:
        value = src.get(key)
        if value is not None and value.shape == dst.shape:
            return key, value
    if prefix is None:
        return None, None
    for key in keys:  # a 3-channel stem kernel into a 6-channel (early fusion) stem
        value = src.get(key)
        if (
            value is not None
            and value.dim() == 4
            and tuple(dst.shape) == (value.shape[0], 2 * value.shape[1], *value.shape[2:])
        ):
            return key, torch.cat((value, value), dim=1) * 0.5
    return None, None


def load_weights(model: torch.nn.Module, source: Converted) -> LoadReport:
    """Copy every tensor of ``source`` that fits into ``model`` (see ``_source_of``); the others keep their
    values. A single-backbone model takes a dual file's backbone of its modality (RGB for early fusion). A
    head whose class count differs stays as initialised, and so do the anchors then (the file's belong to
    its head)."""
    src = source.state
    other = {
        "backbone.": "backbone_event." if model.modality == "event" else "backbone_rgb.",
        "backbone_rgb.": "backbone.",
        "backbone_event.": "backbone.",
    }
    own = model.state_dict()
    found = {name: _source_of(name, dst, src, other) for name, dst in own.items()}
    head_loaded = all(found[n][1] is not None for n in own if n.startswith("head."))
    skipped: dict[str, list[str]] = {}
    loaded: list[str] = []
    with torch.no_grad():
        for name, dst in own.items():
            value = found[name][1]
            if name == "anchors" and value is not None and not head_loaded:
                reason = "the file's anchors go with its head, which was not loaded: anchors kept"
            elif value is not None:
                dst.copy_(value)
                loaded.append(name)
                continue
            elif name.startswith("head.") and source.num_classes not in (None, model.num_classes):
                reason = (
                    f"the file's head has {source.num_classes} classes, the model {model.num_classes}: "
                    f"re-initialised"
                )
            elif name in src:
                reason = "shapes differ from the file's: left as initialised"
            else:
                reason = "not in the file: left as initialised"
            skipped.setdefault(reason, []).append(name)
    used = {found[name][0] for name in loaded}
    backbone = [n for n in own if _BACKBONE.match(n)]
    return LoadReport(
        kind=source.kind,
        total=len(own),
        loaded=loaded,
        skipped=skipped,
        unused=[k for k in src if k not in used and k not in own],
        backbones=bool(backbone) and all(n in set(loaded) for n in backbone),
        shared_backbone=hasattr(model, "backbone_rgb") and any(k.startswith("backbone.") for k in src),
    )


BRANCHES: tuple[str, ...] = ("rgb", "event")
"""The backbones of a dual model with two of them, named after the frames they read."""


def backbone_tensors(model: torch.nn.Module) -> list[str]:
    """The state-dict names of the model's backbone tensors (what the freeze phase needs loaded)."""
    return [n for n in model.state_dict() if _BACKBONE.match(n)]


@dataclass
class BranchReport:
    """What ``load_branch`` did: the backbone it filled, its tensors (all from the file) and the file."""

    branch: str
    loaded: list[str]
    kind: str
    said: str  # what the file says it is, e.g. "rgb YOLO-n yolov5"

    def line(self, path: Path) -> str:
        """One summary line, like the ``weights:`` one."""
        return (
            f"weights_{self.branch}: loaded {len(self.loaded)}/{len(self.loaded)} backbone_{self.branch} "
            f"tensors from {path} ({self.kind}, {self.said}; its neck and head not used)"
        )


def _branch_mismatch(model: torch.nn.Module, source: Converted, branch: str) -> str | None:
    """Why ``source`` cannot initialise the model's ``branch`` backbone (None: it can)."""
    arch = getattr(model, "arch", "yolov5")
    if source.modality == "dual":
        return f"a dual model's checkpoint; --weights_{branch} takes an {branch} model's (dual: --weights)"
    if source.modality not in (None, branch):
        return f"an {source.modality} model's checkpoint, not an {branch} one (--weights_{branch})"
    if source.arch not in (None, arch):
        return f"a {source.arch} checkpoint; this run's family is --arch {arch}"
    if source.size not in (None, model.size):
        return f"a YOLO-{source.size} checkpoint; this run's model is YOLO-{model.size} (--model)"
    return None


def load_branch(model: torch.nn.Module, source: Converted, branch: str, path: Path) -> BranchReport:
    """Copy the backbone of a single-modality checkpoint (``source``, read by ``read_weights``) into the
    ``backbone_<branch>`` of a dual model with two backbones, every tensor or none.

    A file of another modality (or a dual one), family or size, or whose backbone tensors do not all fit
    by name and shape, is a CheckpointError naming ``path`` (one line); a model without that backbone
    a ValueError.
    """
    if branch not in BRANCHES or not hasattr(model, f"backbone_{branch}"):
        raise ValueError(f"--weights_{branch}: the model has no backbone_{branch} (dual, two backbones)")
    why = _branch_mismatch(model, source, branch)
    prefix = f"backbone_{branch}."
    own = {n: t for n, t in model.state_dict().items() if n.startswith(prefix)}
    pairs = {n: source.state.get("backbone." + n[len(prefix) :]) for n in own}
    misfit = [n for n, v in pairs.items() if v is None or v.shape != own[n].shape]
    if why is None and misfit:
        layouts = {"v5": "YOLOv5 v5.0", "v6": "v6"}
        hint = (
            f"; its backbone layout is {layouts[source.layout]}, the model's {layouts[layout_of(model)]}"
            if source.layout != layout_of(model)
            else ""
        )
        why = (
            f"its backbone does not fit backbone_{branch}: {len(misfit)} of {len(own)} tensors missing or of "
            f"another shape (first: backbone.{misfit[0][len(prefix) :]}){hint}"
        )
    if why is not None:
        raise CheckpointError(f"{path}: {why}")
    with torch.no_grad():
        for name, dst in own.items():
            dst.copy_(pairs[name])  # type: ignore[arg-type]
    said = " ".join(
        [source.modality or "a model that does not say its sensor"]
        + ([f"YOLO-{source.size}"] if source.size else [])
        + ([source.arch] if source.arch else [])
    )
    return BranchReport(branch, list(own), source.kind, said)


def input_hw_of(payload: dict[str, Any], given: Any = None, source: str = "checkpoint") -> tuple[int, int]:
    """The input (height, width) to run a checkpoint at: ``given`` (a flag) when set, else the training
    ``config.input_shape`` stored in ``payload``, else DEFAULT_INPUT_HW. ValueError names where a bad
    shape came from (``source`` names the checkpoint)."""
    if given is not None:
        return check_input_hw(given, "--input-shape")
    shape = (payload.get("config") or {}).get("input_shape") or list(DEFAULT_INPUT_HW)
    return check_input_hw(shape, f"input shape from {source} (config.input_shape)")


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a fredfusion checkpoint (best.pth, last.pth, epNNN.pth)."""
    from fredfusion.model.build import build_model

    payload = load_checkpoint(path)
    meta = payload.get("meta")
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: no model description ('meta'); not a fredfusion checkpoint (weights of the old tool or "
            f"a YOLOv5 state dict: `fredfusion convert --weights {path} --out OUT.pth` makes one)"
        )
    anchors = meta.get("anchors")
    model = build_model(
        meta["modality"],
        meta["size"],
        meta["fusion"],
        num_classes=int(meta["num_classes"]),
        anchors=torch.tensor(anchors, dtype=torch.float32) if anchors is not None else None,
        arch=str(meta.get("arch", "yolov5")),
    )
    model = with_layout(model, meta.get("layout", "v6"))
    try:
        model.load_state_dict(state_dict_of(payload), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the described model ({exc})") from None
    return model.to(device).eval(), payload
