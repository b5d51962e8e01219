"""`fredfusion export`: ONNX export of a checkpoint with decoding in the graph, checked with onnxruntime.

The graph takes one float input per modality the model uses, named ``rgb`` and/or ``event``, shape
``(B, 3, H, W)`` in [0, 1], and returns ``predictions`` ``(B, N, 5 + nc)``: rows ``cx, cy, w, h``
(input pixels), objectness, class probabilities, as :func:`fredfusion.model.postprocess.decode`
gives them. Non-maximum suppression stays outside the graph.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fredfusion.spec import frames_for

__all__ = [
    "BOX_ATOL",
    "BOX_RTOL",
    "OUTPUT_NAME",
    "SCORE_ATOL",
    "DecodedDetector",
    "ExportError",
    "Parity",
    "compare_outputs",
    "export_onnx",
    "input_names_for",
    "verify_onnx",
]

OUTPUT_NAME = "predictions"
BOX_RTOL = 1e-3
"""Box coordinates (cx, cy, w, h in input pixels) pass when |onnx - torch| <= BOX_RTOL x |torch| + BOX_ATOL:
the float32 kernels of the two runtimes differ more the larger the coordinate (docs/DESIGN.md)."""
BOX_ATOL = 0.05
"""Pixels: the floor of the box tolerance, for coordinates near zero (a twentieth of a pixel)."""
SCORE_ATOL = 1e-3
"""Objectness and class probabilities (in [0, 1]) pass when |onnx - torch| <= SCORE_ATOL."""
_EXTRA_HINT = 'install the export extra: pip install -e ".[export]"'


class ExportError(ValueError):
    """An export that cannot be done or did not pass its check; the message says why."""


def input_names_for(modality: str) -> list[str]:
    """ONNX input names of a model of ``modality``: the frame kinds it reads (``spec.frames_for``)."""
    return list(frames_for(modality))


class DecodedDetector(nn.Module):
    """A detector whose forward takes only the inputs of its modality and returns decoded rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.modality = str(model.modality)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        given = dict(zip(frames_for(self.modality), inputs))
        return self.model.decode(self.model(given.get("rgb"), given.get("event")))


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export needs the '{module}' package, which is not installed; {_EXTRA_HINT}"
        ) from None


def _random_inputs(names: list[str], batch: int, input_hw: tuple[int, int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.rand((batch, 3, *input_hw), generator=gen) for _ in names]


@dataclass(frozen=True)
class Parity:
    """How far onnxruntime's output is from PyTorch's: box coordinates (largest absolute difference in
    pixels, and the largest share of the tolerance used) and scores (largest absolute difference)."""

    box_abs: float
    box_used: float  # max of |diff| / (BOX_RTOL |ref| + BOX_ATOL): 1.0 is the limit
    score_abs: float

    @property
    def ok(self) -> bool:
        """Both within their tolerance."""
        return self.box_used <= 1.0 and self.score_abs <= SCORE_ATOL

    def __str__(self) -> str:
        return (
            f"boxes max abs difference {self.box_abs:.3g} px ({100 * self.box_used:.0f}% of the tolerance "
            f"{BOX_RTOL:g} x value + {BOX_ATOL:g} px), scores {self.score_abs:.3g} (limit {SCORE_ATOL:g})"
        )


def compare_outputs(got: np.ndarray, ref: np.ndarray) -> Parity:
    """``Parity`` of ``got`` against ``ref``, both ``(B, N, 5 + nc)`` decoded rows (cx, cy, w, h, scores);
    NaN anywhere fails."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    box = np.abs(got[..., :4] - ref[..., :4])
    score = np.abs(got[..., 4:] - ref[..., 4:])
    used = box / (BOX_RTOL * np.abs(ref[..., :4]) + BOX_ATOL)

    def worst(x: np.ndarray) -> float:
        return float("inf") if x.size and not np.isfinite(x).all() else float(x.max(initial=0.0))

    return Parity(worst(box), worst(used), worst(score))


def verify_onnx(
    onnx_path: Path, model: nn.Module, input_hw: tuple[int, int], batch: int = 1, seed: int = 0
) -> Parity:
    """onnxruntime (CPU) against the PyTorch model on the same random inputs (``compare_outputs``).

    ``model`` is the FusionYOLO (decoding is added here, as in the export). Raises ExportError when
    the ONNX file's input names are not those of the model's modality.
    """
    ort = _require("onnxruntime")
    wrapper = DecodedDetector(model).eval()
    names = input_names_for(wrapper.modality)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    got_names = [i.name for i in session.get_inputs()]
    if got_names != names:
        raise ExportError(
            f"{onnx_path}: inputs are {got_names}, expected {names} for a {wrapper.modality} model"
        )
    xs = _random_inputs(names, batch, input_hw, seed)
    (out,) = session.run([OUTPUT_NAME], {n: x.numpy() for n, x in zip(names, xs)})
    with torch.no_grad():
        ref = wrapper(*xs).numpy()
    if out.shape != ref.shape:
        raise ExportError(
            f"{onnx_path}: onnxruntime output shape {out.shape} differs from PyTorch {ref.shape}"
        )
    return compare_outputs(out, ref)


def _load_for_export(
    weights: Path, opset: int, input_hw: tuple[int, int] | None, check: bool
) -> tuple[Any, nn.Module, tuple[int, int]]:
    """The ``onnx`` module, the model on the CPU and its input shape; ExportError (FileNotFoundError
    for a missing file) when the export cannot be done."""
    from fredfusion.model.weights import CheckpointError, input_hw_of, load_model

    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    onnx = _require("onnx")
    if check:
        _require("onnxruntime")
    if not 7 <= int(opset) <= 23:
        raise ExportError(f"--opset must be between 7 and 23, got {opset}")
    try:
        model, payload = load_model(weights, "cpu")
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    try:
        hw = input_hw_of(payload, input_hw, str(weights))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return onnx, model, hw


def _trace(
    wrapper: DecodedDetector, names: list[str], hw: tuple[int, int], out: Path, opset: int, dynamic: bool
) -> tuple[int, int]:
    """Trace ``wrapper`` into the ONNX file ``out``; return the (rows, columns) of its output."""
    example = tuple(_random_inputs(names, 1, hw, seed=0))
    axes = {n: {0: "batch"} for n in [*names, OUTPUT_NAME]} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        torch.onnx.export(
            wrapper,
            example,
            str(out),
            dynamo=False,
            input_names=names,
            output_names=[OUTPUT_NAME],
            opset_version=int(opset),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    wrapper.eval()  # the exporter restores the mode it found; keep inference mode for the check
    with torch.no_grad():
        n_rows, n_cols = wrapper(*example).shape[1:]
    return n_rows, n_cols


def _finish_graph(
    onnx: Any, out: Path, model: nn.Module, hw: tuple[int, int], rows_cols: tuple[int, int]
) -> tuple[Any, ...]:
    """Write the model description into the file's metadata and the static output sizes into its
    graph, check and save it; return the output dimensions (``batch`` when dynamic)."""
    proto = onnx.load(str(out))
    meta = {
        "modality": model.modality,
        "size": model.size,
        "fusion": model.fusion,
        "num_classes": str(model.num_classes),
        "strides": ",".join(str(s) for s in model.strides),
        "input_shape": f"{hw[0]},{hw[1]}",
        "output": "cx,cy,w,h (input pixels),objectness,class probabilities",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    for d, size in zip(list(out_dims)[1:], rows_cols):  # static: fixed by the input size
        d.dim_value = int(size)
    dims = [d.dim_param or d.dim_value for d in out_dims]
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return tuple(dims)


def _check_parity(
    out: Path, name: Path, model: nn.Module, hw: tuple[int, int], batch: int, log: Callable[[str], None]
) -> Parity:
    """onnxruntime against PyTorch on the file ``out`` (to be renamed ``name``), logged; ExportError
    outside the tolerances."""
    parity = verify_onnx(out, model, hw, batch=batch)
    log(f"onnxruntime check (batch {batch}) vs PyTorch: {parity} ({'ok' if parity.ok else 'FAILED'})")
    if not parity.ok:
        raise ExportError(
            f"{name}: onnxruntime output differs from PyTorch ({parity}); the exported graph is not "
            f"faithful, so no file was written"
        )
    return parity


def export_onnx(
    weights: Path,
    out: Path | None = None,
    *,
    opset: int = 17,
    dynamic: bool = False,
    input_hw: tuple[int, int] | None = None,
    check: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export a checkpoint to ONNX (decoding in the graph) and check it against PyTorch.

    ``out`` defaults to the weights path with suffix ``.onnx``; ``input_hw`` to the training
    ``config.input_shape`` of the checkpoint (``model.weights.input_hw_of``). The batch dimension is 1,
    or named ``batch`` and dynamic with ``dynamic``. With ``check``, onnxruntime runs the file on random
    inputs (batch 2 when dynamic); box coordinates must agree within :data:`BOX_RTOL` of their value
    (+ :data:`BOX_ATOL` px) and scores within :data:`SCORE_ATOL`, else ExportError. The file is written
    under a temp name and renamed once it passed: a failed export leaves no file behind.
    Returns ``{"path", "inputs", "input_hw", "output_shape", "parity", "check_batch"}``.
    """
    weights = Path(weights)
    onnx, model, hw = _load_for_export(weights, opset, input_hw, check)
    out = Path(out) if out is not None else weights.with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        result = _export_to(tmp, out, onnx, model, hw, opset, dynamic, check, log)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    log(
        f"export: wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {opset}): {model.modality} "
        f"YOLO-{model.size}; inputs {result.pop('shapes')}; output {OUTPUT_NAME} {result['output_shape']}"
    )
    return result


def _export_to(
    tmp: Path,
    out: Path,
    onnx: Any,
    model: nn.Module,
    hw: tuple[int, int],
    opset: int,
    dynamic: bool,
    check: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Trace, describe and (with ``check``) verify the graph in the file ``tmp`` meant for ``out``."""
    wrapper = DecodedDetector(model.float()).eval()
    names = input_names_for(wrapper.modality)
    dims = _finish_graph(onnx, tmp, model, hw, _trace(wrapper, names, hw, tmp, opset, dynamic))
    result: dict[str, Any] = {
        "path": out,
        "inputs": names,
        "input_hw": hw,
        "output_shape": dims,
        "parity": None,
        "check_batch": None,
        "shapes": ", ".join(f"{n} ({'B' if dynamic else 1}, 3, {hw[0]}, {hw[1]})" for n in names),
    }
    if check:
        batch = 2 if dynamic else 1
        result.update(parity=_check_parity(tmp, out, model, hw, batch, log), check_batch=batch)
    return result
