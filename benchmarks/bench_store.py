"""Frame store throughput: build rate, random-read rate and bytes per pair of a prepared folder.

    python benchmarks/bench_store.py --data PREPARED_DIR [--batch 64] [--workers N]
    python benchmarks/bench_store.py --data /tmp/fake --make-fake 2000   # generate a fake folder first

The build rate is measured by rebuilding up to --build-frames images of the folder's COCO files
into a temporary directory (decode + resize + write). Read rates use random ids, batch --batch:
FrameStore.read (one gather), PreparedDataset.load, and BatchLoader with --workers processes
to --device.
Reads of a store smaller than RAM come from the page cache after the first touch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import BatchLoader
from fredfusion.data.store import FrameRecord, FrameStore, build_store, parse_codecs


def _records(root: Path, limit: int) -> tuple[list[FrameRecord], int, int]:
    """Records of all split files of ``root`` (at most ``limit``) and the store size."""
    records: list[FrameRecord] = []
    size = (640, 360)
    for path in sorted((root / "annotations").glob("instances_*.json")):
        coco = json.loads(path.read_text())
        info = coco.get("info") or {}
        fred = Path(info["fred_root"])
        size = (int(info.get("store_width", 640)), int(info.get("store_height", 360)))
        for img in coco["images"]:
            rgb, event = img.get("rgb_file_name"), img.get("event_file_name")
            records.append(
                FrameRecord(
                    int(img["id"]),
                    int(img["sequence_id"]),
                    fred / rgb if rgb else None,
                    fred / event if event else None,
                    (int(img["width"]), int(img["height"])),
                )
            )
    if len(records) > limit:
        pick = np.linspace(0, len(records) - 1, limit).round().astype(int)
        records = [records[i] for i in np.unique(pick)]
    return records, size[0], size[1]


def make_fake(
    root: Path, n: int, unique: int, workers: int, codec: str = "auto", width: int = 640, height: int = 360
) -> None:
    """Write a fake prepared folder: FRED-like 1280x720 sources, COCO train split, frame store."""
    fred = root / "fred"
    (fred / "src").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:720, 0:1280]
    for k in range(unique):
        sky = np.stack([(xx + 3 * k) % 256, (yy + 5 * k) % 256, np.full_like(xx, (40 * k) % 256)], -1)
        rgb = np.clip(sky + rng.normal(0, 6, sky.shape), 0, 255).astype(np.uint8)
        cv2.rectangle(rgb, (100 + k, 200), (160 + k, 240), (20, 20, 20), -1)
        cv2.imwrite(str(fred / "src" / f"rgb_{k}.jpg"), rgb, [cv2.IMWRITE_JPEG_QUALITY, 90])
        event = np.zeros((720, 1280, 3), np.uint8)
        pts = rng.integers(0, [720, 1280], size=(20_000, 2))
        event[pts[:, 0], pts[:, 1]] = rng.choice([[255, 255, 255], [255, 0, 0], [0, 0, 255]], size=len(pts))
        cv2.imwrite(str(fred / "src" / f"event_{k}.png"), event)
    images, annotations, records = [], [], []
    for iid in range(n):
        seq, k = iid // 200, iid % unique
        rgb, event = f"src/rgb_{k}.jpg", f"src/event_{k}.png"
        images.append(
            {
                "id": iid,
                "file_name": rgb,
                "width": 1280,
                "height": 720,
                "sequence_id": seq,
                "frame_index": iid % 200,
                "time_s": (iid % 200) / 30,
                "rgb_file_name": rgb,
                "event_file_name": event,
                "time_diff_ms": 1.0,
                "pair_status": "dual",
            }
        )
        annotations.append(
            {"id": iid, "image_id": iid, "bbox": [100 + k, 200, 60, 40], "category_id": 1, "area": 2400}
        )
        records.append(FrameRecord(iid, seq, fred / rgb, fred / event, (1280, 720)))
    coco = {
        "info": {"fred_root": str(fred), "store_width": width, "store_height": height},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "drone"}],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    report = build_store(root / "store", records, width, height, workers=workers, codecs=parse_codecs(codec))
    print(f"fake folder {root}: {n} pairs, store built at {report.frames_per_s:.0f} pairs/s")


def _rate(fn, batches: int, batch: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # first touch
    t0 = time.perf_counter()
    for _ in range(batches):
        fn()
    return batches * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print one line per figure."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="prepared folder (annotations/ + store/)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument(
        "--build-frames", type=int, default=1000, help="images rebuilt for the build rate (0: skip)"
    )
    ap.add_argument("--device", default="cpu", help="BatchLoader target device (cpu, cuda)")
    ap.add_argument("--codec", default="auto", help="store codec of the fake folder and the build rate")
    ap.add_argument("--reads", type=int, default=50, help="random batches per read measurement")
    ap.add_argument(
        "--make-fake", type=int, default=0, metavar="N", help="first create a fake folder of N pairs"
    )
    ap.add_argument("--fake-unique", type=int, default=100, help="distinct source images of the fake folder")
    args = ap.parse_args(argv)

    if args.make_fake and not (args.data / "store" / "manifest.json").is_file():
        make_fake(args.data, args.make_fake, args.fake_unique, args.workers, args.codec)

    if args.build_frames > 0:
        records, w, h = _records(args.data, args.build_frames)
        with tempfile.TemporaryDirectory(dir=args.data) as tmp:
            report = build_store(
                Path(tmp) / "store",
                records,
                w,
                h,
                workers=args.workers,
                progress=False,
                codecs=parse_codecs(args.codec),
            )
        print(
            f"build: {report.frames_written} pairs at {w}x{h} with {args.workers} workers in "
            f"{report.seconds:.2f} s = {report.frames_per_s:.0f} pairs/s "
            f"({len(report.bad_frames)} bad frames)"
        )

    store = FrameStore(args.data / "store")
    ds = PreparedDataset(args.data, args.split)
    pair_bytes = sum(store.stored_bytes(kind) for kind in store.kinds)
    codecs = ", ".join(f"{k} {c}" for k, c in store.codecs.items())
    print(
        f"store: {len(store)} pairs at {store.width}x{store.height} ({codecs}), {pair_bytes:.0f} bytes per "
        f"pair stored, {len(store) * pair_bytes / 2**30:.2f} GiB"
    )
    rng = np.random.default_rng(0)

    def store_read() -> None:
        store.read(rng.choice(store.ids, args.batch))

    def dataset_load() -> None:
        ds.load(rng.choice(ds.ids, args.batch))

    for name, fn in (("FrameStore.read", store_read), ("PreparedDataset.load", dataset_load)):
        r = _rate(fn, args.reads, args.batch)
        print(f"random read {name}: {r:.0f} pairs/s ({r * pair_bytes / 2**30:.2f} GiB/s), batch {args.batch}")

    loader = BatchLoader(
        ds, args.batch, num_workers=args.workers, persistent_workers=args.workers > 0, device=args.device
    )
    n = min(len(loader), args.reads)
    for epoch in range(2):  # the first epoch includes starting the workers
        loader.set_epoch(epoch)
        t0, waited, count = time.perf_counter(), 0.0, 0
        for k, b in enumerate(loader):
            if b.rgb is not None and b.rgb.is_cuda:
                torch.cuda.synchronize()  # count the copy to the device
            waited += b.wait_s
            count += len(b.ids)
            if k + 1 >= n:
                break
        dt = time.perf_counter() - t0
        print(
            f"BatchLoader ({args.device}, {args.workers} workers, epoch {epoch}): {count / dt:.0f} pairs/s, "
            f"wait {waited / max(n, 1) * 1e3:.1f} ms/batch"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
