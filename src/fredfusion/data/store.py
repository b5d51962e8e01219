"""Compact uint8 frame store: frames decoded once, resized to training size, read by memmap.

Layout of a store folder::

    manifest.json           build parameters and the list of shards (written at the end of a build)
    seq_<id>.rgb.u8         raw uint8 (n, H, W, 3), RGB order, rows in the order of the shard ids
    seq_<id>.event.u8       raw uint8 (n, H, W, 3)
    seq_<id>.json           shard manifest: ids, bad frames, fingerprint (written last, atomically)

A shard is valid only when its json exists, its fingerprint matches the records and its data files
have the expected size. Data files are written under a temporary name and renamed before the json
is written, so an interrupted build never leaves a shard that looks valid, and a re-run only
builds what is missing or changed. One build at a time per store folder.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fredfusion.data.frames import BadFrameError, read_frame
from fredfusion.spec import FRAME_KINDS

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK_FRAMES = 32
_SHARD_FILE = re.compile(r"^seq_(-?\d+)\.(json|rgb\.u8|event\.u8)(\..*)?$")


@dataclass(frozen=True)
class FrameRecord:
    """One image of the store: its id, sequence and absolute source paths (None = no frame)."""

    image_id: int
    sequence_id: int
    rgb_path: Path | None
    event_path: Path | None
    orig_size: tuple[int, int] = (1280, 720)


@dataclass
class StoreReport:
    """What a build did. ``bad_frames`` also lists the bad frames of reused shards."""

    built_shards: int
    reused_shards: int
    frames_written: int
    bad_frames: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    frames_per_s: float = 0.0


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------


def _shard_names(sequence_id: int) -> dict[str, str]:
    return {
        "json": f"seq_{sequence_id}.json",
        "rgb": f"seq_{sequence_id}.rgb.u8",
        "event": f"seq_{sequence_id}.event.u8",
    }


def _stat(path: Path | None) -> list[Any]:
    if path is None:
        return [None, None, None]
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _fingerprint(records: Sequence[FrameRecord], width: int, height: int) -> str:
    """Hash of the build parameters and, per record, id, paths, sizes and mtimes."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, width, height]).encode())
    for r in records:
        row = [int(r.image_id), *_stat(r.rgb_path), *_stat(r.event_path), list(r.orig_size)]
        h.update(json.dumps(row).encode())
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _shard_is_valid(store_dir: Path, seq: int, n: int, frame_bytes: int, fingerprint: str) -> dict | None:
    """Return the shard json when the shard on disk matches ``fingerprint``, else None."""
    names = _shard_names(seq)
    try:
        meta = _read_json(store_dir / names["json"])
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint or meta.get("n") != n:
        return None
    for m in FRAME_KINDS:
        try:
            if os.path.getsize(store_dir / names[m]) != n * frame_bytes:
                return None
        except OSError:
            return None
    return meta


def _decode_into(task: tuple[Any, ...]) -> tuple[int, int, list[tuple[int, str, str]]]:
    """Decode a chunk of frames into the temporary data files of one shard (runs in workers)."""
    seq, tmp_paths, n_rows, width, height, rows = task
    maps = {
        m: np.memmap(tmp_paths[m], dtype=np.uint8, mode="r+", shape=(n_rows, height, width, 3))
        for m in FRAME_KINDS
    }
    bad: list[tuple[int, str, str]] = []
    for row, image_id, paths, orig_size in rows:
        for m in FRAME_KINDS:
            p = paths[m]
            if p is None:
                continue
            try:
                maps[m][row] = read_frame(Path(p), width, height, orig_size)
            except BadFrameError as e:
                bad.append((int(image_id), str(p), e.reason))
    for mm in maps.values():
        mm.flush()
    del maps
    return seq, len(rows), bad


def _worker_init() -> None:
    cv2.setNumThreads(1)


@dataclass
class _ShardJob:
    seq: int
    records: list[FrameRecord]
    fingerprint: str
    tmp_paths: dict[str, str]
    remaining: int
    bad: list[tuple[int, str, str]] = field(default_factory=list)


def _remove_stale_files(store_dir: Path, keep_seqs: set[int]) -> None:
    """Delete temp files of interrupted builds and the files of shards no longer wanted."""
    for p in store_dir.iterdir():
        if p.name.startswith(f"{MANIFEST_NAME}.tmp"):
            p.unlink(missing_ok=True)
            continue
        m = _SHARD_FILE.match(p.name)
        if m is None or not p.is_file():
            continue
        seq, temp_suffix = int(m.group(1)), m.group(3)
        if temp_suffix or seq not in keep_seqs:
            p.unlink(missing_ok=True)


def _group_records(records: Sequence[FrameRecord]) -> dict[int, list[FrameRecord]]:
    groups: dict[int, list[FrameRecord]] = {}
    seen: set[int] = set()
    for r in records:
        iid = int(r.image_id)
        if iid in seen:
            raise ValueError(f"duplicate image id {iid} in frame store records")
        seen.add(iid)
        groups.setdefault(int(r.sequence_id), []).append(r)
    return dict(sorted(groups.items()))


def _iter_tasks(jobs: list[_ShardJob], width: int, height: int) -> Iterator[tuple[Any, ...]]:
    for job in jobs:
        rows = [
            (
                i,
                int(r.image_id),
                {
                    "rgb": None if r.rgb_path is None else str(r.rgb_path),
                    "event": None if r.event_path is None else str(r.event_path),
                },
                tuple(r.orig_size) if r.orig_size is not None else None,
            )
            for i, r in enumerate(job.records)
        ]
        for s in range(0, len(rows), _CHUNK_FRAMES):
            yield (job.seq, job.tmp_paths, len(job.records), width, height, rows[s : s + _CHUNK_FRAMES])


def _finish_shard(store_dir: Path, job: _ShardJob, width: int, height: int) -> None:
    names = _shard_names(job.seq)
    for m in FRAME_KINDS:
        fd = os.open(job.tmp_paths[m], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(job.tmp_paths[m], store_dir / names[m])
    meta = {
        "format_version": FORMAT_VERSION,
        "sequence_id": job.seq,
        "width": width,
        "height": height,
        "n": len(job.records),
        "ids": [int(r.image_id) for r in job.records],
        "bad": [list(b) for b in sorted(job.bad)],
        "fingerprint": job.fingerprint,
    }
    _write_json_atomic(store_dir / names["json"], meta)


def build_store(
    store_dir: Path,
    records: Sequence[FrameRecord],
    width: int,
    height: int,
    workers: int = 0,
    progress: bool = True,
) -> StoreReport:
    """Build (or bring up to date) the frame store in ``store_dir`` from ``records``.

    One shard per sequence; shards whose fingerprint is unchanged are reused, changed or missing
    ones are rebuilt, shards of sequences absent from ``records`` are deleted. ``workers`` > 0
    decodes in that many processes. Bad frames are reported (rows stay zero), never fatal.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame store size must be positive, got {width}x{height}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    t0 = time.perf_counter()
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    groups = _group_records(records)
    frame_bytes = width * height * 3

    jobs: list[_ShardJob] = []
    bad_frames: list[tuple[int, str, str]] = []
    reused = 0
    for seq, recs in groups.items():
        fp = _fingerprint(recs, width, height)
        meta = _shard_is_valid(store_dir, seq, len(recs), frame_bytes, fp)
        if meta is not None:
            reused += 1
            bad_frames.extend((int(b[0]), str(b[1]), str(b[2])) for b in meta.get("bad", []))
            continue
        tmp = {m: str(store_dir / f"{_shard_names(seq)[m]}.tmp{os.getpid()}") for m in FRAME_KINDS}
        jobs.append(_ShardJob(seq, recs, fp, tmp, remaining=len(recs)))

    manifest = {
        "format_version": FORMAT_VERSION,
        "width": width,
        "height": height,
        "shards": [{"sequence_id": seq, "n": len(recs), **_shard_names(seq)} for seq, recs in groups.items()],
    }
    manifest_path = store_dir / MANIFEST_NAME
    try:
        unchanged = not jobs and _read_json(manifest_path) == manifest
    except (OSError, ValueError):
        unchanged = False

    if not unchanged:
        # The store is not valid again until the manifest is rewritten at the very end.
        manifest_path.unlink(missing_ok=True)
        for job in jobs:
            (store_dir / _shard_names(job.seq)["json"]).unlink(missing_ok=True)
        _remove_stale_files(store_dir, set(groups))
        for job in jobs:
            for m in FRAME_KINDS:
                with open(job.tmp_paths[m], "wb") as f:
                    f.truncate(len(job.records) * frame_bytes)

    frames_written = _run_jobs(store_dir, jobs, width, height, workers, progress)
    for job in jobs:
        bad_frames.extend(job.bad)

    if not unchanged:
        _write_json_atomic(manifest_path, manifest)
    seconds = time.perf_counter() - t0
    return StoreReport(
        built_shards=len(jobs),
        reused_shards=reused,
        frames_written=frames_written,
        bad_frames=sorted(bad_frames),
        seconds=seconds,
        frames_per_s=frames_written / seconds if seconds > 0 else 0.0,
    )


def _run_jobs(
    store_dir: Path, jobs: list[_ShardJob], width: int, height: int, workers: int, progress: bool
) -> int:
    """Decode all chunks of ``jobs``; finish each shard as soon as its last chunk is done."""
    from tqdm import tqdm

    total = sum(len(j.records) for j in jobs)
    if total == 0:
        return 0
    by_seq = {j.seq: j for j in jobs}
    written = 0
    bar = tqdm(total=total, unit="frame", desc="frame store", disable=not progress, dynamic_ncols=True)

    def done(result: tuple[int, int, list[tuple[int, str, str]]]) -> None:
        nonlocal written
        seq, n, bad = result
        job = by_seq[seq]
        job.bad.extend(bad)
        job.remaining -= n
        written += n
        bar.update(n)
        if job.remaining == 0:
            _finish_shard(store_dir, job, width, height)

    tasks: Iterable[tuple[Any, ...]] = _iter_tasks(jobs, width, height)
    try:
        if workers == 0:
            for task in tasks:
                done(_decode_into(task))
        else:
            # forkserver/spawn, never fork: a child forked from a parent whose OpenCV/torch thread pools
            # are running can deadlock (seen when prepare ran after synth in the same process)
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with ProcessPoolExecutor(
                max_workers=workers, initializer=_worker_init, mp_context=context
            ) as pool:
                pending: set[Future] = set()
                for task in tasks:
                    pending.add(pool.submit(_decode_into, task))
                    if len(pending) >= 4 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            done(fut.result())
                for fut in pending:
                    done(fut.result())
    finally:
        bar.close()
    return written


# ----------------------------------------------------------------------------------------------
# Read
# ----------------------------------------------------------------------------------------------


class FrameStore:
    """Random access to a built frame store (memmaps opened lazily, once per process).

    The manifests are checked when the store is opened; a data file is checked (exists, readable,
    size as in its manifest) once per process when first used, and stat'ed once per batch while it
    is mapped. ``read`` raises an OSError naming a damaged file; ``read_valid`` returns its images
    as zeros with a mask and the reasons; ``damaged`` lists them without reading.
    """

    def __init__(self, store_dir: Path, expect_wh: tuple[int, int] | None = None) -> None:
        """Open ``store_dir``; ``expect_wh`` = (width, height) the caller needs (checked)."""
        self.store_dir = Path(store_dir)
        manifest_path = self.store_dir / MANIFEST_NAME
        hint = "run `fredfusion prepare` to build it"
        if not self.store_dir.is_dir():
            raise FileNotFoundError(f"frame store not found: {self.store_dir} ({hint})")
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"incomplete frame store: {manifest_path} is missing (interrupted build?); "
                f"run `fredfusion prepare` again to finish it"
            )
        try:
            manifest = _read_json(manifest_path)
            version = manifest["format_version"]
            self.width = int(manifest["width"])
            self.height = int(manifest["height"])
            shards = list(manifest["shards"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"invalid frame store manifest {manifest_path}: {e}; {hint}") from None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"frame store {manifest_path} has format version {version}, this version reads "
                f"{FORMAT_VERSION}; {hint}"
            )
        if expect_wh is not None and (self.width, self.height) != tuple(expect_wh):
            raise ValueError(
                f"frame store {manifest_path} was built at {self.width}x{self.height}, expected "
                f"{expect_wh[0]}x{expect_wh[1]}; {hint} with the wanted size"
            )
        self._files: list[dict[str, Path]] = []
        self._counts: list[int] = []
        ids: list[np.ndarray] = []
        self.bad_ids: set[int] = set()
        self.bad_frames: list[tuple[int, str, str]] = []
        for k, shard in enumerate(shards):
            try:
                seq = int(shard["sequence_id"])
                n = int(shard["n"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"invalid shard entry {k} in {manifest_path}; {hint}") from None
            names = _shard_names(seq)
            json_path = self.store_dir / names["json"]
            try:
                meta = _read_json(json_path)
            except OSError:
                raise FileNotFoundError(
                    f"incomplete frame store: {json_path} is missing; run `fredfusion prepare` again"
                ) from None
            except ValueError as e:
                raise ValueError(f"invalid shard file {json_path}: {e}; {hint}") from None
            if (
                meta.get("n") != n
                or meta.get("width") != self.width
                or meta.get("height") != self.height
                or len(meta.get("ids", [])) != n
            ):
                raise ValueError(f"shard {json_path} does not match {manifest_path}; {hint}")
            # Data files are checked (size against the manifest) when first used, once per process:
            # a file damaged after prepare makes its images unreadable, not the whole store.
            files = {m: self.store_dir / names[m] for m in FRAME_KINDS}
            self._files.append(files)
            self._counts.append(n)
            ids.append(np.asarray(meta["ids"], dtype=np.int64))
            for b in meta.get("bad", []):
                self.bad_ids.add(int(b[0]))
                self.bad_frames.append((int(b[0]), str(b[1]), str(b[2])))
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        shard_of = np.repeat(np.arange(len(self._counts), dtype=np.int64), self._counts)
        row_of = np.concatenate([np.arange(n, dtype=np.int64) for n in self._counts]) if ids else shard_of
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[order]
        if len(self._sorted_ids) > 1 and (np.diff(self._sorted_ids) == 0).any():
            dup = int(self._sorted_ids[:-1][np.diff(self._sorted_ids) == 0][0])
            raise ValueError(f"frame store {self.store_dir} holds image id {dup} twice; {hint}")
        self._sorted_shard = shard_of[order]
        self._sorted_row = row_of[order]
        self._maps: dict[tuple[int, str], np.memmap] = {}
        self._problems: dict[tuple[int, str], str | None] = {}
        self._pid = os.getpid()

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
        """Bytes of one frame of one modality."""
        return self.width * self.height * 3

    def has(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` the store holds."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(self._sorted_ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        return self._sorted_ids[pos] == ids

    def _fresh_process(self) -> None:
        """Memmaps and file checks belong to one process (DataLoader workers start without them)."""
        if self._pid != os.getpid():
            self._maps = {}
            self._problems = {}
            self._pid = os.getpid()

    def _problem(self, shard: int, modality: str) -> str | None:
        """Why a shard data file cannot be read (missing, unreadable, size not the manifest's), else None.

        Checked once per process and file (one open + fstat), never per frame.
        """
        self._fresh_process()
        key = (shard, modality)
        if key in self._problems:
            return self._problems[key]
        expected = self._counts[shard] * self.bytes_per_frame
        try:
            with open(self._files[shard][modality], "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            reason: str | None = "missing file"
        except OSError as e:
            reason = f"unreadable ({e.strerror or type(e).__name__})"
        else:
            reason = None
            if size != expected:
                reason = f"{size} bytes, expected {expected} (truncated or rewritten after prepare)"
        self._problems[key] = reason
        return reason

    def _check(self, shard: int, modality: str) -> str | None:
        """``_problem``, plus one stat when the file is already mapped in this process: a file
        truncated under a live memmap would kill the reader with SIGBUS on the next copy, so a size
        change since the mapping marks the file damaged and drops the mapping instead. Called once
        per file and batch, not per frame."""
        reason = self._problem(shard, modality)
        key = (shard, modality)
        if reason is None and key in self._maps:
            try:
                size = os.stat(self._files[shard][modality]).st_size
            except FileNotFoundError:
                reason = "missing file (deleted during training)"
            except OSError as e:
                reason = f"unreadable ({e.strerror or type(e).__name__})"
            else:
                expected = self._counts[shard] * self.bytes_per_frame
                if size != expected:
                    reason = f"{size} bytes, expected {expected} (changed during training)"
            if reason is not None:
                self._problems[key] = reason
                del self._maps[key]
        return reason

    def _file_error(self, shard: int, modality: str, reason: str) -> OSError:
        path = self._files[shard][modality]
        if reason.startswith("missing file"):
            return FileNotFoundError(f"frame store file missing: {path}; run `fredfusion prepare` again")
        return OSError(f"frame store file {path}: {reason}; run `fredfusion prepare` again to rebuild it")

    def _map(self, shard: int, modality: str) -> np.memmap:
        self._fresh_process()
        key = (shard, modality)
        mm = self._maps.get(key)
        if mm is None:
            reason = self._problem(shard, modality)
            if reason is not None:
                raise self._file_error(shard, modality, reason)
            shape = (self._counts[shard], self.height, self.width, 3)
            try:
                mm = np.memmap(self._files[shard][modality], dtype=np.uint8, mode="r", shape=shape)
            except (OSError, ValueError) as e:  # changed between the check and the mapping
                self._problems[key] = f"cannot be mapped ({e})"
                raise self._file_error(shard, modality, self._problems[key]) from None
            self._maps[key] = mm
        return mm

    def damaged(
        self, ids: Sequence[int] | np.ndarray, modalities: tuple[str, ...] = FRAME_KINDS
    ) -> list[tuple[int, str, str]]:
        """(image id, file, reason) for each of ``ids`` whose shard data file is missing, unreadable or
        of the wrong size; one open + fstat per file, nothing is mapped or read."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._damaged_rows(ids, self._locate(ids)[0], modalities, open_maps=False)[1]

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each id; KeyError naming the first id the store does not hold."""
        found = self.has(ids)
        if not found.all():
            raise KeyError(f"image id {int(ids[~found][0])} is not in frame store {self.store_dir}")
        pos = np.searchsorted(self._sorted_ids, ids)
        return self._sorted_shard[pos], self._sorted_row[pos]

    def _damaged_rows(
        self, ids: np.ndarray, shards: np.ndarray, modalities: tuple[str, ...], open_maps: bool = True
    ) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
        bad = np.zeros(len(ids), dtype=bool)
        reasons: dict[int, tuple[str, str]] = {}
        for shard in np.unique(shards).tolist():
            for m in modalities:
                reason = self._check(shard, m)
                if reason is None and open_maps:
                    try:
                        self._map(shard, m)
                    except OSError:
                        reason = self._problems[(shard, m)]
                if reason is not None:
                    rows = shards == shard
                    for row in np.flatnonzero(rows & ~bad).tolist():
                        reasons[row] = (str(self._files[shard][m]), reason)
                    bad |= rows
        problems = [(int(ids[row]), *reasons[row]) for row in sorted(reasons)]
        return bad, problems

    def read(
        self,
        ids: Sequence[int] | np.ndarray,
        modalities: tuple[str, ...] = FRAME_KINDS,
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Gather frames: {modality: (B, H, W, 3) uint8}, rows in the order of ``ids``.

        ``out`` may give preallocated (B, H, W, 3) uint8 arrays (e.g. views of pinned or shared
        buffers) to fill instead of allocating; each frame is copied once, straight from the
        memmap into its row, shard by shard in file order. A shard file that is missing, unreadable
        or of the wrong size raises an OSError naming it (see ``read_valid`` to skip such images).
        """
        ids, result = self._buffers(ids, modalities, out)
        shards, rows = self._locate(ids)
        for shard in np.unique(shards).tolist():
            for m in result:
                reason = self._check(shard, m)
                if reason is not None:
                    raise self._file_error(shard, m, reason)
        self._gather(result, shards, rows, np.ones(len(ids), dtype=bool))
        return result

    def read_valid(
        self,
        ids: Sequence[int] | np.ndarray,
        modalities: tuple[str, ...] = FRAME_KINDS,
        out: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, str, str]]]:
        """Like ``read``, but images whose shard file cannot be read come back as zeros instead of
        raising: returns (frames, bad mask (B,), [(image id, file, reason) per bad image])."""
        ids, result = self._buffers(ids, modalities, out)
        shards, rows = self._locate(ids)
        bad, problems = self._damaged_rows(ids, shards, tuple(result))
        for buf in result.values():
            buf[bad] = 0
        self._gather(result, shards, rows, ~bad)
        return result, bad, problems

    def _buffers(
        self,
        ids: Sequence[int] | np.ndarray,
        modalities: tuple[str, ...],
        out: dict[str, np.ndarray] | None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        for m in modalities:
            if m not in FRAME_KINDS:
                raise ValueError(f"unknown modality {m!r}; expected one of {FRAME_KINDS}")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        shape = (len(ids), self.height, self.width, 3)
        result: dict[str, np.ndarray] = {}
        for m in modalities:
            buf = None if out is None else out.get(m)
            if buf is None:
                buf = np.empty(shape, dtype=np.uint8)
            elif buf.shape != shape or buf.dtype != np.uint8:
                raise ValueError(f"out[{m!r}] must be uint8 {shape}, got {buf.dtype} {buf.shape}")
            result[m] = buf
        return ids, result

    def _gather(
        self, result: dict[str, np.ndarray], shards: np.ndarray, rows: np.ndarray, keep: np.ndarray
    ) -> None:
        order = np.lexsort((rows, shards))
        order = order[keep[order]]
        for m, buf in result.items():
            maps: dict[int, np.memmap] = {}
            for k in order.tolist():
                shard = int(shards[k])
                mm = maps.get(shard)
                if mm is None:
                    mm = maps[shard] = self._map(shard, m)
                buf[k] = mm[rows[k]]
