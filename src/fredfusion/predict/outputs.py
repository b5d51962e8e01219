"""The files of ``predict``: detections.csv and detections.json, the annotated video and JPEGs."""

from __future__ import annotations

import csv
import json
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fredfusion.draw import PAIR_SEP, draw_boxes, put_label, rgb_copy, side_by_side
from fredfusion.predict.frames import Frame
from fredfusion.predict.sources import FrameItem, PredictSource

__all__ = ["BOX_COLOR", "CSV_COLUMNS", "MAX_FRAMES_SAVED_BY_DEFAULT", "Outputs", "annotate", "frames_to_save"]

CSV_COLUMNS = ("frame", "rgb_file", "event_file", "time_s", "x1", "y1", "x2", "y2", "score", "class")
MAX_FRAMES_SAVED_BY_DEFAULT = 300
BOX_COLOR = (230, 0, 0)  # RGB
_CAPTION_BG = (20, 20, 20)
_FRAME_FILE_RE = re.compile(r"^\d{6}(_.*)?\.jpg$")


def annotate(
    rgb: np.ndarray | None, event: np.ndarray | None, dets: np.ndarray, caption: str = ""
) -> np.ndarray:
    """Frame(s) with the boxes and scores drawn: RGB | Event side by side when both are given.

    Frames are ``(H, W, 3)`` RGB uint8, ``dets`` ``(n, >=5)`` x1, y1, x2, y2, score in frame pixels;
    returns a new RGB uint8 image (inputs are not modified).
    """
    frames = [f for f in (rgb, event) if f is not None]
    if not frames:
        raise ValueError("annotate needs at least one frame")
    dets = np.asarray(dets, dtype=np.float64)
    if dets.size == 0:
        dets = dets.reshape(0, 6)
    if dets.ndim != 2 or dets.shape[1] < 5:
        raise ValueError(f"dets must have shape (n, 5+) [x1, y1, x2, y2, score, ...], got {dets.shape}")
    thickness = max(1, round(max(frames[0].shape[:2]) / 640))
    panels = [draw_boxes(rgb_copy(f), dets[:, :4], BOX_COLOR, thickness, scores=dets[:, 4]) for f in frames]
    body = side_by_side(panels, PAIR_SEP)
    if caption:
        put_label(body, caption, (0, 0), 0.4 * thickness, _CAPTION_BG, pad=3)
    return body


def frames_to_save(total: int | None, save_frames: int | None) -> tuple[set[int] | None, int]:
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


H264_OPTIONS = {"preset": "ultrafast", "crf": "23"}
"""libx264 settings of the predicted video (speed and size measured in docs/PERFORMANCE.md)."""


def h264_available() -> bool:
    """True when PyAV (the ``video`` extra) is installed with an H.264 encoder."""
    try:
        from av.codec import Codec

        Codec("libx264", "w")
    except (ImportError, ValueError):
        return False
    return True


class _VideoOut:
    """The predicted video, opened on the first frame; later frames are fitted to its (even) size.

    H.264 (yuv420p, moov atom first: browsers play it) through PyAV when the ``video`` extra is
    installed, else MPEG-4 part 2 (``mp4v``) through OpenCV. ``codec`` says which.
    """

    def __init__(self, path: Path, fps: float, h264: bool | None = None) -> None:
        self.path = path
        self.fps = fps
        self.codec = "H.264" if (h264_available() if h264 is None else h264) else "mp4v"
        self.writer: Any = None
        self.size: tuple[int, int] = (0, 0)
        self.frames = 0

    def _open(self, size: tuple[int, int]) -> None:
        self.size = size
        if self.codec == "H.264":
            import av

            self.writer = av.open(str(self.path), mode="w", container_options={"movflags": "+faststart"})
            stream = self.writer.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.options = dict(H264_OPTIONS)
            self._stream = stream
            return
        self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, size)
        if not self.writer.isOpened():
            self.writer = None
            raise ValueError(f"{self.path}: cannot open an mp4v video writer")

    def write(self, image_rgb: np.ndarray) -> None:
        h, w = image_rgb.shape[:2]
        if self.writer is None:
            self._open((w + (w % 2), h + (h % 2)))
        vw, vh = self.size
        img = image_rgb
        if (w, h) != (vw, vh):
            if w <= vw and h <= vh and (vw - w, vh - h) in ((0, 1), (1, 0), (1, 1)):
                img = cv2.copyMakeBorder(img, 0, vh - h, 0, vw - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            else:
                img = cv2.resize(img, (vw, vh), interpolation=cv2.INTER_AREA)
        if self.codec == "H.264":
            import av

            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            self.writer.mux(self._stream.encode(frame))
        else:
            self.writer.write(np.ascontiguousarray(img[..., ::-1]))
        self.frames += 1

    def close(self) -> None:
        if self.writer is None:
            return
        if self.codec == "H.264":
            self.writer.mux(self._stream.encode(None))
            self.writer.close()
        else:
            self.writer.release()
        self.writer = None

    def readable_frames(self) -> int:
        """Frame count OpenCV reports for the file once its first frame decodes (0 when it does not)."""
        cap = cv2.VideoCapture(str(self.path))
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


def _safe_stem(name: str) -> str:
    stem = Path(name).stem if name else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def _box_entry(x1: float, y1: float, x2: float, y2: float, score: float, cls: float) -> dict[str, Any]:
    return {
        "x1": round(x1, 2),
        "y1": round(y1, 2),
        "x2": round(x2, 2),
        "y2": round(y2, 2),
        "score": round(score, 5),
        "class": int(cls),
    }


class Outputs:
    """The files of one run in ``out_dir``: ``detections.csv`` (written as frames come),
    ``detections.json``, ``predictions.mp4`` (sources of several frames) and annotated JPEGs
    (written on ``pool``, at most ``max_pending`` waiting). Use as a context manager."""

    def __init__(
        self,
        out_dir: Path,
        src: PredictSource,
        save_frames: int | None,
        pool: ThreadPoolExecutor,
        max_pending: int,
    ) -> None:
        self.out_dir = out_dir
        self.csv_path = out_dir / "detections.csv"
        self.json_path = out_dir / "detections.json"
        self.frames_dir = out_dir / "frames"
        self.multi = src.kind != "image"
        self.save_set, self.save_limit = frames_to_save(src.total, save_frames)
        if self.multi and self.save_limit > 0:
            self.frames_dir.mkdir(exist_ok=True)
            for old in self.frames_dir.iterdir():  # annotated frames of an earlier run into the same folder
                if old.is_file() and _FRAME_FILE_RE.match(old.name):
                    old.unlink()
        self.video = _VideoOut(out_dir / "predictions.mp4", src.fps) if self.multi else None
        self.entries: list[dict[str, Any]] = []
        self.boxes = 0
        self.annotated: list[Path] = []
        self._pool, self._max_pending = pool, max_pending
        self._writes: deque[Future[Path]] = deque()
        self._fh = self.csv_path.open("w", newline="")
        self._csv = csv.writer(self._fh)
        self._csv.writerow(CSV_COLUMNS)

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, frame: Frame, dets: np.ndarray) -> None:
        """Record the ``(n, 6)`` detections of ``frame`` (source pixels) and draw what is kept of it."""
        item = frame.item
        self._record(item, dets)
        keep = item.index in self.save_set if self.save_set is not None else item.index < self.save_limit
        if self.video is None and not keep:
            return
        tile = annotate(frame.rgb, frame.event, dets, self._caption(item, len(dets)) if self.multi else "")
        if self.video is not None:
            self.video.write(tile)
        if keep:
            self._writes.append(self._pool.submit(_write_jpeg, self._jpeg_path(item), tile))
            while len(self._writes) > self._max_pending:
                self.annotated.append(self._writes.popleft().result())

    def finish(self) -> None:
        """Wait for the annotated JPEGs still being written."""
        while self._writes:
            self.annotated.append(self._writes.popleft().result())

    def close(self) -> None:
        """Close the video and the CSV file."""
        if self.video is not None:
            self.video.close()
        self._fh.close()

    def write_json(self, settings: dict[str, Any]) -> Path:
        """``detections.json``: ``settings``, the counts and one entry per frame."""
        data = {
            **settings,
            "frames": len(self.entries),
            "boxes": self.boxes,
            "columns": "boxes are x1, y1, x2, y2 in pixels of the source frames",
            "predictions": self.entries,
        }
        self.json_path.write_text(json.dumps(data, indent=1))
        return self.json_path

    def checked_video(self, log: Callable[[str], None]) -> Path | None:
        """The video written (None when none), with a warning when OpenCV reads back another length."""
        if self.video is None or not self.video.frames:
            return None
        readable, written = self.video.readable_frames(), self.video.frames
        if readable != written:
            log(f"warning: {self.video.path}: wrote {written} frames but OpenCV reads back {readable}")
        return self.video.path

    def _record(self, item: FrameItem, dets: np.ndarray) -> None:
        t_txt = "" if item.time_s is None else f"{item.time_s:.6f}"
        rows = dets.tolist()
        for x1, y1, x2, y2, score, cls in rows:
            self._csv.writerow(
                [item.index, item.rgb_name, item.event_name, t_txt,
                 f"{x1:.2f}", f"{y1:.2f}", f"{x2:.2f}", f"{y2:.2f}", f"{score:.5f}", int(cls)]
            )  # fmt: skip
        self.entries.append(
            {
                "frame": item.index,
                "rgb_file": item.rgb_name or None,
                "event_file": item.event_name or None,
                "time_s": None if item.time_s is None else round(item.time_s, 6),
                "boxes": [_box_entry(*row) for row in rows],
            }
        )
        self.boxes += len(rows)

    @staticmethod
    def _caption(item: FrameItem, n_dets: int) -> str:
        time_txt = "" if item.time_s is None else f"  t {item.time_s:.3f} s"
        return f"frame {item.index}{time_txt}  {n_dets} det"

    def _jpeg_path(self, item: FrameItem) -> Path:
        stem = _safe_stem(item.rgb_name or item.event_name)
        if not self.multi:
            return self.out_dir / f"{stem or 'frame'}.jpg"
        return self.frames_dir / (f"{item.index:06d}_{stem}.jpg" if stem else f"{item.index:06d}.jpg")
