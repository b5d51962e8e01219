"""Batch loader: epoch permutation -> whole-batch gathers (worker processes) -> pinned -> device.

Each DataLoader item is a whole batch read from the store with one gather, so the workers do
no per-image Python work beyond building the target rows. The sampler yields (epoch, index)
keys and the workers derive the epoch's permutation from (seed, epoch) themselves, which keeps
persistent workers correct across ``set_epoch`` calls.

Images the dataset cannot read (``PreparedDataset(skip_bad=True)``: a frame store file damaged after
prepare, a corrupt source frame) arrive as zeros without boxes; each batch carries their mask
(``DeviceBatch.bad``, on the host) and descriptions (``DeviceBatch.problems``), so the counts cross
from the worker processes to the training loop with the batch and cost no device sync.

Where frames are decoded (``decode``): by default the store's JPEG frames of a batch bound for a GPU
cross the main process as their encoded bytes and are decoded there on the device in one batched
call, one batch ahead on the copy stream (``data.device_decode``); on a CPU, or with
``decode="workers"``, the loader workers decode into the batch buffers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.store import EncodedFrames
from fredfusion.spec import frames_for

_DEVICE_KEYS = ("rgb", "event", "targets", "present")
DECODE_CHOICES = ("auto", "device", "workers")


@dataclass
class DeviceBatch:
    """A batch on the device. Images are (B, 3, H, W) uint8 views with channels-last strides.

    ``ids`` and ``bad`` stay on the host: ``bad`` (B,) bool marks images that could not be read
    (zeros, no target rows); ``problems`` holds (image id, file, reason) for each of them.
    ``present`` (B, 2) bool, with the images: whether each has its RGB and its event frame (False for
    a frame the image lacks, one its modality does not read, and both of a bad image); None: all.
    """

    ids: torch.Tensor
    rgb: torch.Tensor | None
    event: torch.Tensor | None
    targets: torch.Tensor
    wait_s: float
    bad: torch.Tensor | None = None
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    present: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bad is None:
            self.bad = torch.zeros(len(self.ids), dtype=torch.bool)


def rank_indices(
    n: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """Positions (into the dataset) this rank visits in ``epoch``, in visiting order.

    All ranks share one permutation drawn from (seed, epoch). drop_last: the permutation is cut
    to a multiple of batch_size * world_size and ranks take disjoint interleaved slices. Else the
    permutation is padded by wrapping around to a multiple of world_size (as DistributedSampler
    does), so ranks get equally many items; with world_size 1 there is no padding.
    """
    if shuffle:
        perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
    else:
        perm = np.arange(n, dtype=np.int64)
    if drop_last:
        per_rank = (n // (batch_size * world_size)) * batch_size
        perm = perm[: per_rank * world_size]
    else:
        per_rank = math.ceil(n / world_size) if n else 0
        pad = per_rank * world_size - n
        if pad:
            perm = np.concatenate([perm, np.resize(perm, pad)])
    return perm[rank::world_size].astype(np.int64)


class _EpochSampler(Sampler):
    """Yields (epoch, batch_index) keys for the current epoch."""

    def __init__(self, num_batches: int) -> None:
        self.epoch = 0
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in range(self.num_batches)])

    def __len__(self) -> int:
        return self.num_batches


class _BatchSource(Dataset):
    """Map-style dataset whose items are whole batches, keyed by (epoch, batch_index)."""

    def __init__(self, loader: BatchLoader) -> None:
        self.dataset = loader.dataset
        self.encoded = loader.device_kinds
        self.modalities = tuple(m for m in frames_for(loader.dataset.modality) if m not in self.encoded)
        self.batch_size = loader.batch_size
        self.pin = loader.device.type == "cuda"
        self.params = dict(
            seed=loader.seed,
            shuffle=loader.shuffle,
            drop_last=loader.drop_last,
            batch_size=loader.batch_size,
            rank=loader.rank,
            world_size=loader.world_size,
        )
        self._epoch: int | None = None
        self._order: np.ndarray = np.zeros(0, np.int64)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if self._epoch != epoch:
            self._order = rank_indices(len(self.dataset), epoch=epoch, **self.params)
            self._epoch = epoch
        pos = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        ids = self.dataset.ids[pos]
        h, w = self.dataset.store_hw
        frames = {m: _host_buffer((len(ids), h, w, 3), self.pin) for m in self.modalities}
        out = {m: t.numpy() for m, t in frames.items()}
        if self.encoded:
            fb = self.dataset.load(ids, (*self.modalities, *self.encoded), out=out, encoded=self.encoded)
        else:
            fb = self.dataset.load(ids, self.modalities, out=out)
        counts = [len(b) for b in fb.boxes]
        targets = np.zeros((sum(counts), 6), dtype=np.float32)
        if targets.shape[0]:
            targets[:, 0] = np.repeat(np.arange(len(ids), dtype=np.float32), counts)
            targets[:, 2:] = np.concatenate(fb.boxes)
        item: dict[str, Any] = {
            "ids": torch.from_numpy(ids),
            "targets": torch.from_numpy(targets),
            "bad": torch.from_numpy(np.asarray(fb.bad, dtype=bool)),
            "present": torch.from_numpy(np.stack([fb.has_rgb, fb.has_event], 1).astype(bool)),
            "problems": [list(p) for p in fb.problems],
        }
        item.update(frames)
        for kind, enc in fb.encoded.items():
            item[f"{kind}_encoded"] = (torch.from_numpy(enc.data), torch.from_numpy(enc.sizes))
        return item


def _host_buffer(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """uint8 host tensor the store reads into: in shared memory inside a DataLoader worker (so
    handing it to the main process copies nothing), pinned in the main process when batches go
    to CUDA (so pin_memory copies nothing), plain otherwise."""
    nbytes = math.prod(shape)
    if get_worker_info() is not None:
        try:
            storage = torch.UntypedStorage._new_shared(nbytes)
        except (AttributeError, RuntimeError):
            return torch.empty(shape, dtype=torch.uint8).share_memory_()
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    return torch.empty(shape, dtype=torch.uint8, pin_memory=pin)


def _identity(item: Any) -> Any:
    return item


class BatchLoader:
    """Iterate a PreparedDataset as DeviceBatch objects (see module docstring).

    Call ``set_epoch`` before each epoch: the order is a function of (seed, epoch) only.
    With world_size > 1 each rank sees a disjoint part of the epoch's permutation and all ranks
    get the same number of batches. On CUDA the host-to-device copy runs on a side stream one
    batch ahead. Nothing here synchronizes the host with the device.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        persistent_workers: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
        decode: str = "auto",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers and num_workers > 0
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_batches = max_batches
        self.device_kinds = self._device_kinds(decode)
        self.epoch = 0
        self._sampler = _EpochSampler(len(self))
        self._loader: DataLoader | None = None

    def _device_kinds(self, decode: str) -> tuple[str, ...]:
        """The frame kinds decoded on the device: ``auto`` decodes the store's JPEG frames on a GPU and
        everything in the loader workers on a CPU; ``device`` / ``workers`` force one place."""
        if decode not in DECODE_CHOICES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
        if decode == "workers" or (decode == "auto" and self.device.type != "cuda"):
            return ()
        return self.dataset.device_decodable()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (seed, epoch) permutation the next iteration uses."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self._sampler.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            per_rank = (n // (self.batch_size * self.world_size)) * self.batch_size
            batches = per_rank // self.batch_size
        else:
            per_rank = math.ceil(n / self.world_size) if n else 0
            batches = math.ceil(per_rank / self.batch_size)
        return batches if self.max_batches is None else min(batches, max(self.max_batches, 0))

    def _data_loader(self) -> DataLoader:
        if self._loader is None:
            extra: dict[str, Any] = {}
            if self.num_workers > 0:
                extra = {
                    "prefetch_factor": self.prefetch_factor,
                    "persistent_workers": self.persistent_workers,
                }
            pin = self.device.type == "cuda"
            self._loader = DataLoader(
                _BatchSource(self),
                batch_size=None,
                sampler=self._sampler,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=pin,
                **extra,
            )
        return self._loader

    def __iter__(self) -> Iterator[DeviceBatch]:
        it = iter(self._data_loader())
        if self.device.type == "cuda":
            yield from self._iter_cuda(it)
            return
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            wait_s = time.perf_counter() - t0
            if item is None:
                return
            yield self._to_batch(item, wait_s)

    def _decode(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The encoded frame kinds of ``item`` decoded on the device, ``(B, 3, H, W)`` uint8."""
        from fredfusion.data.device_decode import decode_frames

        out = {}
        for kind in self.device_kinds:
            data, sizes = item[f"{kind}_encoded"]
            frames = EncodedFrames(self.dataset.store.codecs[kind], data, np.zeros(0), sizes.numpy())
            out[kind] = decode_frames(frames, self.dataset.store_hw, self.device)
        return out

    def _to_batch(
        self, item: dict[str, Any], wait_s: float, decoded: dict[str, torch.Tensor] | None = None
    ) -> DeviceBatch:
        def nchw(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.permute(0, 3, 1, 2)

        decoded = decoded if decoded is not None else (self._decode(item) if self.device_kinds else {})
        return DeviceBatch(
            ids=item["ids"],
            rgb=decoded["rgb"] if "rgb" in decoded else nchw(item.get("rgb")),
            event=decoded["event"] if "event" in decoded else nchw(item.get("event")),
            targets=item["targets"],
            wait_s=wait_s,
            bad=item.get("bad"),
            problems=[(int(i), str(f), str(r)) for i, f, r in item.get("problems", [])],
            present=item.get("present"),
        )

    def _iter_cuda(self, it: Iterator[dict[str, Any]]) -> Iterator[DeviceBatch]:
        device = self.device
        stream = torch.cuda.Stream(device)

        def fetch() -> tuple[dict[str, Any], float] | None:
            t0 = time.perf_counter()
            item = next(it, None)
            wait_s = time.perf_counter() - t0
            if item is None:
                return None
            with torch.cuda.stream(stream):
                moved = {
                    k: (v.to(device, non_blocking=True) if k in _DEVICE_KEYS else v) for k, v in item.items()
                }
                decoded = self._decode(item) if self.device_kinds else {}
            return moved, decoded, wait_s

        nxt = fetch()
        while nxt is not None:
            cur, decoded, wait_s = nxt
            main = torch.cuda.current_stream(device)
            main.wait_stream(stream)
            for k, v in [*cur.items(), *decoded.items()]:
                if k in _DEVICE_KEYS:
                    v.record_stream(main)
            nxt = fetch()  # issue the next copy and decode before handing out this batch
            yield self._to_batch(cur, wait_s, decoded)
