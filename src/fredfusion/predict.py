"""`fredfusion predict`: run a checkpoint on images, frame folders, FRED sequences or videos.

Frames are decoded on a small thread pool, resized to fit the model input (keeping their aspect,
``cv2.INTER_AREA`` when shrinking, as the frame store does), predicted in batches with
:func:`fredfusion.eval.evaluator.predict_frames`, and boxes are scaled back to the pixels of the
original frames. Outputs: annotated JPEGs (RGB | Event side by side for dual models), an MP4 for
multi-frame sources, ``detections.csv`` (one row per box) and ``detections.json`` (one entry per
frame).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fredfusion.spec import NMS_IOU, check_modality

__all__ = [
    "CSV_COLUMNS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FrameItem",
    "PredictResult",
    "PredictSource",
    "annotate",
    "fit_size",
    "open_source",
    "predict",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
CSV_COLUMNS = ("frame", "rgb_file", "event_file", "time_s", "x1", "y1", "x2", "y2", "score", "class")
MAX_FRAMES_SAVED_BY_DEFAULT = 300
SEQUENCE_FPS = 30.0
BOX_COLOR = (230, 0, 0)  # RGB
_READ_THREADS = 4


@dataclass
class FrameItem:
    """One frame (or RGB/Event pair) to predict on: file paths, names for the outputs, time."""

    index: int
    rgb_path: Path | None = None
    event_path: Path | None = None
    rgb_name: str = ""
    event_name: str = ""
    time_s: float | None = None


@dataclass
class PredictSource:
    """What ``--source`` resolved to.

    ``kind`` is ``image``, ``folder``, ``sequence`` or ``video``; ``items`` lists the frames of
    image, folder and sequence sources (empty for a video, which is read in order); ``total`` is
    the number of frames (None when a video does not tell); ``fps`` the output video rate.
    """

    kind: str
    name: str
    path: Path
    items: list[FrameItem] = field(default_factory=list)
    total: int | None = None
    fps: float = SEQUENCE_FPS
    notes: list[str] = field(default_factory=list)


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


# ------------------------------------------------------------------------------------------ sources
def _natural_key(name: str) -> tuple:
    """Sort key that orders the digit runs of a name by value (frame_2 before frame_10)."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def _list_images(folder: Path) -> list[Path]:
    try:
        entries = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    except OSError as exc:
        raise ValueError(f"{folder}: cannot list folder ({exc.strerror or exc})") from None
    entries = [p for p in entries if not p.name.startswith(".")]
    return sorted(entries, key=lambda p: _natural_key(p.name))


def _is_sequence_folder(folder: Path) -> bool:
    return (
        (folder / "RGB").is_dir()
        or (folder / "PADDED_RGB").is_dir()
        or (folder / "Event" / "Frames").is_dir()
    )


def _sequence_source(folder: Path, modality: str, tolerance_ms: float) -> PredictSource:
    from fredfusion.data.fred import read_sequence
    from fredfusion.data.pairing import DUAL, pair_sequence

    root = folder.parent
    seq = read_sequence(folder, root)
    paired = pair_sequence(seq, tolerance_ms)
    if modality == "dual":
        images = [im for im in paired.images if im.pair_status == DUAL]
        what = f"RGB/Event pairs within {tolerance_ms:g} ms"
    elif modality == "rgb":
        images = [im for im in paired.images if im.rgb_file_name is not None]
        what = "RGB frames"
    else:
        images = [im for im in paired.images if im.event_file_name is not None]
        what = "event frames"
    if not images:
        detail = "; ".join(seq.problems[:3])
        raise ValueError(f"{folder}: FRED sequence has no {what}" + (f" ({detail})" if detail else ""))
    items = []
    for k, im in enumerate(images):
        use_rgb = modality in ("rgb", "dual")
        use_ev = modality in ("event", "dual")
        items.append(
            FrameItem(
                index=k,
                rgb_path=root / im.rgb_file_name if use_rgb and im.rgb_file_name else None,
                event_path=root / im.event_file_name if use_ev and im.event_file_name else None,
                rgb_name=im.rgb_file_name if use_rgb and im.rgb_file_name else "",
                event_name=im.event_file_name if use_ev and im.event_file_name else "",
                time_s=float(im.time_s),
            )
        )
    s = paired.stats
    notes = [
        f"FRED sequence {seq.seq_id}: {s.rgb_frames} RGB, {s.event_frames} event frames, {s.pairs} pairs "
        f"(dual_rate {s.dual_rate:.3f}, mean |dt| {s.avg_tdiff_ms:.1f} ms); predicting on {len(items)} {what}"
    ]
    return PredictSource("sequence", folder.name, folder, items, len(items), SEQUENCE_FPS, notes)


def _video_total(path: Path) -> tuple[int | None, float]:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"{path}: cannot open video (unsupported codec or not a video file)")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        cap.release()
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = SEQUENCE_FPS
    return (count if count > 0 else None), fps


def open_source(source: Path, event: Path | None, modality: str, tolerance_ms: float = 33.0) -> PredictSource:
    """Resolve ``source`` (and ``event`` for dual models) into the frames a model of ``modality`` reads.

    A single image, a folder of images (sorted by name, digit runs by value; a dual model pairs it
    with the ``event`` folder by that order), a FRED sequence folder (``RGB/`` or ``PADDED_RGB/``
    and ``Event/Frames/``, paired by time as ``prepare`` does) or a video file (rgb and event
    models only). Raises FileNotFoundError / ValueError naming the path for anything unusable.
    """
    check_modality(modality)
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source}: source not found")
    if event is not None:
        event = Path(event).expanduser()
        if modality != "dual":
            raise ValueError(
                f"--event is only used by dual models; this is an {modality} model "
                f"(give the {'event frame' if modality == 'event' else 'RGB frame'} as --source)"
            )
        if not event.exists():
            raise FileNotFoundError(f"{event}: event source not found")

    if source.is_dir():
        if _is_sequence_folder(source):
            if event is not None:
                raise ValueError(
                    f"{source}: a FRED sequence folder holds its own event frames; do not pass --event"
                )
            return _sequence_source(source, modality, tolerance_ms)
        files = _list_images(source)
        if not files:
            raise ValueError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in folder")
        if modality == "dual":
            if event is None:
                raise ValueError(
                    f"{source}: a dual model needs --event FOLDER with the matching event frames"
                )
            if not event.is_dir():
                raise ValueError(f"{event}: --event must be a folder when --source is a folder")
            ev_files = _list_images(event)
            if len(ev_files) != len(files):
                raise ValueError(
                    f"{source} has {len(files)} images but {event} has {len(ev_files)}; frames are paired "
                    "by sorted order, so the counts must match (give a FRED sequence folder to pair by time)"
                )
            items = [FrameItem(k, r, e, r.name, e.name) for k, (r, e) in enumerate(zip(files, ev_files))]
        elif modality == "rgb":
            items = [FrameItem(k, rgb_path=p, rgb_name=p.name) for k, p in enumerate(files)]
        else:
            items = [FrameItem(k, event_path=p, event_name=p.name) for k, p in enumerate(files)]
        return PredictSource("folder", source.name, source, items, len(items), SEQUENCE_FPS)

    suffix = source.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        if modality == "dual":
            raise ValueError(
                f"{source}: a dual model needs RGB and event frames of the same instant; a video holds one "
                "stream. Give a FRED sequence folder, or image(s) with --event"
            )
        total, fps = _video_total(source)
        return PredictSource("video", source.stem, source, [], total, fps)
    if suffix not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{source}: not an image ({', '.join(IMAGE_EXTENSIONS)}), video ({', '.join(VIDEO_EXTENSIONS)}) "
            "or folder"
        )
    if modality == "dual":
        if event is None:
            raise ValueError(
                f"{source}: a dual model needs --event EVENT_FRAME (the event frame of this image)"
            )
        if not event.is_file():
            raise ValueError(f"{event}: --event must be an image file when --source is an image")
        item = FrameItem(0, source, event, source.name, event.name)
    elif modality == "rgb":
        item = FrameItem(0, rgb_path=source, rgb_name=source.name)
    else:
        item = FrameItem(0, event_path=source, event_name=source.name)
    return PredictSource("image", source.stem, source, [item], 1, SEQUENCE_FPS)


# --------------------------------------------------------------------------------------------- frames
def _read_image(path: Path) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 RGB; gray and alpha images are converted."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ValueError(f"{path}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not a readable image")
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        else:
            raise ValueError(f"{path}: unsupported pixel type {img.dtype} (expected 8-bit)")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2RGB)
    raise ValueError(f"{path}: unsupported channel count {img.shape[2]}")


def _read_item(item: FrameItem) -> tuple[np.ndarray | None, np.ndarray | None]:
    rgb = _read_image(item.rgb_path) if item.rgb_path is not None else None
    ev = _read_image(item.event_path) if item.event_path is not None else None
    if rgb is not None and ev is not None and ev.shape != rgb.shape:
        # Both modalities share one pixel space: bring the event frame to the RGB frame's size.
        ev = cv2.resize(ev, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA)
    return rgb, ev


Frame = tuple[FrameItem, np.ndarray | None, np.ndarray | None]


def _image_frames(items: list[FrameItem], pool: ThreadPoolExecutor, lookahead: int) -> Iterator[Frame]:
    """Frames of ``items`` in order, decoded up to ``lookahead`` frames ahead on ``pool``."""
    pending: deque[tuple[FrameItem, Future]] = deque()
    it = iter(items)
    for item in it:
        pending.append((item, pool.submit(_read_item, item)))
        if len(pending) >= lookahead:
            break
    try:
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_item, nxt)))
            rgb, ev = fut.result()
            yield item, rgb, ev
    finally:
        for _, fut in pending:
            fut.cancel()


def _video_frames(path: Path, modality: str, fps: float) -> Iterator[Frame]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot open video")
    try:
        k = 0
        while True:
            ok, bgr = cap.read()
            if not ok or bgr is None:
                break
            frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            item = FrameItem(k, time_s=k / fps)
            yield (item, frame, None) if modality == "rgb" else (item, None, frame)
            k += 1
    finally:
        cap.release()


def fit_size(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` a ``frame_hw`` frame is resized to so that it fits ``input_hw``, aspect kept."""
    h, w = int(frame_hw[0]), int(frame_hw[1])
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    scale = min(in_w / w, in_h / h)
    return max(1, min(in_h, round(h * scale))), max(1, min(in_w, round(w * scale)))


def _resize(img: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray | None:
    if img is None or img.shape[:2] == hw:
        return img
    shrink = hw[0] < img.shape[0] or hw[1] < img.shape[1]
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _batches(frames: Iterator[Frame], batch: int) -> Iterator[list[Frame]]:
    """Consecutive frames grouped by ``batch``; a change of frame size starts a new batch."""
    group: list[Frame] = []
    shape = None
    for fr in frames:
        ref = fr[1] if fr[1] is not None else fr[2]
        assert ref is not None
        if group and (len(group) >= batch or ref.shape != shape):
            yield group
            group = []
        shape = ref.shape
        group.append(fr)
    if group:
        yield group


# -------------------------------------------------------------------------------------------- drawing
def _draw_dets(img: np.ndarray, dets: np.ndarray, thickness: int) -> None:
    from fredfusion.eval.plots import draw_boxes

    draw_boxes(img, dets[:, :4], BOX_COLOR, thickness)
    font_scale = 0.35 * thickness + 0.05
    for x1, y1, _x2, _y2, score in dets[:, :5].tolist():
        text = f"{score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        x = round(x1)
        y = round(y1) - 2
        if y - th - base < 0:
            y = round(y1) + th + base + 2
        cv2.rectangle(img, (x, y - th - base), (x + tw + 2, y + 1), BOX_COLOR, -1)
        cv2.putText(
            img,
            text,
            (x + 1, y - base + 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )


def annotate(
    rgb: np.ndarray | None, event: np.ndarray | None, dets: np.ndarray, caption: str = ""
) -> np.ndarray:
    """Frame(s) with the boxes and scores drawn: RGB | Event side by side when both are given.

    Frames are ``(H, W, 3)`` RGB uint8, ``dets`` ``(n, >=5)`` x1, y1, x2, y2, score in frame pixels;
    returns a new RGB uint8 image (inputs are not modified).
    """
    panels = [p for p in (rgb, event) if p is not None]
    if not panels:
        raise ValueError("annotate needs at least one frame")
    h, w = panels[0].shape[:2]
    thickness = max(1, round(max(h, w) / 640))
    dets = np.asarray(dets, dtype=np.float64)
    if dets.size == 0:
        dets = dets.reshape(0, 6)
    if dets.ndim != 2 or dets.shape[1] < 5:
        raise ValueError(f"dets must have shape (n, 5+) [x1, y1, x2, y2, score, ...], got {dets.shape}")
    out_panels = []
    for p in panels:
        img = np.ascontiguousarray(p).copy()
        _draw_dets(img, dets, thickness)
        out_panels.append(img)
    if len(out_panels) == 2:
        sep = np.full((h, 4, 3), 255, dtype=np.uint8)
        body = np.concatenate([out_panels[0], sep, out_panels[1]], axis=1)
    else:
        body = out_panels[0]
    if caption:
        scale = 0.4 * thickness
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(body, (0, 0), (tw + 8, th + base + 6), (20, 20, 20), -1)
        cv2.putText(
            body, caption, (4, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
        )
    return body


def _frames_to_save(total: int | None, save_frames: int | None) -> tuple[set[int] | None, int]:
    """(indices to save, or None for 'the first ``limit``'; limit). Defaults: all up to 300 frames."""
    if save_frames is None:
        if total is not None and total <= MAX_FRAMES_SAVED_BY_DEFAULT:
            return set(range(total)), total
        return set(), 0
    n = max(0, int(save_frames))
    if total is None:
        return None, n
    if n >= total:
        return set(range(total)), total
    if n == 0:
        return set(), 0
    return {int(v) for v in np.linspace(0, total - 1, n).round().astype(np.int64)}, n


class _VideoOut:
    """An mp4v writer opened on the first frame; later frames are fitted to its (even) size."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, image_rgb: np.ndarray) -> None:
        h, w = image_rgb.shape[:2]
        if self.writer is None:
            self.size = (w + (w % 2), h + (h % 2))
            self.writer = cv2.VideoWriter(
                str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size
            )
            if not self.writer.isOpened():
                self.writer = None
                raise ValueError(f"{self.path}: cannot open an mp4v video writer")
        assert self.size is not None
        vw, vh = self.size
        img = image_rgb
        if (w, h) != (vw, vh):
            if w <= vw and h <= vh and (vw - w, vh - h) in ((0, 1), (1, 0), (1, 1)):
                img = cv2.copyMakeBorder(img, 0, vh - h, 0, vw - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            else:
                img = cv2.resize(img, (vw, vh), interpolation=cv2.INTER_AREA)
        self.writer.write(np.ascontiguousarray(img[..., ::-1]))
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def _readable_frames(path: Path) -> int:
    """Frame count OpenCV reports for ``path`` once its first frame decodes (0 when it does not)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened() or not cap.read()[0]:
            return 0
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        cap.release()


def _write_jpeg(path: Path, image_rgb: np.ndarray) -> Path:
    if not cv2.imwrite(str(path), np.ascontiguousarray(image_rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"{path}: could not write image")
    return path


_FRAME_FILE_RE = re.compile(r"^\d{6}(_.*)?\.jpg$")


def _safe_stem(name: str) -> str:
    stem = Path(name).stem if name else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


# -------------------------------------------------------------------------------------------- predict
def _fmt(v: float) -> str:
    return f"{v:.2f}"


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
    from fredfusion.engine.runtime import pick_device
    from fredfusion.eval.evaluator import predict_frames
    from fredfusion.model.weights import CheckpointError, input_hw_of, load_model

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
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint not found")
    dev = pick_device(device)
    try:
        model, payload = load_model(weights, dev)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    modality = str(model.modality)
    input_hw = input_hw_of(payload, input_hw, str(weights))
    in_h, in_w = input_hw

    src = open_source(Path(source), Path(event) if event is not None else None, modality, tolerance_ms)
    out_dir = Path(out) if out is not None else Path("runs/predict") / (src.name or "source")
    out_dir.mkdir(parents=True, exist_ok=True)
    for note in src.notes:
        log(note)
    log(
        f"predict: {modality} YOLO-{getattr(model, 'size', '?')} from {weights} on {src.kind} {src.path} "
        f"({src.total if src.total is not None else 'unknown number of'} frames) "
        f"at {in_w}x{in_h}, device {dev}"
    )

    save_set, save_limit = _frames_to_save(src.total, save_frames)
    frames_dir = out_dir / "frames"
    multi = src.kind != "image"
    if multi and save_limit > 0:
        frames_dir.mkdir(exist_ok=True)
        for old in frames_dir.iterdir():  # annotated frames of an earlier run into the same folder
            if old.is_file() and _FRAME_FILE_RE.match(old.name):
                old.unlink()
    video = _VideoOut(out_dir / "predictions.mp4", src.fps) if multi else None

    csv_path = out_dir / "detections.csv"
    json_path = out_dir / "detections.json"
    per_frame: list[dict[str, Any]] = []
    annotated: list[Path] = []
    n_frames = n_boxes = 0
    infer_s = 0.0
    t_start = time.perf_counter()
    workers = max(1, min(_READ_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        if src.kind == "video":
            frames = _video_frames(src.path, modality, src.fps)
        else:
            frames = _image_frames(src.items, pool, lookahead=2 * batch + workers)
        writes: deque[Future] = deque()
        try:
            for group in _batches(frames, batch):
                first = group[0][1] if group[0][1] is not None else group[0][2]
                assert first is not None
                fh_, fw_ = first.shape[:2]
                rh, rw = fit_size((fh_, fw_), input_hw)
                rgb_b = (
                    np.stack([_resize(g[1], (rh, rw)) for g in group]) if group[0][1] is not None else None
                )
                ev_b = np.stack([_resize(g[2], (rh, rw)) for g in group]) if group[0][2] is not None else None
                t0 = time.perf_counter()
                dets = predict_frames(
                    model, rgb_b, ev_b, input_hw, device=dev, conf=conf, iou=iou, max_det=max_det
                )
                infer_s += time.perf_counter() - t0
                sx, sy = fw_ / rw, fh_ / rh
                for (item, rgb, ev), d in zip(group, dets):
                    d = np.asarray(d, dtype=np.float64).reshape(-1, 6).copy()
                    d[:, [0, 2]] = np.clip(d[:, [0, 2]] * sx, 0.0, fw_)
                    d[:, [1, 3]] = np.clip(d[:, [1, 3]] * sy, 0.0, fh_)
                    d = d[(d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])]
                    t_txt = "" if item.time_s is None else f"{item.time_s:.6f}"
                    for x1, y1, x2, y2, score, cls in d.tolist():
                        writer.writerow(
                            [item.index, item.rgb_name, item.event_name, t_txt,
                             _fmt(x1), _fmt(y1), _fmt(x2), _fmt(y2), f"{score:.5f}", int(cls)]
                        )  # fmt: skip
                    per_frame.append(
                        {
                            "frame": item.index,
                            "rgb_file": item.rgb_name or None,
                            "event_file": item.event_name or None,
                            "time_s": None if item.time_s is None else round(item.time_s, 6),
                            "boxes": [
                                {
                                    "x1": round(x1, 2),
                                    "y1": round(y1, 2),
                                    "x2": round(x2, 2),
                                    "y2": round(y2, 2),
                                    "score": round(score, 5),
                                    "class": int(cls),
                                }
                                for x1, y1, x2, y2, score, cls in d.tolist()
                            ],
                        }
                    )
                    n_boxes += len(d)
                    n_frames += 1
                    keep_jpeg = (
                        (item.index in save_set) if save_set is not None else (item.index < save_limit)
                    )
                    if not multi and save_frames == 0:
                        keep_jpeg = False
                    if video is None and not keep_jpeg:
                        continue
                    caption = f"frame {item.index}"
                    if item.time_s is not None:
                        caption += f"  t {item.time_s:.3f} s"
                    caption += f"  {len(d)} det"
                    tile = annotate(rgb, ev, d, caption if multi else "")
                    if video is not None:
                        video.write(tile)
                    if keep_jpeg:
                        if multi:
                            stem = _safe_stem(item.rgb_name or item.event_name)
                            path = frames_dir / (
                                f"{item.index:06d}_{stem}.jpg" if stem else f"{item.index:06d}.jpg"
                            )
                        else:
                            path = out_dir / f"{_safe_stem(item.rgb_name or item.event_name) or 'frame'}.jpg"
                        writes.append(pool.submit(_write_jpeg, path, tile))
                        while len(writes) > 4 * workers:
                            annotated.append(writes.popleft().result())
            while writes:
                annotated.append(writes.popleft().result())
        finally:
            if video is not None:
                video.close()
    elapsed = time.perf_counter() - t_start
    if n_frames == 0:
        raise ValueError(f"{src.path}: no frames could be read")

    json_path.write_text(
        json.dumps(
            {
                "weights": str(weights),
                "source": str(src.path),
                "source_kind": src.kind,
                "modality": modality,
                "input_shape": [in_h, in_w],
                "conf": conf,
                "iou": iou,
                "frames": n_frames,
                "boxes": n_boxes,
                "columns": "boxes are x1, y1, x2, y2 in pixels of the source frames",
                "predictions": per_frame,
            },
            indent=1,
        )
    )
    video_path = None
    if video is not None and video.frames:
        video_path = video.path
        readable = _readable_frames(video_path)
        if readable != video.frames:
            log(f"warning: {video_path}: wrote {video.frames} frames but OpenCV reads back {readable}")
    fps = n_frames / elapsed if elapsed > 0 else 0.0
    infer_fps = n_frames / infer_s if infer_s > 0 else 0.0
    log(
        f"predict: {n_frames} frames, {n_boxes} boxes at conf {conf:g}; {fps:.1f} frames/s end to end, "
        f"{infer_fps:.1f} frames/s inference+NMS"
    )
    log(f"  detections: {csv_path}, {json_path}")
    if video_path is not None:
        log(f"  video: {video_path}")
    if annotated:
        where = annotated[0] if len(annotated) == 1 else f"{frames_dir}/ ({len(annotated)} JPEGs)"
        log(f"  annotated frames: {where}")
    return PredictResult(
        out_dir=out_dir,
        frames=n_frames,
        boxes=n_boxes,
        csv_path=csv_path,
        json_path=json_path,
        video_path=video_path,
        annotated=annotated,
        fps=fps,
        infer_fps=infer_fps,
        input_hw=input_hw,
        device=str(dev),
    )
