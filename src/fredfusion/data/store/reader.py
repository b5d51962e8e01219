"""Reading the frame store: random access by image id, decoding on the CPU or handing out the bytes.

Data files are memory-mapped lazily, once per process. A data file is checked (exists, readable, size
as in its json) once per process when first used and stat'ed once per batch while mapped; an encoded
frame is checked against its CRC-32 and its decoded size when read. ``read`` raises an OSError naming
a damaged file or frame; ``read_valid`` returns those images as zeros with a mask and the reasons;
``read_encoded`` gives the checked bytes of encoded frames for decoding on the device.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fredfusion.data.store.codecs import RAW, Codec, CorruptFrame
from fredfusion.data.store.layout import MANIFEST_NAME, READABLE_VERSIONS, read_json, shard_json
from fredfusion.spec import FRAME_KINDS

_HINT = "run `fredfusion prepare` to build it"
_REBUILD = "run `fredfusion prepare` again to rebuild it"


@dataclass
class _Unit:
    """One shard kind as read: data file, codec, expected size and, when encoded, the frame index."""

    path: Path
    codec: Codec
    size: int
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None
    crc32: np.ndarray | None = None


@dataclass
class EncodedFrames:
    """Checked encoded bytes of one frame kind for a batch: ``data`` holds the frames one after another,
    frame k at ``data[starts[k] : starts[k] + sizes[k]]``; size 0 means no frame (zeros)."""

    codec: Codec
    data: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray


class FrameStore:
    """Random access to a built frame store (see the module notes)."""

    def __init__(self, store_dir: Path, expect_wh: tuple[int, int] | None = None) -> None:
        """Open ``store_dir``; ``expect_wh`` = (width, height) the caller needs (checked)."""
        self.store_dir = Path(store_dir)
        manifest = self._manifest()
        self.width, self.height = int(manifest["width"]), int(manifest["height"])
        if expect_wh is not None and (self.width, self.height) != tuple(expect_wh):
            raise ValueError(
                f"frame store {self.store_dir / MANIFEST_NAME} was built at {self.width}x{self.height}, "
                f"expected {expect_wh[0]}x{expect_wh[1]}; {_HINT} with the wanted size"
            )
        self.version = int(manifest["format_version"])
        self.kinds: tuple[str, ...] = tuple(manifest.get("kinds", FRAME_KINDS))
        codecs = manifest.get("codecs") or {}
        self.codecs: dict[str, Codec] = {
            k: Codec.from_dict(codecs[k]) if k in codecs else RAW[k] for k in self.kinds
        }
        self._units: list[dict[str, _Unit]] = []
        self._counts: list[int] = []
        ids: list[np.ndarray] = []
        self.bad_ids: set[int] = set()
        self.bad_frames: list[tuple[int, str, str]] = []
        for k, shard in enumerate(manifest["shards"]):
            try:
                seq, n = int(shard["sequence_id"]), int(shard["n"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"invalid shard entry {k} in {self.store_dir / MANIFEST_NAME}; {_HINT}"
                ) from None
            shard_ids, units = self._open_shard(seq, n)
            self._units.append(units)
            self._counts.append(n)
            ids.append(shard_ids)
        self._index(ids)
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._problems: dict[tuple[int, str], str | None] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------- opening
    def _manifest(self) -> dict[str, Any]:
        path = self.store_dir / MANIFEST_NAME
        if not self.store_dir.is_dir():
            raise FileNotFoundError(f"frame store not found: {self.store_dir} ({_HINT})")
        if not path.is_file():
            raise FileNotFoundError(
                f"incomplete frame store: {path} is missing (interrupted build?); "
                f"run `fredfusion prepare` again to finish it"
            )
        try:
            manifest = read_json(path)
            version = manifest["format_version"]
            int(manifest["width"]), int(manifest["height"]), list(manifest["shards"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"invalid frame store manifest {path}: {e}; {_HINT}") from None
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"frame store {path} has format version {version}, this version reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}; {_HINT}"
            )
        return manifest

    def _shard_meta(self, seq: int, kind: str | None) -> dict[str, Any]:
        path = self.store_dir / shard_json(seq, kind)
        try:
            return read_json(path)
        except OSError:
            raise FileNotFoundError(
                f"incomplete frame store: {path} is missing; run `fredfusion prepare` again"
            ) from None
        except ValueError as e:
            raise ValueError(f"invalid shard file {path}: {e}; {_HINT}") from None

    def _open_shard(self, seq: int, n: int) -> tuple[np.ndarray, dict[str, _Unit]]:
        """Ids and units of one shard; the size of its data files is checked on first use, not here."""
        metas = {None: self._shard_meta(seq, None)} if self.version == 1 else {}
        units: dict[str, _Unit] = {}
        ids = None
        for kind in self.kinds:
            meta = metas[None] if self.version == 1 else self._shard_meta(seq, kind)
            where = self.store_dir / shard_json(seq, None if self.version == 1 else kind)
            if meta.get("n") != n or meta.get("width") != self.width or meta.get("height") != self.height:
                raise ValueError(f"shard {where} does not match {self.store_dir / MANIFEST_NAME}; {_HINT}")
            kind_ids = np.asarray(meta.get("ids", []), dtype=np.int64)
            if len(kind_ids) != n or (ids is not None and not np.array_equal(ids, kind_ids)):
                raise ValueError(f"shard {where} lists other images than its sequence's other files; {_HINT}")
            ids = kind_ids
            units[kind] = self._unit(seq, kind, n, meta)
            for b in meta.get("bad", []):
                if int(b[0]) not in self.bad_ids:
                    self.bad_ids.add(int(b[0]))
                    self.bad_frames.append((int(b[0]), str(b[1]), str(b[2])))
        return (ids if ids is not None else np.zeros(0, np.int64)), units

    def _unit(self, seq: int, kind: str, n: int, meta: dict[str, Any]) -> _Unit:
        codec = self.codecs[kind]
        if self.version == 1:
            return _Unit(self.store_dir / f"seq_{seq}.{kind}.u8", codec, n * self.bytes_per_frame)
        path = self.store_dir / str(meta.get("file"))
        if codec.fixed_size:
            return _Unit(path, codec, n * self.bytes_per_frame)
        try:
            offsets = np.asarray(meta["offsets"], dtype=np.int64)
            sizes = np.asarray(meta["sizes"], dtype=np.int64)
            crc = np.asarray(meta["crc32"], dtype=np.uint32)
            total = int(meta["bytes"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"shard {self.store_dir / shard_json(seq, kind)} has no frame index; {_HINT}"
            ) from None
        if not len(offsets) == len(sizes) == len(crc) == n:
            raise ValueError(
                f"shard {self.store_dir / shard_json(seq, kind)} has a frame index of the wrong length"
            )
        return _Unit(path, codec, total, offsets, sizes, crc)

    def _index(self, ids: list[np.ndarray]) -> None:
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        shard_of = np.repeat(np.arange(len(self._counts), dtype=np.int64), self._counts)
        row_of = np.concatenate([np.arange(n, dtype=np.int64) for n in self._counts]) if ids else shard_of
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[order]
        if len(self._sorted_ids) > 1 and (np.diff(self._sorted_ids) == 0).any():
            dup = int(self._sorted_ids[:-1][np.diff(self._sorted_ids) == 0][0])
            raise ValueError(f"frame store {self.store_dir} holds image id {dup} twice; {_HINT}")
        self._sorted_shard = shard_of[order]
        self._sorted_row = row_of[order]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_problems"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._problems = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        try:
            return bool(self.has(np.asarray([image_id], dtype=np.int64))[0])
        except (TypeError, ValueError):
            return False

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one decoded frame of one kind."""
        return self.width * self.height * 3

    def stored_bytes(self, kind: str) -> float:
        """Mean bytes one frame of ``kind`` takes on disk."""
        units = [u[kind] for u in self._units]
        total = sum(u.size for u in units)
        return total / max(sum(self._counts), 1)

    def has(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` the store holds."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(self._sorted_ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        return self._sorted_ids[pos] == ids

    # ------------------------------------------------------------------------------ file checks
    def _fresh_process(self) -> None:
        """Memmaps and file checks belong to one process (DataLoader workers start without them)."""
        if self._pid != os.getpid():
            self._maps = {}
            self._problems = {}
            self._pid = os.getpid()

    def _problem(self, shard: int, kind: str) -> str | None:
        """Why a data file cannot be read (missing, unreadable, size not the json's), else None; checked
        once per process and file (one open + fstat), never per frame."""
        self._fresh_process()
        key = (shard, kind)
        if key in self._problems:
            return self._problems[key]
        unit = self._units[shard][kind]
        try:
            with open(unit.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            reason: str | None = "missing file"
        except OSError as e:
            reason = f"unreadable ({e.strerror or type(e).__name__})"
        else:
            reason = None
            if size != unit.size:
                reason = f"{size} bytes, expected {unit.size} (truncated or rewritten after prepare)"
        self._problems[key] = reason
        return reason

    def _check(self, shard: int, kind: str) -> str | None:
        """``_problem``, plus one stat when the file is already mapped in this process: a file truncated
        under a live memmap would kill the reader with SIGBUS on the next copy, so a size change since
        the mapping marks the file damaged and drops the mapping instead. Once per file and batch."""
        reason = self._problem(shard, kind)
        key = (shard, kind)
        if reason is None and key in self._maps:
            unit = self._units[shard][kind]
            try:
                size = os.stat(unit.path).st_size
            except FileNotFoundError:
                reason = "missing file (deleted during training)"
            except OSError as e:
                reason = f"unreadable ({e.strerror or type(e).__name__})"
            else:
                if size != unit.size:
                    reason = f"{size} bytes, expected {unit.size} (changed during training)"
            if reason is not None:
                self._problems[key] = reason
                del self._maps[key]
        return reason

    def _file_error(self, shard: int, kind: str, reason: str) -> OSError:
        path = self._units[shard][kind].path
        if reason.startswith("missing file"):
            return FileNotFoundError(f"frame store file missing: {path}; run `fredfusion prepare` again")
        return OSError(f"frame store file {path}: {reason}; {_REBUILD}")

    def _map(self, shard: int, kind: str) -> np.ndarray:
        self._fresh_process()
        key = (shard, kind)
        mm = self._maps.get(key)
        if mm is None:
            reason = self._problem(shard, kind)
            if reason is not None:
                raise self._file_error(shard, kind, reason)
            unit = self._units[shard][kind]
            shape = (
                (self._counts[shard], self.height, self.width, 3) if unit.codec.fixed_size else (unit.size,)
            )
            try:
                mm = (
                    np.memmap(unit.path, dtype=np.uint8, mode="r", shape=shape)
                    if unit.size
                    else np.zeros(0, np.uint8)
                )
            except (OSError, ValueError) as e:  # changed between the check and the mapping
                self._problems[key] = f"cannot be mapped ({e})"
                raise self._file_error(shard, kind, self._problems[key]) from None
            self._maps[key] = mm
        return mm

    def _kinds(self, kinds: Sequence[str]) -> tuple[str, ...]:
        for kind in kinds:
            if kind not in FRAME_KINDS:
                raise ValueError(f"unknown frame kind {kind!r}; expected one of {FRAME_KINDS}")
            if kind not in self.kinds:
                raise ValueError(
                    f"frame store {self.store_dir} holds no {kind} frames "
                    f"(built for {', '.join(self.kinds)}); run `fredfusion prepare` with --modalities "
                    f"including {kind}"
                )
        return tuple(kinds)

    def damaged(
        self, ids: Sequence[int] | np.ndarray, kinds: Sequence[str] = FRAME_KINDS
    ) -> list[tuple[int, str, str]]:
        """(image id, file, reason) for each of ``ids`` whose data file is missing, unreadable or of the
        wrong size; one open + fstat per file, nothing is mapped or read."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        kinds = tuple(k for k in self._kinds(kinds))
        return self._damaged_rows(ids, self._locate(ids)[0], kinds, open_maps=False)[1]

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each id; KeyError naming the first id the store does not hold."""
        found = self.has(ids)
        if not found.all():
            raise KeyError(f"image id {int(ids[~found][0])} is not in frame store {self.store_dir}")
        pos = np.searchsorted(self._sorted_ids, ids)
        return self._sorted_shard[pos], self._sorted_row[pos]

    def _damaged_rows(
        self, ids: np.ndarray, shards: np.ndarray, kinds: tuple[str, ...], open_maps: bool = True
    ) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
        bad = np.zeros(len(ids), dtype=bool)
        reasons: dict[int, tuple[str, str]] = {}
        for shard in np.unique(shards).tolist():
            for kind in kinds:
                reason = self._check(shard, kind)
                if reason is None and open_maps:
                    try:
                        self._map(shard, kind)
                    except OSError:
                        reason = self._problems[(shard, kind)]
                if reason is not None:
                    rows = shards == shard
                    for row in np.flatnonzero(rows & ~bad).tolist():
                        reasons[row] = (str(self._units[shard][kind].path), reason)
                    bad |= rows
        return bad, [(int(ids[row]), *reasons[row]) for row in sorted(reasons)]

    # ------------------------------------------------------------------------------------ reading
    def read(
        self,
        ids: Sequence[int] | np.ndarray,
        kinds: Sequence[str] = FRAME_KINDS,
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Gather and decode frames: {kind: (B, H, W, 3) uint8}, rows in the order of ``ids``.

        ``out`` may give preallocated (B, H, W, 3) uint8 arrays (e.g. views of pinned or shared
        buffers) to fill. A data file that is missing, unreadable or of the wrong size, or an encoded
        frame that fails its check, raises an OSError naming it (``read_valid`` skips those images).
        """
        ids, result = self._buffers(ids, self._kinds(kinds), out)
        shards, rows = self._locate(ids)
        for shard in np.unique(shards).tolist():
            for kind in result:
                reason = self._check(shard, kind)
                if reason is not None:
                    raise self._file_error(shard, kind, reason)
        failed = self._gather(result, shards, rows, np.ones(len(ids), dtype=bool))
        if failed:
            k, path, reason = failed[0]
            raise OSError(f"frame store file {path}: image {int(ids[k])}: {reason}; {_REBUILD}")
        return result

    def read_valid(
        self,
        ids: Sequence[int] | np.ndarray,
        kinds: Sequence[str] = FRAME_KINDS,
        out: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, str, str]]]:
        """Like ``read``, but images that cannot be read come back as zeros instead of raising:
        returns (frames, bad mask (B,), [(image id, file, reason) per bad image])."""
        ids, result = self._buffers(ids, self._kinds(kinds), out)
        shards, rows = self._locate(ids)
        bad, problems = self._damaged_rows(ids, shards, tuple(result))
        for buf in result.values():
            buf[bad] = 0
        failed = self._gather(result, shards, rows, ~bad)
        for k, path, reason in failed:
            if not bad[k]:
                bad[k] = True
                problems.append((int(ids[k]), path, reason))
                for buf in result.values():
                    buf[k] = 0
        position = {int(i): k for k, i in enumerate(ids.tolist())}
        problems.sort(key=lambda p: position[p[0]])
        return result, bad, problems

    def _buffers(
        self, ids: Sequence[int] | np.ndarray, kinds: tuple[str, ...], out: dict[str, np.ndarray] | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        shape = (len(ids), self.height, self.width, 3)
        result: dict[str, np.ndarray] = {}
        for kind in kinds:
            buf = None if out is None else out.get(kind)
            if buf is None:
                buf = np.empty(shape, dtype=np.uint8)
            elif buf.shape != shape or buf.dtype != np.uint8:
                raise ValueError(f"out[{kind!r}] must be uint8 {shape}, got {buf.dtype} {buf.shape}")
            result[kind] = buf
        return ids, result

    def _frame_bytes(self, shard: int, kind: str, row: int) -> tuple[np.ndarray, str | None]:
        """The checked bytes of one encoded frame (empty = no frame), or the reason they fail."""
        unit = self._units[shard][kind]
        start, size = int(unit.offsets[row]), int(unit.sizes[row])
        blob = self._map(shard, kind)[start : start + size]
        if size and zlib.crc32(blob) != int(unit.crc32[row]):
            return blob, f"corrupt {unit.codec.name} frame {row} (CRC-32 mismatch)"
        return blob, None

    def _gather(
        self, result: dict[str, np.ndarray], shards: np.ndarray, rows: np.ndarray, keep: np.ndarray
    ) -> list[tuple[int, str, str]]:
        """Fill ``result`` rows ``keep``; returns (row, file, reason) of each frame that failed its check."""
        order = np.lexsort((rows, shards))
        order = order[keep[order]]
        failed: list[tuple[int, str, str]] = []
        for kind, buf in result.items():
            for k in order.tolist():
                shard, row = int(shards[k]), int(rows[k])
                unit = self._units[shard][kind]
                if unit.codec.fixed_size:
                    buf[k] = self._map(shard, kind)[row]
                    continue
                blob, reason = self._frame_bytes(shard, kind, row)
                if reason is None and not len(blob):
                    buf[k] = 0
                    continue
                if reason is None:
                    try:
                        unit.codec.decode_into(blob, buf[k])
                    except CorruptFrame as exc:
                        reason = f"frame {row}: {exc}"
                if reason is not None:
                    buf[k] = 0
                    failed.append((k, str(unit.path), reason))
        return failed

    def read_encoded(
        self, ids: Sequence[int] | np.ndarray, kind: str
    ) -> tuple[EncodedFrames, np.ndarray, list[tuple[int, str, str]]]:
        """The checked bytes of the encoded frames of ``ids`` (kind ``kind``, not raw) for decoding on
        the device: (frames, bad mask, problems). A bad image's frame is empty (size 0)."""
        (kind,) = self._kinds([kind])
        if self.codecs[kind].fixed_size:
            raise ValueError(f"{kind} frames of {self.store_dir} are raw rows, not encoded frames")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        shards, rows = self._locate(ids)
        bad, problems = self._damaged_rows(ids, shards, (kind,))
        blobs: list[np.ndarray] = []
        for k in range(len(ids)):
            blob = np.zeros(0, np.uint8)
            if not bad[k]:
                shard, row = int(shards[k]), int(rows[k])
                blob, reason = self._frame_bytes(shard, kind, row)
                if reason is not None:
                    bad[k] = True
                    problems.append((int(ids[k]), str(self._units[shard][kind].path), reason))
                    blob = np.zeros(0, np.uint8)
            blobs.append(np.asarray(blob))
        sizes = np.asarray([len(b) for b in blobs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
        return EncodedFrames(self.codecs[kind], data, starts, sizes), bad, problems
