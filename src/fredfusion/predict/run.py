"""``predict(...)``: load a checkpoint, read the source, predict batch by batch, write the outputs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fredfusion.engine.runtime import pick_device
from fredfusion.eval import evaluator
from fredfusion.model.weights import CheckpointError, input_hw_of, load_model
from fredfusion.predict.frames import Frame, batches, fit_size, image_frames, resized_batch, video_frames
from fredfusion.predict.outputs import Outputs
from fredfusion.predict.sources import open_source
from fredfusion.spec import NMS_IOU

__all__ = ["PredictResult", "predict"]

_READ_THREADS = 4


@dataclass
class PredictResult:
    """Where the outputs went and how fast it ran.

    ``fps`` is end to end (decode, inference, drawing, writing); ``infer_fps`` counts the model
    and NMS only.
    """

    out_dir: Path
    frames: int
    boxes: int
    csv_path: Path
    json_path: Path
    video_path: Path | None
    annotated: list[Path]
    fps: float
    infer_fps: float
    input_hw: tuple[int, int]
    device: str
    video_codec: str | None = None  # H.264 (the video extra) or mp4v


def _check_args(batch: int, conf: float, iou: float, max_det: int, save_frames: int | None) -> None:
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"--conf must lie in [0, 1], got {conf}")
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"--iou must lie in [0, 1], got {iou}")
    if max_det < 1:
        raise ValueError(f"--max-det must be >= 1, got {max_det}")
    if save_frames is not None and save_frames < 0:
        raise ValueError(f"--save-frames must be >= 0, got {save_frames}")


def _load(
    weights: Path, device: str, input_hw: tuple[int, int] | None
) -> tuple[torch.nn.Module, torch.device, tuple[int, int]]:
    """(model, device, input shape): ``input_hw`` or else the training shape of the checkpoint."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint not found")
    dev = pick_device(device)
    try:
        model, payload = load_model(weights, dev)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    return model, dev, input_hw_of(payload, input_hw, str(weights))


def _to_frame_pixels(dets: Any, scale: tuple[float, float], frame_hw: tuple[int, int]) -> np.ndarray:
    """``(n, 6)`` detections of a resized frame in pixels of the frame, clipped; empty boxes dropped."""
    (sx, sy), (fh, fw) = scale, frame_hw
    d = np.asarray(dets, dtype=np.float64).reshape(-1, 6).copy()
    d[:, [0, 2]] = np.clip(d[:, [0, 2]] * sx, 0.0, fw)
    d[:, [1, 3]] = np.clip(d[:, [1, 3]] * sy, 0.0, fh)
    return d[(d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])]


def _predict_batches(
    model: torch.nn.Module,
    frames: Iterable[Frame],
    input_hw: tuple[int, int],
    batch: int,
    outs: Outputs,
    **nms: Any,
) -> float:
    """Predict ``frames`` in batches (each frame resized to fit ``input_hw``) into ``outs``; returns the
    seconds spent in the model and NMS."""
    infer_s = 0.0
    for group in batches(frames, batch):
        fh, fw = group[0].image.shape[:2]
        rh, rw = fit_size((fh, fw), input_hw)
        rgb, event = resized_batch(group, (rh, rw))
        t0 = time.perf_counter()
        dets = evaluator.predict_frames(model, rgb, event, input_hw, **nms)
        infer_s += time.perf_counter() - t0
        for frame, d in zip(group, dets):
            outs.add(frame, _to_frame_pixels(d, (fw / rw, fh / rh), (fh, fw)))
    return infer_s


def _log_summary(
    log: Callable[[str], None], outs: Outputs, video: Path | None, conf: float, fps: float, infer_fps: float
) -> None:
    log(
        f"predict: {len(outs.entries)} frames, {outs.boxes} boxes at conf {conf:g}; {fps:.1f} frames/s "
        f"end to end, {infer_fps:.1f} frames/s inference+NMS"
    )
    log(f"  detections: {outs.csv_path}, {outs.json_path}")
    if video is not None and outs.video is not None:
        hint = "" if outs.video.codec == "H.264" else '; browsers need H.264: pip install -e ".[video]"'
        log(f"  video: {video} ({outs.video.codec}{hint})")
    if outs.annotated:
        n = len(outs.annotated)
        log(f"  annotated frames: {outs.annotated[0] if n == 1 else f'{outs.frames_dir}/ ({n} JPEGs)'}")


def predict(
    weights: Path,
    source: Path,
    event: Path | None = None,
    out: Path | None = None,
    conf: float = 0.25,
    iou: float = NMS_IOU,
    device: str = "",
    batch: int = 16,
    input_hw: tuple[int, int] | None = None,
    save_frames: int | None = None,
    tolerance_ms: float = 33.0,
    max_det: int = 300,
    log: Callable[[str], None] = print,
) -> PredictResult:
    """Run the checkpoint ``weights`` on ``source`` and write the outputs to ``out``.

    ``out`` defaults to ``runs/predict/<source name>``; ``input_hw`` to the training input shape
    stored in the checkpoint. ``save_frames`` bounds the annotated JPEGs (spread evenly over the
    source): None saves all of a source of up to 300 frames and none of a longer one (its video
    is still written). Returns the output paths and the frames/s achieved.
    """
    _check_args(batch, conf, iou, max_det, save_frames)
    weights = Path(weights).expanduser()
    model, dev, input_hw = _load(weights, device, input_hw)
    modality = str(model.modality)
    src = open_source(Path(source), Path(event) if event is not None else None, modality, tolerance_ms)
    out_dir = Path(out) if out is not None else Path("runs/predict") / (src.name or "source")
    out_dir.mkdir(parents=True, exist_ok=True)
    for note in src.notes:
        log(note)
    total = src.total if src.total is not None else "unknown number of"
    log(
        f"predict: {modality} YOLO-{getattr(model, 'size', '?')} from {weights} on {src.kind} {src.path} "
        f"({total} frames) at {input_hw[1]}x{input_hw[0]}, device {dev}"
    )
    t_start = time.perf_counter()
    workers = max(1, min(_READ_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool, Outputs(out_dir, src, save_frames, pool, 4 * workers) as outs:
        if src.kind == "video":
            frames = video_frames(src.path, modality, src.fps)
        else:
            frames = image_frames(src.items, pool, lookahead=2 * batch + workers)
        nms = {"device": dev, "conf": conf, "iou": iou, "max_det": max_det}
        infer_s = _predict_batches(model, frames, input_hw, batch, outs, **nms)
        outs.finish()
    elapsed = time.perf_counter() - t_start
    n_frames = len(outs.entries)
    if n_frames == 0:
        raise ValueError(f"{src.path}: no frames could be read")
    outs.write_json(
        {
            "weights": str(weights),
            "source": str(src.path),
            "source_kind": src.kind,
            "modality": modality,
            "input_shape": list(input_hw),
            "conf": conf,
            "iou": iou,
        }
    )
    video_path = outs.checked_video(log)
    fps = n_frames / elapsed if elapsed > 0 else 0.0
    infer_fps = n_frames / infer_s if infer_s > 0 else 0.0
    _log_summary(log, outs, video_path, conf, fps, infer_fps)
    codec = outs.video.codec if video_path is not None and outs.video is not None else None
    return PredictResult(
        out_dir, n_frames, outs.boxes, outs.csv_path, outs.json_path, video_path, outs.annotated,
        fps, infer_fps, input_hw, str(dev), codec,
    )  # fmt: skip
