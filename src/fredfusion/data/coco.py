"""COCO JSON export of paired FRED images, atomic writing and checked loading."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fredfusion.data.fred import FRAME_HEIGHT, FRAME_WIDTH, FredError
from fredfusion.data.pairing import PairedImage
from fredfusion.data.paths import UnsafePathError, check_relative_name
from fredfusion.files import write_json_atomic

__all__ = ["CATEGORIES", "build_coco", "load_coco", "write_coco"]

CATEGORIES: list[dict[str, Any]] = [{"id": 1, "name": "drone"}]
_REQUIRED_KEYS = ("images", "annotations", "categories")
_NAME_KEYS = ("file_name", "rgb_file_name", "event_file_name")  # relative to info.fred_root


def _coco_images(
    images: Sequence[PairedImage],
    width: int,
    height: int,
    conditions: Mapping[int, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """The ``images`` entries (with ``conditions`` of their sequence when given); ValueError for an
    image without an id or an id used twice."""
    coco_images: list[dict[str, Any]] = []
    ids: list[int] = []
    for img in images:
        image_id = int(img.image_id)
        if image_id < 0:
            raise ValueError(f"image {img.rgb_file_name or img.event_file_name} has no image id")
        ids.append(image_id)
        rgb = img.rgb_file_name
        dt = img.time_diff_ms
        coco_images.append(
            {
                "id": image_id,
                "file_name": rgb if rgb is not None else img.event_file_name,
                "width": width,
                "height": height,
                "sequence_id": img.sequence_id,
                "frame_index": img.frame_index,
                "time_s": img.time_s,
                "rgb_file_name": rgb,
                "event_file_name": img.event_file_name,
                "time_diff_ms": dt,
                "pair_status": img.pair_status,
            }
        )
    if len(set(ids)) != len(ids):
        uniq, counts = np.unique(np.asarray(ids), return_counts=True)
        raise ValueError(f"duplicate image id {int(uniq[counts > 1][0])}")
    # Numbers are rounded in bulk (6 decimals for times, 3 for pixels and milliseconds).
    times = np.round(np.asarray([im["time_s"] for im in coco_images], dtype=np.float64), 6).tolist()
    dts = np.round(
        np.asarray([np.nan if im["time_diff_ms"] is None else im["time_diff_ms"] for im in coco_images]), 3
    ).tolist()
    for im, t, dt in zip(coco_images, times, dts):
        im["sequence_id"] = int(im["sequence_id"])
        im["frame_index"] = int(im["frame_index"])
        im["time_s"] = t
        if im["time_diff_ms"] is not None:
            im["time_diff_ms"] = dt
        if conditions is not None:
            im["conditions"] = [str(c) for c in conditions.get(im["sequence_id"], ())]
    return coco_images


def _coco_annotations(images: Sequence[PairedImage], ann_id_start: int) -> list[dict[str, Any]]:
    """The ``annotations`` entries (boxes as ``xywh``), ids counting up from ``ann_id_start``."""
    with_boxes = [img for img in images if len(img.boxes)]
    if not with_boxes:
        return []
    boxes = np.concatenate([img.boxes for img in with_boxes]).astype(np.float64)
    xywh = boxes.copy()
    xywh[:, 2:] -= boxes[:, :2]
    area = np.round(xywh[:, 2] * xywh[:, 3], 3).tolist()
    xywh = np.round(xywh, 3).tolist()
    owners = [int(img.image_id) for img in with_boxes for _ in range(len(img.boxes))]
    tids = np.concatenate([img.track_ids for img in with_boxes]).tolist()
    models = [m for img in with_boxes for m in img.drone_models]
    return [
        {
            "id": ann_id_start + k,
            "image_id": image_id,
            "bbox": bbox,
            "area": a,
            "iscrowd": 0,
            "category_id": 1,
            "track_id": tid,
            "drone_model": model,
        }
        for k, (bbox, a, image_id, tid, model) in enumerate(zip(xywh, area, owners, tids, models))
    ]


def build_coco(
    images: Sequence[PairedImage],
    split_name: str,
    info: dict[str, Any],
    frame_size: tuple[int, int] = (FRAME_WIDTH, FRAME_HEIGHT),
    ann_id_start: int = 1,
    conditions: Mapping[int, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Build a COCO dict for one split.

    Every image must carry its final ``image_id`` (>= 0, unique). ``width``/``height`` are the
    original frame size ``frame_size``; ``file_name`` is the RGB file name when there is one,
    else the event file name (both relative to the FRED root, also given separately).
    Annotation ids count up from ``ann_id_start``. ``info`` is copied into the ``info`` entry
    together with ``split``. ``conditions`` (sequence id -> condition names, see ``data.conditions``)
    gives every image a ``conditions`` list (empty for a sequence it does not name); without it the
    images have no such key.
    """
    coco_images = _coco_images(images, int(frame_size[0]), int(frame_size[1]), conditions)
    return {
        "info": {**info, "split": split_name},
        "images": coco_images,
        "annotations": _coco_annotations(images, ann_id_start),
        "categories": [dict(c) for c in CATEGORIES],
    }


def _umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_coco(path: Path, coco: dict[str, Any]) -> None:
    """Write a COCO dict atomically (temporary file in the same folder, then ``os.replace``)."""
    write_json_atomic(path, coco)


def load_coco(path: Path) -> dict[str, Any]:
    """Load and check a COCO file; raises :class:`FredError` naming the file when it is unusable.

    File names of images (``file_name``, ``rgb_file_name``, ``event_file_name``) must be plain
    relative names: absolute paths and ``..`` components are refused (they could point outside
    the FRED root).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FredError(f"{path}: COCO file not found") from None
    except json.JSONDecodeError as exc:
        raise FredError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FredError(f"{path}: cannot read COCO file ({exc})") from None
    if not isinstance(data, dict):
        raise FredError(f"{path}: not a COCO file (top level is not an object)")
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise FredError(f"{path}: not a COCO file (missing or invalid: {', '.join(missing)})")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise FredError(f"{path}: images[{i}] has no id")
        for key in _NAME_KEYS:
            name = img.get(key)
            if name is not None:
                try:
                    check_relative_name(name, f"{path}: images[{i}].{key}")
                except UnsafePathError as exc:
                    raise FredError(str(exc)) from None
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "bbox"} <= ann.keys():
            raise FredError(f"{path}: annotations[{i}] needs image_id and bbox")
    return data
