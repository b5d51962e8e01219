"""Frames for ``predict``: image files decoded on a thread pool, video frames, resizing and batching."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from fredfusion.data.frames import read_image, resize
from fredfusion.predict.sources import FrameItem
from fredfusion.spec import model_inputs

__all__ = ["Frame", "batches", "fit_size", "image_frames", "resized_batch", "video_frames"]


class Frame(NamedTuple):
    """A decoded frame: its item, the RGB and the event image (``(H, W, 3)`` uint8 RGB, None when absent)."""

    item: FrameItem
    rgb: np.ndarray | None
    event: np.ndarray | None

    @property
    def image(self) -> np.ndarray:
        """The first image present (RGB before event); every frame holds at least one."""
        img = self.rgb if self.rgb is not None else self.event
        assert img is not None
        return img


def read_item(item: FrameItem) -> Frame:
    """Decode the files of ``item``; an event frame of another size is brought to the RGB frame's."""
    rgb = read_image(item.rgb_path, allow_16bit=True) if item.rgb_path is not None else None
    ev = read_image(item.event_path, allow_16bit=True) if item.event_path is not None else None
    if rgb is not None and ev is not None:
        ev = resize(ev, rgb.shape[:2])  # both modalities share one pixel space
    return Frame(item, rgb, ev)


def image_frames(items: list[FrameItem], pool: ThreadPoolExecutor, lookahead: int) -> Iterator[Frame]:
    """Frames of ``items`` in order, decoded up to ``lookahead`` frames ahead on ``pool``."""
    pending: deque[Future[Frame]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(read_item, item))
            if len(pending) >= lookahead:
                break
        while pending:
            frame = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(read_item, nxt))
            yield frame
    finally:
        for fut in pending:
            fut.cancel()


def video_frames(path: Path, modality: str, fps: float) -> Iterator[Frame]:
    """The frames of a video in order as the one input of a ``modality`` model, time = index / ``fps``."""
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
            yield Frame(FrameItem(k, time_s=k / fps), *model_inputs(modality, frame, frame))
            k += 1
    finally:
        cap.release()


def fit_size(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` a ``frame_hw`` frame is resized to so that it fits ``input_hw``, aspect kept."""
    h, w = int(frame_hw[0]), int(frame_hw[1])
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    scale = min(in_w / w, in_h / h)
    return max(1, min(in_h, round(h * scale))), max(1, min(in_w, round(w * scale)))


def batches(frames: Iterable[Frame], batch: int) -> Iterator[list[Frame]]:
    """Consecutive frames grouped by ``batch``; a change of frame size starts a new batch."""
    group: list[Frame] = []
    for fr in frames:
        if group and (len(group) >= batch or fr.image.shape != group[-1].image.shape):
            yield group
            group = []
        group.append(fr)
    if group:
        yield group


def resized_batch(group: list[Frame], hw: tuple[int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rgb, event) ``(B, h, w, 3)`` uint8 stacks of a batch at ``hw``; None for a kind it does not hold."""
    first = group[0]
    rgb = np.stack([resize(f.rgb, hw) for f in group]) if first.rgb is not None else None
    ev = np.stack([resize(f.event, hw) for f in group]) if first.event is not None else None
    return rgb, ev
