"""BatchLoader: targets, epoch coverage, determinism, DDP shards, worker processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import BatchLoader, DeviceBatch, rank_indices
from fredfusion.data.store import FrameRecord, build_store

SRC_W, SRC_H = 64, 36
W, H = 32, 18
N = 10


def _boxes(iid: int) -> list[list[float]]:
    """COCO boxes of image ``iid`` (iid % 3 of them), source pixels."""
    return [[2.0 * iid + k, 4.0 * k, 6.0, 8.0] for k in range(iid % 3)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N dual images; frame pixel values encode the image id (rgb = id, event = 100 + id)."""
    root = tmp_path_factory.mktemp("prepared")
    fred = root / "fred"
    fred.mkdir()
    images, annotations, records = [], [], []
    for iid in range(N):
        seq = iid // 6
        for name, value in ((f"r{iid}.png", iid), (f"e{iid}.png", 100 + iid)):
            cv2.imwrite(str(fred / name), np.full((SRC_H, SRC_W, 3), value, np.uint8))
        images.append(
            {
                "id": iid,
                "file_name": f"r{iid}.png",
                "width": SRC_W,
                "height": SRC_H,
                "sequence_id": seq,
                "rgb_file_name": f"r{iid}.png",
                "event_file_name": f"e{iid}.png",
                "time_diff_ms": 1.0,
                "pair_status": "dual",
            }
        )
        annotations += [{"image_id": iid, "bbox": b, "category_id": 1} for b in _boxes(iid)]
        records.append(FrameRecord(iid, seq, fred / f"r{iid}.png", fred / f"e{iid}.png", (SRC_W, SRC_H)))
    coco = {
        "info": {"fred_root": str(fred), "store_width": W, "store_height": H},
        "images": images,
        "annotations": annotations,
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    build_store(root / "store", records, W, H, progress=False)
    return root


def _order(loader: BatchLoader) -> list[list[int]]:
    return [b.ids.tolist() for b in loader]


def test_batches_frames_and_targets(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train")
    loader = BatchLoader(ds, batch_size=4, drop_last=False, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert [len(b.ids) for b in batches] == [4, 4, 2]
    for b in batches:
        assert isinstance(b, DeviceBatch) and b.wait_s >= 0
        assert b.ids.dtype == torch.int64
        assert b.rgb is not None and b.event is not None
        assert b.rgb.shape == (len(b.ids), 3, H, W) and b.rgb.dtype == torch.uint8
        assert b.rgb.is_contiguous(memory_format=torch.channels_last)
        for j, iid in enumerate(b.ids.tolist()):
            assert (b.rgb[j] == iid).all() and (b.event[j] == 100 + iid).all()
        expected = [
            [j, 0, x / 2, y / 2, (x + w) / 2, (y + h) / 2]
            for j, iid in enumerate(b.ids.tolist())
            for x, y, w, h in _boxes(iid)
        ]
        assert b.targets.dtype == torch.float32 and b.targets.shape == (len(expected), 6)
        assert torch.equal(b.targets, torch.tensor(expected, dtype=torch.float32).reshape(-1, 6))


def test_epoch_coverage_and_determinism(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train")
    loader = BatchLoader(ds, batch_size=3, drop_last=False, seed=1)
    epoch0 = _order(loader)
    assert sorted(i for b in epoch0 for i in b) == list(range(N))
    assert _order(loader) == epoch0
    assert _order(BatchLoader(ds, batch_size=3, drop_last=False, seed=1)) == epoch0
    loader.set_epoch(1)
    epoch1 = _order(loader)
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(N))
    loader.set_epoch(0)
    assert _order(loader) == epoch0
    assert _order(BatchLoader(ds, batch_size=3, drop_last=False, seed=2)) != epoch0
    assert _order(BatchLoader(ds, batch_size=4, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    dropped = BatchLoader(ds, batch_size=3, seed=1)
    assert len(dropped) == 3 and all(len(b) == 3 for b in _order(dropped))
    assert len(BatchLoader(ds, batch_size=3, max_batches=2)) == 2
    assert len(list(BatchLoader(ds, batch_size=3, max_batches=2))) == 2


@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_shards_are_disjoint_and_equal(prepared: Path, drop_last: bool) -> None:
    ds = PreparedDataset(prepared, "train")
    world = 3
    loaders = [
        BatchLoader(ds, batch_size=2, drop_last=drop_last, seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    for ld in loaders:
        ld.set_epoch(2)
    per_rank = [[i for b in _order(ld) for i in b] for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1
    assert len({len(ids) for ids in per_rank}) == 1
    if drop_last:
        assert len(loaders[0]) == 1 and len(per_rank[0]) == 2
        flat = [i for ids in per_rank for i in ids]
        assert len(set(flat)) == len(flat) == 6
    else:
        assert len(loaders[0]) == 2 and len(per_rank[0]) == 4
        assert set().union(*map(set, per_rank)) == set(range(N))
        assert sum(map(len, per_rank)) == 12  # 2 padded repeats


def test_rank_indices_hand_computed() -> None:
    kw = dict(shuffle=False, batch_size=2, world_size=2)
    assert rank_indices(5, 0, 0, drop_last=False, rank=0, **kw).tolist() == [0, 2, 4]
    assert rank_indices(5, 0, 0, drop_last=False, rank=1, **kw).tolist() == [1, 3, 0]
    assert rank_indices(9, 0, 0, drop_last=True, rank=1, **kw).tolist() == [1, 3, 5, 7]
    perm = np.random.default_rng(np.random.SeedSequence([7, 4])).permutation(6)
    assert rank_indices(6, 7, 4).tolist() == perm.tolist()


def test_workers_match_in_process(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train", modality="event")
    ref = BatchLoader(ds, batch_size=3, drop_last=False, seed=9)
    par = BatchLoader(ds, batch_size=3, drop_last=False, seed=9, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        par.set_epoch(epoch)
        a, b = list(ref), list(par)
        assert [x.ids.tolist() for x in a] == [x.ids.tolist() for x in b]
        for x, y in zip(a, b):
            assert x.rgb is None and y.rgb is None
            assert torch.equal(x.event, y.event) and torch.equal(x.targets, y.targets)


def test_bad_arguments(prepared: Path) -> None:
    ds = PreparedDataset(prepared, "train")
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, batch_size=2, rank=2, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_arrive_marked_with_their_batch(
    prepared: Path, tmp_path: Path, workers: int
) -> None:
    root = tmp_path / "prepared"
    shutil.copytree(prepared, root)
    shard = root / "store" / "seq_1.event.u8"  # images 6..9, damaged after prepare
    shard.write_bytes(b"")
    ds = PreparedDataset(root, "train", skip_bad=True)
    loader = BatchLoader(ds, batch_size=4, drop_last=False, seed=3, num_workers=workers)
    seen_bad = []
    for b in loader:
        ids = b.ids.tolist()
        assert b.bad.dtype == torch.bool and b.bad.tolist() == [i >= 6 for i in ids]
        assert [p[0] for p in b.problems] == [i for i in ids if i >= 6]
        assert all(p[1] == str(shard) and p[2].startswith("0 bytes, expected") for p in b.problems)
        for j, iid in enumerate(ids):
            value = 0 if iid >= 6 else iid
            assert (b.rgb[j] == value).all() and (b.event[j] == (0 if iid >= 6 else 100 + iid)).all()
        expected = [
            [j, 0, x / 2, y / 2, (x + w) / 2, (y + h) / 2]
            for j, iid in enumerate(ids)
            if iid < 6
            for x, y, w, h in _boxes(iid)
        ]
        assert torch.equal(b.targets, torch.tensor(expected, dtype=torch.float32).reshape(-1, 6))
        seen_bad += [i for i in ids if i >= 6]
    assert sorted(seen_bad) == [6, 7, 8, 9]
    with pytest.raises(OSError, match=r"seq_1\.event\.u8: 0 bytes"):
        list(BatchLoader(PreparedDataset(root, "train"), batch_size=N, drop_last=False))


def _jpeg_store(prepared: Path, root: Path) -> PreparedDataset:
    """A copy of ``prepared`` whose store keeps RGB as JPEG and events as zstd."""
    from fredfusion.data.store import parse_codecs

    shutil.copytree(prepared / "annotations", root / "annotations")
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    fred = Path(coco["info"]["fred_root"])
    records = [
        FrameRecord(
            im["id"],
            im["sequence_id"],
            fred / im["rgb_file_name"],
            fred / im["event_file_name"],
            (SRC_W, SRC_H),
        )
        for im in coco["images"]
    ]
    build_store(root / "store", records, W, H, progress=False, codecs=parse_codecs("auto"))
    return PreparedDataset(root, "train", skip_bad=True)


def test_device_decode_equals_worker_decode(prepared: Path, tmp_path: Path) -> None:
    """The GPU path (checked JPEG bytes decoded in one batched call) run on the CPU gives the same
    batches as the workers' decoding, bad frames included; with TorchCodec and with torchvision."""
    from fredfusion.data import device_decode

    ds = _jpeg_store(prepared, tmp_path / "jpeg")
    assert ds.device_decodable() == ("rgb",)
    meta = json.loads((tmp_path / "jpeg" / "store" / "seq_0.rgb.json").read_text())
    data = bytearray((tmp_path / "jpeg" / "store" / meta["file"]).read_bytes())
    data[meta["offsets"][2] + meta["sizes"][2] // 2] ^= 0x10  # image 2: a flipped bit
    (tmp_path / "jpeg" / "store" / meta["file"]).write_bytes(bytes(data))
    ds = PreparedDataset(tmp_path / "jpeg", "train", skip_bad=True)
    workers = list(BatchLoader(ds, batch_size=4, drop_last=False, seed=5, decode="workers"))
    for name, decoder in (
        ("torchcodec", device_decode.torchcodec_decoder),
        ("torchvision", device_decode.torchvision_decoder),
    ):
        device_decode.jpeg_decoder.cache_clear()
        original = device_decode.jpeg_decoder
        device_decode.jpeg_decoder = lambda decoder=decoder, name=name: (name, decoder())  # type: ignore[assignment]
        try:
            on_device = list(BatchLoader(ds, batch_size=4, drop_last=False, seed=5, decode="device"))
        finally:
            device_decode.jpeg_decoder = original
        for a, b in zip(workers, on_device, strict=True):
            assert torch.equal(a.ids, b.ids) and torch.equal(a.bad, b.bad), name
            assert a.problems == b.problems and torch.equal(a.targets, b.targets)
            assert torch.equal(a.rgb.contiguous(), b.rgb.contiguous()), name
            assert torch.equal(a.event, b.event)
    bad = [p for batch in workers for p in batch.problems]
    assert [(p[0], p[2]) for p in bad] == [(2, "corrupt jpeg frame 2 (CRC-32 mismatch)")]
    with pytest.raises(ValueError, match="decode must be one of"):
        BatchLoader(ds, batch_size=2, decode="gpu")
