"""Building the frame store: source frames decoded once, resized to the store size, encoded, written.

One unit of work is a shard kind (one sequence, one frame kind). A unit whose fingerprint (sources,
size, codec) is unchanged is reused; changed or missing units are rebuilt, units no longer wanted are
deleted, so changing the codec of one kind rebuilds that kind only. Worker processes decode and encode
chunks of frames; the parent writes each unit's data file sequentially (encoded frames one after
another in arrival order, raw rows at their offset), then renames it and writes the unit's json last.
Bad source frames are reported and stored as empty frames, never fatal.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from fredfusion.data.frames import BadFrameError, read_frame
from fredfusion.data.store.codecs import RAW, Codec
from fredfusion.data.store.layout import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_FILE,
    FrameRecord,
    data_file,
    fingerprint,
    read_json,
    shard_json,
)
from fredfusion.files import is_temp_file, write_json_atomic
from fredfusion.spec import FRAME_KINDS

_CHUNK_FRAMES = 32
_DEVICE_BATCH = 64  # frames per batched decode / resize / encode on the device
_SPACE_MARGIN = 1.2  # estimated store size x this must be free
_SAMPLE_FRAMES = 6  # frames encoded per kind to estimate the size of an encoded store


class StoreSpaceError(OSError):
    """Not enough free disk space for the store; the message gives both numbers."""


@dataclass
class StoreReport:
    """What a build did. ``bad_frames`` also lists the bad frames of reused units."""

    built_shards: int
    reused_shards: int
    frames_written: int
    bad_frames: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    frames_per_s: float = 0.0
    bytes_written: int = 0
    codecs: dict[str, str] = field(default_factory=dict)


@dataclass
class _Unit:
    """One shard kind to build: its temp data file and what has been written into it."""

    seq: int
    kind: str
    codec: Codec
    records: list[FrameRecord]
    fingerprint: str
    tmp: Path
    remaining: int
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    crc32: list[int] = field(default_factory=list)
    written: int = 0
    bad: list[tuple[int, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.records)
        self.offsets, self.sizes, self.crc32 = [0] * n, [0] * n, [0] * n


def _unit_is_valid(
    store_dir: Path, seq: int, kind: str, n: int, width: int, height: int, fp: str
) -> dict | None:
    """The unit's json when the unit on disk matches ``fp`` and its data file has the recorded size."""
    try:
        meta = read_json(store_dir / shard_json(seq, kind))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("fingerprint") != fp or meta.get("n") != n:
        return None
    try:
        size = os.path.getsize(store_dir / str(meta["file"]))
    except (OSError, KeyError):
        return None
    expected = n * width * height * 3 if meta.get("codec", {}).get("name") == "raw" else meta.get("bytes")
    return meta if size == expected else None


def _group(records: Sequence[FrameRecord]) -> dict[int, list[FrameRecord]]:
    groups: dict[int, list[FrameRecord]] = {}
    seen: set[int] = set()
    for r in records:
        iid = int(r.image_id)
        if iid in seen:
            raise ValueError(f"duplicate image id {iid} in frame store records")
        seen.add(iid)
        groups.setdefault(int(r.sequence_id), []).append(r)
    return dict(sorted(groups.items()))


def _remove_stale_files(store_dir: Path, keep: set[str]) -> None:
    """Delete temp files of interrupted builds and every shard file not named in ``keep``."""
    for p in store_dir.iterdir():
        if not p.is_file():
            continue
        if (
            is_temp_file(p.name)
            or p.name.startswith(f"{MANIFEST_NAME}.tmp")
            or (SHARD_FILE.match(p.name) and p.name not in keep)
        ):
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ workers
def encode_frame(path: Path, codec: Codec, width: int, height: int, orig_size: Any) -> bytes:
    """One source frame decoded, resized to the store size and encoded (BadFrameError when unusable)."""
    frame = read_frame(path, width, height, orig_size, keep_gray=not codec.fixed_size)
    return codec.encode(frame)


def _encode_chunk(task: tuple[Any, ...]) -> tuple[int, dict[str, list[tuple[int, bytes | None]]], list]:
    """Decode and encode a chunk of one sequence's frames for the kinds being built (runs in workers)."""
    seq, width, height, rows, codecs = task
    blobs: dict[str, list[tuple[int, bytes | None]]] = {kind: [] for kind in codecs}
    bad: list[tuple[str, int, str, str]] = []
    for row, image_id, paths, orig_size in rows:
        for kind, codec in codecs.items():
            blob = None
            if paths[kind] is not None:
                try:
                    blob = encode_frame(Path(paths[kind]), codec, width, height, orig_size)
                except BadFrameError as e:
                    bad.append((kind, int(image_id), str(paths[kind]), e.reason))
            blobs[kind].append((row, blob))
    return seq, blobs, bad


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _tasks(units: dict[tuple[int, str], _Unit], width: int, height: int) -> Iterator[tuple[Any, ...]]:
    by_seq: dict[int, dict[str, _Unit]] = {}
    for (seq, kind), unit in units.items():
        by_seq.setdefault(seq, {})[kind] = unit
    for seq, kinds in by_seq.items():
        records = next(iter(kinds.values())).records
        rows = [
            (
                i,
                int(r.image_id),
                {k: None if r.path(k) is None else str(r.path(k)) for k in kinds},
                r.orig_size,
            )
            for i, r in enumerate(records)
        ]
        codecs = {kind: unit.codec for kind, unit in kinds.items()}
        for s in range(0, len(rows), _CHUNK_FRAMES):
            yield (seq, width, height, rows[s : s + _CHUNK_FRAMES], codecs)


# -------------------------------------------------------------------------------------- the parent
class _Writer:
    """Receives encoded chunks, writes them into the units' temp files, finishes complete units."""

    def __init__(self, store_dir: Path, units: dict[tuple[int, str], _Unit], width: int, height: int) -> None:
        self.store_dir, self.units, self.width, self.height = store_dir, units, width, height
        self.frame_bytes = width * height * 3
        self.files: dict[tuple[int, str], Any] = {}
        for key, unit in units.items():
            handle = open(unit.tmp, "wb")  # noqa: SIM115 - closed in _finish
            if unit.codec.fixed_size:
                handle.truncate(len(unit.records) * self.frame_bytes)
            self.files[key] = handle
        self.frames = 0

    def add(self, result: tuple[int, dict[str, list[tuple[int, bytes | None]]], list]) -> int:
        seq, blobs, bad = result
        for kind, image_id, path, reason in bad:
            self.units[(seq, kind)].bad.append((image_id, path, reason))
        done = 0
        for kind, rows in blobs.items():
            unit, handle = self.units[(seq, kind)], self.files[(seq, kind)]
            for row, blob in rows:
                if blob is not None:
                    if unit.codec.fixed_size:
                        handle.seek(row * self.frame_bytes)
                    else:
                        unit.offsets[row], unit.sizes[row] = unit.written, len(blob)
                        unit.crc32[row] = zlib.crc32(blob)
                        unit.written += len(blob)
                    handle.write(blob)
            unit.remaining -= len(rows)
            done += len(rows)
            if unit.remaining == 0:
                self._finish(unit)
        return done

    def _finish(self, unit: _Unit) -> None:
        handle = self.files.pop((unit.seq, unit.kind))
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        name = data_file(unit.seq, unit.kind, unit.codec)
        os.replace(unit.tmp, self.store_dir / name)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "sequence_id": unit.seq,
            "kind": unit.kind,
            "codec": unit.codec.to_dict(),
            "file": name,
            "width": self.width,
            "height": self.height,
            "n": len(unit.records),
            "ids": [int(r.image_id) for r in unit.records],
            "bad": [list(b) for b in sorted(unit.bad)],
            "fingerprint": unit.fingerprint,
        }
        if not unit.codec.fixed_size:
            meta.update(bytes=unit.written, offsets=unit.offsets, sizes=unit.sizes, crc32=unit.crc32)
        write_json_atomic(self.store_dir / shard_json(unit.seq, unit.kind), meta)

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _device_results(
    units: dict[tuple[int, str], _Unit], device: Any, width: int, height: int
) -> Iterator[tuple[int, dict[str, list[tuple[int, bytes | None]]], list]]:
    """Chunks of the JPEG units encoded on the device, in the shape ``_encode_chunk`` returns."""
    from fredfusion.data.store.device_encode import DeviceJpegEncoder

    encoders: dict[Codec, DeviceJpegEncoder] = {}
    try:
        for (seq, kind), unit in units.items():
            codec = unit.codec
            if codec not in encoders:
                encoders[codec] = DeviceJpegEncoder(device, width, height, codec)

            def fallback(path: Path, orig: Any, codec: Codec = codec) -> bytes:
                return encode_frame(path, codec, width, height, orig)

            for s in range(0, len(unit.records), _DEVICE_BATCH):
                records = unit.records[s : s + _DEVICE_BATCH]
                paths = [r.path(kind) for r in records]
                blobs, bad = encoders[codec].encode(paths, [r.orig_size for r in records], fallback)
                rows = [(s + k, blob) for k, blob in enumerate(blobs)]
                yield seq, {kind: rows}, [(kind, int(records[k].image_id), p, why) for k, p, why in bad]
    finally:
        for encoder in encoders.values():
            encoder.close()


def _pool(workers: int) -> contextlib.AbstractContextManager[ProcessPoolExecutor | None]:
    if workers == 0:
        return contextlib.nullcontext()
    # forkserver/spawn, never fork: a child forked from a parent whose OpenCV/torch thread pools
    # are running can deadlock (seen when prepare ran after synth in the same process)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    return ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, mp_context=context)


def _run(
    store_dir: Path,
    units: dict[tuple[int, str], _Unit],
    size: tuple[int, int],
    workers: int,
    progress: bool,
    device: Any = None,
) -> None:
    """Encode every frame of ``units``: JPEG units on ``device`` (in a thread) when given, the others in
    ``workers`` processes (or here); the writer finishes each unit as its last chunk arrives."""
    from tqdm import tqdm

    width, height = size
    on_device = {key: u for key, u in units.items() if device is not None and u.codec.name == "jpeg"}
    in_workers = {key: u for key, u in units.items() if key not in on_device}
    total = sum(len(u.records) for u in units.values())
    if total == 0:
        return
    writer = _Writer(store_dir, units, width, height)
    bar = tqdm(total=total, unit="frame", desc="frame store", disable=not progress, dynamic_ncols=True)
    lock = threading.Lock()
    failure: list[BaseException] = []

    def add(result: tuple[int, dict[str, list[tuple[int, bytes | None]]], list]) -> None:
        with lock:
            bar.update(writer.add(result))

    def device_side() -> None:
        try:
            for result in _device_results(on_device, device, width, height):
                add(result)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=device_side, daemon=True) if on_device else None
    try:
        if thread is not None:
            thread.start()
        with _pool(workers) as pool:
            pending: set[Future] = set()
            for task in _tasks(in_workers, width, height):
                if pool is None:
                    add(_encode_chunk(task))
                    continue
                pending.add(pool.submit(_encode_chunk, task))
                if len(pending) >= 4 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        add(fut.result())
            for fut in pending:
                add(fut.result())
        if thread is not None:
            thread.join()
            if failure:
                raise failure[0]
    finally:
        writer.close()
        bar.close()


def _estimate_bytes(units: dict[tuple[int, str], _Unit], width: int, height: int) -> int:
    """Bytes the units will take: exact for raw, from a few encoded sample frames otherwise."""
    total = 0
    samples: dict[str, list[int]] = {}
    for unit in units.values():
        n = len(unit.records)
        if unit.codec.fixed_size:
            total += n * width * height * 3
            continue
        sizes = samples.setdefault(unit.kind, [])
        for r in unit.records[:: max(1, n // _SAMPLE_FRAMES)]:
            if len(sizes) >= _SAMPLE_FRAMES or r.path(unit.kind) is None:
                continue
            try:
                sizes.append(len(encode_frame(r.path(unit.kind), unit.codec, width, height, r.orig_size)))
            except BadFrameError:
                continue
    for unit in units.values():
        if not unit.codec.fixed_size:
            sizes = samples.get(unit.kind) or [width * height * 3]
            total += len(unit.records) * int(sum(sizes) / len(sizes))
    return total


def check_free_space(store_dir: Path, needed: int) -> None:
    """StoreSpaceError when ``store_dir``'s disk has less than ``needed`` x the margin free."""
    free = shutil.disk_usage(store_dir).free
    if needed * _SPACE_MARGIN > free:
        raise StoreSpaceError(
            f"not enough free disk space for the frame store in {store_dir}: it needs about "
            f"{needed / 1e9:.2f} GB (+{(_SPACE_MARGIN - 1) * 100:.0f}% margin), "
            f"{free / 1e9:.2f} GB are free; free space, choose another --out, a smaller --imgsz "
            f"or a larger --stride"
        )


def build_store(
    store_dir: Path,
    records: Sequence[FrameRecord],
    width: int,
    height: int,
    workers: int = 0,
    progress: bool = True,
    codecs: dict[str, Codec] | None = None,
    kinds: Sequence[str] = FRAME_KINDS,
    device: Any = None,
) -> StoreReport:
    """Build (or bring up to date) the frame store in ``store_dir`` from ``records``.

    ``codecs`` gives the codec of each frame kind (default: raw rows); ``kinds`` the frame kinds
    to store (a run on one modality needs only its kind). ``workers`` > 0 decodes in that many
    processes; ``device`` (a torch device) encodes the JPEG kinds there in batches instead
    (``device_encode``). The free disk space is checked against the estimated size before anything
    is written.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame store size must be positive, got {width}x{height}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    kinds = tuple(k for k in FRAME_KINDS if k in set(kinds))
    if not kinds:
        raise ValueError(f"frame store needs at least one frame kind of {', '.join(FRAME_KINDS)}")
    codecs = {kind: (codecs or RAW)[kind] for kind in kinds}
    t0 = time.perf_counter()
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    groups = _group(records)

    units: dict[tuple[int, str], _Unit] = {}
    keep: set[str] = set()
    bad_frames: list[tuple[int, str, str]] = []
    for seq, recs in groups.items():
        for kind in kinds:
            codec = codecs[kind]
            fp = fingerprint(recs, kind, codec, width, height)
            keep.update({shard_json(seq, kind), data_file(seq, kind, codec)})
            meta = _unit_is_valid(store_dir, seq, kind, len(recs), width, height, fp)
            if meta is not None:
                bad_frames.extend((int(b[0]), str(b[1]), str(b[2])) for b in meta.get("bad", []))
                continue
            tmp = store_dir / f"{data_file(seq, kind, codec)}.tmp{os.getpid()}"
            units[(seq, kind)] = _Unit(seq, kind, codec, recs, fp, tmp, remaining=len(recs))

    manifest = {
        "format_version": FORMAT_VERSION,
        "width": width,
        "height": height,
        "kinds": list(kinds),
        "codecs": {kind: codec.to_dict() for kind, codec in codecs.items()},
        "shards": [{"sequence_id": seq, "n": len(recs)} for seq, recs in groups.items()],
    }
    manifest_path = store_dir / MANIFEST_NAME
    try:
        unchanged = not units and read_json(manifest_path) == manifest
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:
        # The store is not valid again until the manifest is rewritten at the very end.
        manifest_path.unlink(missing_ok=True)
        for seq, kind in units:
            (store_dir / shard_json(seq, kind)).unlink(missing_ok=True)
        _remove_stale_files(store_dir, keep)
        check_free_space(store_dir, _estimate_bytes(units, width, height))

    _run(store_dir, units, (width, height), workers, progress, device)
    frames = sum(len(recs) for seq, recs in groups.items() if any(s == seq for s, _ in units))
    for unit in units.values():
        bad_frames.extend(unit.bad)
    if not unchanged:
        write_json_atomic(manifest_path, manifest)
    seconds = time.perf_counter() - t0
    built_seqs = {seq for seq, _ in units}
    return StoreReport(
        built_shards=len(built_seqs),
        reused_shards=len(groups) - len(built_seqs),
        frames_written=frames,
        bad_frames=sorted(set(bad_frames)),
        seconds=seconds,
        frames_per_s=frames / seconds if seconds > 0 else 0.0,
        bytes_written=sum(
            u.written if not u.codec.fixed_size else len(u.records) * width * height * 3
            for u in units.values()
        ),
        codecs={kind: str(codec) for kind, codec in codecs.items()},
    )
