"""Reading API over a prepared folder: COCO split file + frame store (decoding fallback)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fredfusion.data.frames import BadFrameError, read_frame
from fredfusion.data.paths import resolve_under
from fredfusion.data.store import MANIFEST_NAME, EncodedFrames, FrameStore
from fredfusion.spec import FRAME_KINDS, check_modality, frames_for

PAIRS_CHOICES = ("required", "dual", "any")
_PAIR_STATUS = ("dual", "rgb_only", "event_only")


@dataclass
class FrameBatch:
    """Frames and boxes of a batch of images, in store pixels.

    ``bad`` marks images that could not be read when loading with ``skip_bad`` (their frames are
    zeros, their boxes empty, their has_* flags False); ``problems`` lists (image id, file, reason)
    for each of them. ``encoded`` holds the frame kinds loaded undecoded (for decoding on the device;
    a bad image's frame is empty there); their arrays in ``rgb`` / ``event`` are zeros.
    """

    ids: np.ndarray
    rgb: np.ndarray
    event: np.ndarray
    boxes: list[np.ndarray]
    has_rgb: np.ndarray
    has_event: np.ndarray
    bad: np.ndarray | None = None
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    encoded: dict[str, EncodedFrames] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bad is None:
            self.bad = np.zeros(len(self.ids), dtype=bool)


def _load_coco(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"split file not found: {path}; run `fredfusion prepare` to create the prepared folder"
        )
    try:
        with open(path) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in {path} (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ValueError(f"{path} is not a COCO file (no 'images' list)")
    return coco


class PreparedDataset:
    """One split of a prepared folder: image list, boxes in store pixels, frames from the store.

    modality: rgb | event | dual. pairs: "required" keeps images that have the modality (both for
    dual), "dual" keeps true pairs only whatever the modality, "any" keeps every image (a missing
    modality reads as zeros). max_images keeps that many images spread evenly over the split.
    skip_bad: ``load`` skips images it cannot read (frame store file damaged after prepare, source
    frame missing or corrupt on the decoding path) instead of raising: see ``load``.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        modality: str = "dual",
        pairs: str = "required",
        max_images: int | None = None,
        skip_bad: bool = False,
    ) -> None:
        check_modality(modality)
        if pairs not in PAIRS_CHOICES:
            raise ValueError(f"pairs must be one of {PAIRS_CHOICES}, got {pairs!r}")
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        self.root = Path(root)
        self.split = split
        self.modality = modality
        self.pairs = pairs
        self.skip_bad = skip_bad
        self.path = self.root / "annotations" / f"instances_{split}.json"
        self.coco = _load_coco(self.path)
        info = self.coco.get("info") or {}
        self.fred_root: Path | None = Path(info["fred_root"]) if info.get("fred_root") else None

        flags = [self._image_flags(k, img) for k, img in enumerate(self.coco["images"])]
        keep = [k for k, (has_rgb, has_event) in enumerate(flags) if self._wanted(has_rgb, has_event)]
        if max_images is not None and len(keep) > max_images:
            pick = np.unique(np.linspace(0, len(keep) - 1, max_images).round().astype(np.int64))
            keep = [keep[i] for i in pick] if max_images > 0 else []
        self.images: list[dict[str, Any]] = [self.coco["images"][k] for k in keep]
        self.ids = np.asarray([int(img["id"]) for img in self.images], dtype=np.int64)
        self.has_rgb = np.asarray([flags[k][0] for k in keep], dtype=bool)
        self.has_event = np.asarray([flags[k][1] for k in keep], dtype=bool)
        self._index = {int(i): k for k, i in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError(f"{self.path}: duplicate image ids")

        first = self.images[0] if self.images else (self.coco["images"] or [{}])[0]
        self.orig_hw: tuple[int, int] = (int(first.get("height", 720)), int(first.get("width", 1280)))
        self.store_dir = self.root / "store"
        self.store: FrameStore | None = None
        self.store_hw = self._store_size(info)
        self.scale = self.store_hw[1] / self.orig_hw[1]
        self._boxes = self._collect_boxes()
        self._warned_fallback = False

    # -- construction helpers ------------------------------------------------------------------

    def _image_flags(self, k: int, img: Any) -> tuple[bool, bool]:
        if not isinstance(img, dict):
            raise ValueError(f"{self.path}: image entry {k} is not an object")
        for key in ("id", "width", "height", "sequence_id"):
            if key not in img:
                raise ValueError(f"{self.path}: image entry {k} lacks {key!r}")
        has_rgb = img.get("rgb_file_name") is not None
        has_event = img.get("event_file_name") is not None
        status = img.get("pair_status")
        if status is not None:
            if status not in _PAIR_STATUS:
                raise ValueError(f"{self.path}: image {img['id']} has unknown pair_status {status!r}")
            expect = {"dual": (True, True), "rgb_only": (True, False), "event_only": (False, True)}[status]
            if (has_rgb, has_event) != expect:
                raise ValueError(
                    f"{self.path}: image {img['id']} has pair_status {status!r} but "
                    f"rgb_file_name={img.get('rgb_file_name')!r}, "
                    f"event_file_name={img.get('event_file_name')!r}"
                )
        return has_rgb, has_event

    def _wanted(self, has_rgb: bool, has_event: bool) -> bool:
        if self.pairs == "any":
            return True
        if self.pairs == "dual" or self.modality == "dual":
            return has_rgb and has_event
        return has_rgb if self.modality == "rgb" else has_event

    def _store_size(self, info: dict[str, Any]) -> tuple[int, int]:
        """(height, width) of the store, from the COCO info, else the store, else the default."""
        want = None
        if info.get("store_width") and info.get("store_height"):
            want = (int(info["store_width"]), int(info["store_height"]))
        if self.store_dir.is_dir() and any(self.store_dir.iterdir()):
            # A store folder that exists must be usable: an interrupted or mismatched build is an error.
            if not (self.store_dir / MANIFEST_NAME).is_file():
                raise FileNotFoundError(
                    f"incomplete frame store: {self.store_dir / MANIFEST_NAME} is missing "
                    f"(interrupted build?); run `fredfusion prepare` again to finish it"
                )
            self.store = FrameStore(self.store_dir, expect_wh=want)
            return self.store.height, self.store.width
        if want is not None:
            return want[1], want[0]
        h, w = self.orig_hw
        return round(640 * h / w), 640

    def _collect_boxes(self) -> dict[int, np.ndarray]:
        per_image: dict[int, list[list[float]]] = {int(i): [] for i in self.ids}
        sx = {int(img["id"]): self.store_hw[1] / float(img["width"]) for img in self.images}
        sy = {int(img["id"]): self.store_hw[0] / float(img["height"]) for img in self.images}
        for k, ann in enumerate(self.coco.get("annotations") or []):
            try:
                iid = int(ann["image_id"])
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{self.path}: annotation entry {k} needs image_id and bbox [x, y, w, h]"
                ) from None
            if iid not in per_image or w <= 0 or h <= 0:
                continue
            per_image[iid].append([x * sx[iid], y * sy[iid], (x + w) * sx[iid], (y + h) * sy[iid]])
        return {iid: np.asarray(b, dtype=np.float32).reshape(-1, 4) for iid, b in per_image.items()}

    # -- public API ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def _pos(self, image_id: int) -> int:
        try:
            return self._index[int(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in split {self.split!r} ({self.path})") from None

    def boxes_for(self, image_id: int) -> np.ndarray:
        """Boxes (n, 4) float32 x1y1x2y2 of one image, in store pixels."""
        self._pos(image_id)
        return self._boxes[int(image_id)]

    def sequence_of(self, image_id: int) -> int:
        """Sequence id of one image."""
        return int(self.images[self._pos(image_id)]["sequence_id"])

    def pairing_summary(self) -> dict[str, Any]:
        """Pairing statistics of the kept images (avg_tdiff_ms = 0.0 when there is no pair)."""
        dual = self.has_rgb & self.has_event
        tdiff = [
            abs(float(img["time_diff_ms"]))
            for img, d in zip(self.images, dual)
            if d and img.get("time_diff_ms") is not None
        ]
        n = len(self.images)
        return {
            "images": n,
            "dual": int(dual.sum()),
            "dual_rate": float(dual.sum()) / n if n else 0.0,
            "avg_tdiff_ms": float(np.mean(tdiff)) if tdiff else 0.0,
        }

    def damaged_images(self) -> list[tuple[int, str, str]]:
        """(image id, file, reason) for the images of this split whose frame store file is missing,
        unreadable or of the wrong size: one check per shard file, no frame is read."""
        if self.store is None:
            return []
        in_store = self.store.has(self.ids)
        return self.store.damaged(self.ids[in_store], frames_for(self.modality))

    def load(
        self,
        ids: Any,
        modalities: tuple[str, ...] | None = None,
        out: dict[str, np.ndarray] | None = None,
        skip_bad: bool | None = None,
        encoded: tuple[str, ...] = (),
    ) -> FrameBatch:
        """Frames and boxes of ``ids`` (rows in that order) from the store, decoding as a fallback.

        ``modalities`` defaults to those of the dataset's modality; the others read as zeros and
        their has_* flags are False. ``out`` optionally gives preallocated (B, H, W, 3) uint8
        arrays per modality to fill. ``skip_bad`` (default: the dataset's) turns an unreadable image
        into zeros without boxes, marked in ``bad`` and described in ``problems``; otherwise it
        raises an error naming the file. ``encoded`` names modalities to return as checked encoded
        bytes (``FrameBatch.encoded``) instead of decoding them: see ``device_decodable``.
        """
        skip = self.skip_bad if skip_bad is None else bool(skip_bad)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        mods = frames_for(self.modality) if modalities is None else tuple(modalities)
        if self.store is not None:  # a store built for one modality: the other reads as zeros, if optional
            mods = tuple(m for m in mods if m in self.store.kinds or m in frames_for(self.modality))
        if encoded:
            return self._load_encoded(ids, mods, out, skip, tuple(encoded))
        pos = np.asarray([self._pos(i) for i in ids], dtype=np.int64)
        h, w = self.store_hw
        bad = np.zeros(len(ids), dtype=bool)
        problems: list[tuple[int, str, str]] = []
        in_store = self.store.has(ids) if self.store is not None else np.zeros(len(ids), dtype=bool)
        if self.store is not None and in_store.all():
            if skip:
                frames, bad, problems = self.store.read_valid(ids, mods, out=out)
            else:
                frames = self.store.read(ids, mods, out=out)
        else:
            frames = {}
            for m in mods:
                buf = None if out is None else out.get(m)
                if buf is None:
                    buf = np.zeros((len(ids), h, w, 3), dtype=np.uint8)
                else:
                    buf[...] = 0
                frames[m] = buf
            if self.store is not None and in_store.any():
                if skip:
                    got, bad[in_store], found = self.store.read_valid(ids[in_store], mods)
                    problems += found
                else:
                    got = self.store.read(ids[in_store], mods)
                for m in mods:
                    frames[m][in_store] = got[m]
            if skip:
                problems += self._decode_skipping(ids, pos, ~in_store, frames, bad)
            else:
                self._decode_missing(ids, pos, ~in_store, frames)
        zeros = None
        for m in FRAME_KINDS:
            if m not in frames:
                zeros = zeros if zeros is not None else np.zeros((len(ids), h, w, 3), dtype=np.uint8)
                frames[m] = zeros
        no_boxes = np.zeros((0, 4), dtype=np.float32)
        return FrameBatch(
            ids=ids,
            rgb=frames["rgb"],
            event=frames["event"],
            boxes=[no_boxes if b else self._boxes[int(i)] for i, b in zip(ids.tolist(), bad.tolist())],
            has_rgb=self.has_rgb[pos] & ("rgb" in mods) & ~bad,
            has_event=self.has_event[pos] & ("event" in mods) & ~bad,
            bad=bad,
            problems=problems,
        )

    def device_decodable(self, kinds: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The frame kinds (of ``kinds``, default the dataset's) whose frames every image of the split
        has in the store as JPEG: those a loader may hand to the device undecoded."""
        kinds = frames_for(self.modality) if kinds is None else kinds
        if self.store is None or not self.store.has(self.ids).all():
            return ()
        return tuple(k for k in kinds if k in self.store.kinds and self.store.codecs[k].name == "jpeg")

    def _load_encoded(
        self,
        ids: np.ndarray,
        mods: tuple[str, ...],
        out: dict[str, np.ndarray] | None,
        skip: bool,
        encoded: tuple[str, ...],
    ) -> FrameBatch:
        """``load`` with the ``encoded`` kinds as checked bytes, the others decoded."""
        if self.store is None or not self.store.has(ids).all():
            raise ValueError(f"encoded frames need every image in the frame store {self.store_dir}")
        decoded = tuple(m for m in mods if m not in encoded)
        batch = self.load(ids, decoded, out, skip)
        bad, problems = batch.bad, list(batch.problems)
        for kind in encoded:
            frames, kind_bad, found = self.store.read_encoded(ids, kind)
            if found and not skip:
                image, path, reason = found[0]
                raise OSError(
                    f"frame store file {path}: image {image}: {reason}; run `fredfusion prepare` again"
                )
            new = kind_bad & ~bad
            problems += [p for p in found if p[0] in set(ids[new].tolist())]
            bad = bad | kind_bad
            batch.encoded[kind] = frames
        for frames in batch.encoded.values():
            frames.sizes[bad] = 0
        for kind in decoded:
            getattr(batch, kind)[bad] = 0
        pos = np.asarray([self._pos(i) for i in ids], dtype=np.int64)
        no_boxes = np.zeros((0, 4), dtype=np.float32)
        batch.boxes = [no_boxes if b else box for box, b in zip(batch.boxes, bad.tolist())]
        batch.has_rgb = self.has_rgb[pos] & ("rgb" in mods) & ~bad
        batch.has_event = self.has_event[pos] & ("event" in mods) & ~bad
        batch.bad, batch.problems = bad, problems
        return batch

    def _decode_skipping(
        self,
        ids: np.ndarray,
        pos: np.ndarray,
        missing: np.ndarray,
        frames: dict[str, np.ndarray],
        bad: np.ndarray,
    ) -> list[tuple[int, str, str]]:
        """Decode the ``missing`` rows one image at a time; an image with an unusable source frame
        becomes zeros and is marked in ``bad``. Returns (image id, file, reason) per such image."""
        problems: list[tuple[int, str, str]] = []
        for row in np.flatnonzero(missing).tolist():
            one = np.zeros(len(ids), dtype=bool)
            one[row] = True
            try:
                self._decode_missing(ids, pos, one, frames)
            except BadFrameError as e:
                bad[row] = True
                problems.append((int(ids[row]), str(e.path), e.reason))
                for buf in frames.values():
                    buf[row] = 0
        return problems

    def _decode_missing(
        self, ids: np.ndarray, pos: np.ndarray, missing: np.ndarray, frames: dict[str, np.ndarray]
    ) -> None:
        if not missing.any():
            return
        if self.fred_root is None:
            raise FileNotFoundError(
                f"image {int(ids[missing][0])} is not in the frame store {self.store_dir} and {self.path} "
                f"has no info.fred_root to decode it from; run `fredfusion prepare`"
            )
        if not self._warned_fallback:
            self._warned_fallback = True
            reason = "absent" if self.store is None else "missing some images"
            warnings.warn(
                f"frame store {self.store_dir} is {reason}: decoding frames from {self.fred_root} "
                f"(slow); run `fredfusion prepare` to build the store",
                RuntimeWarning,
                stacklevel=3,
            )
        h, w = self.store_hw
        for row in np.flatnonzero(missing):
            img = self.images[pos[row]]
            for m in frames:
                name = img.get(f"{m}_file_name")
                if name is None:
                    continue
                frames[m][row] = read_frame(
                    resolve_under(self.fred_root, name, self.path),
                    w,
                    h,
                    orig_size=(int(img["width"]), int(img["height"])),
                )
