"""What ``--source`` resolves to: an image, a folder of images, a FRED sequence folder or a video."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from fredfusion.spec import frames_for

__all__ = [
    "IMAGE_EXTENSIONS",
    "SEQUENCE_FPS",
    "VIDEO_EXTENSIONS",
    "FrameItem",
    "PredictSource",
    "open_source",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
SEQUENCE_FPS = 30.0
_FRAME_NAME = {"rgb": "RGB frame", "event": "event frame"}


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


def _item(
    index: int, paths: Mapping[str, Path], names: Mapping[str, str] | None = None, time_s: float | None = None
) -> FrameItem:
    """A FrameItem of the frame kinds in ``paths``; names default to the file names."""
    names = names if names is not None else {kind: p.name for kind, p in paths.items()}
    return FrameItem(
        index, paths.get("rgb"), paths.get("event"), names.get("rgb", ""), names.get("event", ""), time_s
    )


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


def _sequence_source(folder: Path, kinds: tuple[str, ...], tolerance_ms: float) -> PredictSource:
    """The images of a FRED sequence folder that hold every frame kind in ``kinds`` (paired by time)."""
    from fredfusion.data.fred import read_sequence
    from fredfusion.data.pairing import pair_sequence

    root = folder.parent
    seq = read_sequence(folder, root)
    paired = pair_sequence(seq, tolerance_ms)
    files = [{k: getattr(im, f"{k}_file_name") for k in kinds} for im in paired.images]
    chosen = [(im, f) for im, f in zip(paired.images, files) if all(f.values())]
    what = f"RGB/Event pairs within {tolerance_ms:g} ms" if len(kinds) > 1 else f"{_FRAME_NAME[kinds[0]]}s"
    if not chosen:
        detail = "; ".join(seq.problems[:3])
        raise ValueError(f"{folder}: FRED sequence has no {what}" + (f" ({detail})" if detail else ""))
    items = [
        _item(k, {kind: root / name for kind, name in f.items()}, f, float(im.time_s))
        for k, (im, f) in enumerate(chosen)
    ]
    s = paired.stats
    notes = [
        f"FRED sequence {seq.seq_id}: {s.rgb_frames} RGB, {s.event_frames} event frames, {s.pairs} pairs "
        f"(dual_rate {s.dual_rate:.3f}, mean |dt| {s.avg_tdiff_ms:.1f} ms); predicting on {len(items)} {what}"
    ]
    return PredictSource("sequence", folder.name, folder, items, len(items), SEQUENCE_FPS, notes)


def _folder_source(source: Path, event: Path | None, kinds: tuple[str, ...]) -> PredictSource:
    """Images of a folder in natural order; a dual model pairs them with ``event``'s by that order."""
    files = _list_images(source)
    if not files:
        raise ValueError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in folder")
    lists = [files]
    if len(kinds) > 1:
        if event is None:
            raise ValueError(f"{source}: a dual model needs --event FOLDER with the matching event frames")
        if not event.is_dir():
            raise ValueError(f"{event}: --event must be a folder when --source is a folder")
        ev_files = _list_images(event)
        if len(ev_files) != len(files):
            raise ValueError(
                f"{source} has {len(files)} images but {event} has {len(ev_files)}; frames are paired "
                "by sorted order, so the counts must match (give a FRED sequence folder to pair by time)"
            )
        lists.append(ev_files)
    items = [_item(k, dict(zip(kinds, paths))) for k, paths in enumerate(zip(*lists))]
    return PredictSource("folder", source.name, source, items, len(items), SEQUENCE_FPS)


def _video_source(source: Path, kinds: tuple[str, ...]) -> PredictSource:
    """A video for a single-modality model; frame count and rate as OpenCV reports them."""
    if len(kinds) > 1:
        raise ValueError(
            f"{source}: a dual model needs RGB and event frames of the same instant; a video holds one "
            "stream. Give a FRED sequence folder, or image(s) with --event"
        )
    cap = cv2.VideoCapture(str(source))
    try:
        if not cap.isOpened():
            raise ValueError(f"{source}: cannot open video (unsupported codec or not a video file)")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        cap.release()
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = SEQUENCE_FPS
    return PredictSource("video", source.stem, source, [], count if count > 0 else None, fps)


def _image_source(source: Path, event: Path | None, kinds: tuple[str, ...]) -> PredictSource:
    """One image (and for a dual model its event frame ``event``)."""
    if source.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{source}: not an image ({', '.join(IMAGE_EXTENSIONS)}), video ({', '.join(VIDEO_EXTENSIONS)}) "
            "or folder"
        )
    paths = [source]
    if len(kinds) > 1:
        if event is None:
            raise ValueError(
                f"{source}: a dual model needs --event EVENT_FRAME (the event frame of this image)"
            )
        if not event.is_file():
            raise ValueError(f"{event}: --event must be an image file when --source is an image")
        paths.append(event)
    return PredictSource("image", source.stem, source, [_item(0, dict(zip(kinds, paths)))], 1, SEQUENCE_FPS)


def open_source(source: Path, event: Path | None, modality: str, tolerance_ms: float = 33.0) -> PredictSource:
    """Resolve ``source`` (and ``event`` for dual models) into the frames a model of ``modality`` reads.

    A single image, a folder of images (sorted by name, digit runs by value; a dual model pairs it
    with the ``event`` folder by that order), a FRED sequence folder (``RGB/`` or ``PADDED_RGB/``
    and ``Event/Frames/``, paired by time as ``prepare`` does) or a video file (rgb and event
    models only). Raises FileNotFoundError / ValueError naming the path for anything unusable.
    """
    kinds = frames_for(modality)
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source}: source not found")
    if event is not None:
        event = Path(event).expanduser()
        if len(kinds) == 1:
            raise ValueError(
                f"--event is only used by dual models; this is an {modality} model "
                f"(give the {_FRAME_NAME[kinds[0]]} as --source)"
            )
        if not event.exists():
            raise FileNotFoundError(f"{event}: event source not found")
    if source.is_dir() and _is_sequence_folder(source):
        if event is not None:
            raise ValueError(
                f"{source}: a FRED sequence folder holds its own event frames; do not pass --event"
            )
        return _sequence_source(source, kinds, tolerance_ms)
    if source.is_dir():
        return _folder_source(source, event, kinds)
    if source.suffix.lower() in VIDEO_EXTENSIONS:
        return _video_source(source, kinds)
    return _image_source(source, event, kinds)
