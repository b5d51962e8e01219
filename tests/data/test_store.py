"""Frame store: build, reuse, rebuild, interruption, bad frames, read."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest

from fredfusion.data import store as store_mod
from fredfusion.data.frames import BadFrameError, read_frame
from fredfusion.data.store import FrameRecord, FrameStore, build_store

SRC_W, SRC_H = 128, 72
W, H = 64, 36


def _write(path: Path, seed: int) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (SRC_H, SRC_W, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def _reference(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    return cv2.cvtColor(cv2.resize(bgr, (W, H), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def _make_records(src: Path, seqs: dict[int, int], no_event: tuple[int, ...] = ()) -> list[FrameRecord]:
    """seqs: sequence id -> number of frames; image id = 100 * seq + k."""
    src.mkdir(parents=True, exist_ok=True)
    recs = []
    for seq, n in seqs.items():
        for k in range(n):
            iid = 100 * seq + k
            rgb = _write(src / f"{iid}.jpg", iid)
            event = None if iid in no_event else _write(src / f"{iid}.png", 10_000 + iid)
            recs.append(FrameRecord(iid, seq, rgb, event, (SRC_W, SRC_H)))
    return recs


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())}


def _all_frames(d: Path) -> dict[str, np.ndarray]:
    fs = FrameStore(d)
    return fs.read(np.sort(fs.ids))


def test_round_trip_equals_reference_resize(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 3, 7: 2}, no_event=(1,))
    report = build_store(tmp_path / "store", recs, W, H, progress=False)
    assert (report.built_shards, report.reused_shards, report.frames_written) == (2, 0, 5)
    assert report.bad_frames == []
    fs = FrameStore(tmp_path / "store")
    assert (fs.width, fs.height) == (W, H)
    assert sorted(fs.ids.tolist()) == [0, 1, 2, 700, 701]
    order = [701, 0, 2, 1, 700]
    out = fs.read(order)
    assert out["rgb"].shape == out["event"].shape == (5, H, W, 3)
    assert out["rgb"].dtype == np.uint8
    for row, iid in enumerate(order):
        assert np.array_equal(out["rgb"][row], _reference(tmp_path / "src" / f"{iid}.jpg"))
        if iid == 1:
            assert not out["event"][row].any()
        else:
            assert np.array_equal(out["event"][row], _reference(tmp_path / "src" / f"{iid}.png"))
    assert set(fs.read([2], ("event",))) == {"event"}
    buf = np.full((2, H, W, 3), 7, np.uint8)
    filled = fs.read([700, 0], ("rgb",), out={"rgb": buf})["rgb"]
    assert filled is buf and np.array_equal(buf, out["rgb"][[4, 1]])
    with pytest.raises(ValueError, match=r"out\['rgb'\] must be uint8"):
        fs.read([0], ("rgb",), out={"rgb": buf})
    assert 700 in fs and 3 not in fs
    assert (tmp_path / "store" / "seq_7.rgb.u8").stat().st_size == 2 * W * H * 3
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert (manifest["width"], manifest["height"]) == (W, H)
    assert [s["sequence_id"] for s in manifest["shards"]] == [0, 7]


def test_read_frame_same_size_and_orig_size(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.png", 3)
    full = read_frame(p, SRC_W, SRC_H, orig_size=(SRC_W, SRC_H))
    assert np.array_equal(full, cv2.imread(str(p))[:, :, ::-1])
    with pytest.raises(BadFrameError, match=r"wrong size 128x72 \(expected 1280x720\)"):
        read_frame(p, W, H, orig_size=(1280, 720))


def _bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected reason fragment)."""
    d.mkdir(parents=True, exist_ok=True)
    zero = d / "zero.jpg"
    zero.write_bytes(b"")
    full = _write(d / "full.jpg", 1).read_bytes()
    trunc = d / "trunc.jpg"
    trunc.write_bytes(full[: len(full) // 2])
    png = _write(d / "full.png", 2).read_bytes()
    trunc_png = d / "trunc.png"
    trunc_png.write_bytes(png[: len(png) // 2])
    text = d / "text.png"
    text.write_text("this is not an image\n")
    big = d / "big.jpg"
    cv2.imwrite(str(big), np.zeros((SRC_H * 2, SRC_W * 2, 3), np.uint8))
    deep = d / "deep.png"
    cv2.imwrite(str(deep), np.zeros((SRC_H, SRC_W, 3), np.uint16))
    return {
        "missing": (d / "missing.jpg", "missing file"),
        "zero": (zero, "zero-byte"),
        "trunc": (trunc, "truncated JPEG"),
        "trunc_png": (trunc_png, "truncated PNG"),
        "text": (text, "not an image"),
        "big": (big, "wrong size 256x144"),
        "deep": (deep, "unsupported pixel type uint16"),
        "dir": (d, "unreadable"),
    }


def test_read_frame_bad_inputs(tmp_path: Path) -> None:
    for name, (path, reason) in _bad_files(tmp_path / "bad").items():
        with pytest.raises(BadFrameError) as info:
            read_frame(path, W, H, orig_size=(SRC_W, SRC_H))
        assert info.value.path == path, name
        assert reason in info.value.reason, (name, info.value.reason)
        assert str(path) in str(info.value)


def test_gray_and_alpha_frames_become_rgb(tmp_path: Path) -> None:
    gray = np.tile(np.arange(SRC_W, dtype=np.uint8), (SRC_H, 1))
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    cv2.imwrite(str(tmp_path / "bgra.png"), np.dstack([gray, gray, gray, np.full_like(gray, 7)]))
    expected = cv2.resize(np.dstack([gray] * 3), (W, H), interpolation=cv2.INTER_AREA)
    for name in ("gray.png", "bgra.png"):
        np.testing.assert_array_equal(read_frame(tmp_path / name, W, H, orig_size=(SRC_W, SRC_H)), expected)


def test_bad_frames_reported_rows_zero(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path / "bad")
    good = _write(tmp_path / "good.png", 5)
    recs = [FrameRecord(0, 1, good, good, (SRC_W, SRC_H))]
    recs += [FrameRecord(i + 1, 1, path, good, (SRC_W, SRC_H)) for i, (path, _) in enumerate(bad.values())]
    report = build_store(tmp_path / "store", recs, W, H, progress=False)
    assert len(report.bad_frames) == len(bad)
    for (iid, path, reason), (exp_path, fragment) in zip(report.bad_frames, bad.values()):
        assert path == str(exp_path)
        assert fragment in reason
        assert iid == recs[[str(r.rgb_path) for r in recs].index(path)].image_id
    fs = FrameStore(tmp_path / "store")
    assert fs.bad_ids == set(range(1, len(bad) + 1))
    out = fs.read(list(range(len(bad) + 1)))
    assert np.array_equal(out["rgb"][0], _reference(good))
    assert not out["rgb"][1:].any()
    assert all(np.array_equal(e, _reference(good)) for e in out["event"])
    # a reused shard reports its bad frames again
    again = build_store(tmp_path / "store", recs, W, H, progress=False)
    assert again.reused_shards == 1 and again.bad_frames == report.bad_frames


def test_idempotent_rerun_rewrites_nothing(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3})
    build_store(tmp_path / "store", recs, W, H, progress=False)
    before = _mtimes(tmp_path / "store")
    report = build_store(tmp_path / "store", recs, W, H, progress=False)
    assert (report.built_shards, report.reused_shards, report.frames_written) == (0, 2, 0)
    assert _mtimes(tmp_path / "store") == before


def test_changed_sequence_rebuilds_only_its_shard(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3})
    build_store(tmp_path / "store", recs, W, H, progress=False)
    before = _mtimes(tmp_path / "store")
    changed = _write(tmp_path / "src" / "101.jpg", 999)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    report = build_store(tmp_path / "store", recs, W, H, progress=False)
    assert (report.built_shards, report.reused_shards, report.frames_written) == (1, 1, 3)
    after = _mtimes(tmp_path / "store")
    for name in ("seq_0.json", "seq_0.rgb.u8", "seq_0.event.u8"):
        assert after[name] == before[name]
    assert after["seq_1.json"] != before["seq_1.json"]
    assert np.array_equal(FrameStore(tmp_path / "store").read([101])["rgb"][0], _reference(changed))


def test_removed_sequence_is_deleted_and_size_change_rebuilds(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 2})
    build_store(tmp_path / "store", recs, W, H, progress=False)
    report = build_store(tmp_path / "store", [r for r in recs if r.sequence_id == 0], W, H, progress=False)
    assert (report.built_shards, report.reused_shards) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "manifest.json",
        "seq_0.event.u8",
        "seq_0.json",
        "seq_0.rgb.u8",
    ]
    assert sorted(FrameStore(tmp_path / "store").ids.tolist()) == [0, 1]
    report = build_store(tmp_path / "store", recs, 32, 18, progress=False)
    assert (report.built_shards, report.reused_shards) == (2, 0)
    with pytest.raises(ValueError, match="built at 32x18, expected 64x36"):
        FrameStore(tmp_path / "store", expect_wh=(W, H))


def test_interrupted_build_is_not_valid_and_rerun_completes(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3})
    build_store(tmp_path / "reference", recs, W, H, progress=False)
    reference = _all_frames(tmp_path / "reference")

    # leftovers of a build killed after the data of shard 1 was renamed but before its json
    d = tmp_path / "store"
    build_store(d, recs, W, H, progress=False)
    (d / "seq_1.json").unlink()
    (d / "manifest.json").unlink()
    (d / "seq_0.rgb.u8.tmp4242").write_bytes(b"\x01" * 100)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        FrameStore(d)
    report = build_store(d, recs, W, H, progress=False)
    assert (report.built_shards, report.reused_shards) == (1, 1)
    assert not list(d.glob("*.tmp*"))
    got = _all_frames(d)
    assert all(np.array_equal(got[m], reference[m]) for m in ("rgb", "event"))

    # an old manifest that lists a shard whose json is gone is not valid either
    build_store(d, recs, W, H, progress=False)
    (d / "seq_0.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"seq_0\.json is missing"):
        FrameStore(d)
    (d / "seq_0.json").write_text("{}")
    (d / "seq_0.rgb.u8").write_bytes(b"")
    with pytest.raises(ValueError, match="does not match"):
        FrameStore(d)


def _build_and_die(store_dir: str, recs: list[FrameRecord]) -> None:
    finish = store_mod._finish_shard

    def finish_then_kill(*args, **kwargs):  # type: ignore[no-untyped-def]
        finish(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    store_mod._finish_shard = finish_then_kill
    build_store(Path(store_dir), recs, W, H, progress=False)


def test_killed_build_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3, 2: 1})
    build_store(tmp_path / "reference", recs, W, H, progress=False)
    reference = _all_frames(tmp_path / "reference")
    proc = multiprocessing.get_context("fork").Process(
        target=_build_and_die, args=(str(tmp_path / "s"), recs)
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    with pytest.raises(FileNotFoundError, match="incomplete frame store"):
        FrameStore(tmp_path / "s")
    report = build_store(tmp_path / "s", recs, W, H, progress=False)
    assert (report.built_shards, report.reused_shards) == (2, 1)
    got = _all_frames(tmp_path / "s")
    assert all(np.array_equal(got[m], reference[m]) for m in ("rgb", "event"))


def test_parallel_build_equals_serial(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 40, 3: 5}, no_event=(2, 301))
    serial = build_store(tmp_path / "a", recs, W, H, workers=0, progress=False)
    parallel = build_store(tmp_path / "b", recs, W, H, workers=2, progress=False)
    assert serial.frames_written == parallel.frames_written == 45
    assert parallel.frames_per_s > 0
    a, b = _all_frames(tmp_path / "a"), _all_frames(tmp_path / "b")
    assert all(np.array_equal(a[m], b[m]) for m in ("rgb", "event"))


def test_read_errors_and_pickling(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="frame store not found"):
        FrameStore(tmp_path / "nothing")
    recs = _make_records(tmp_path / "src", {0: 2})
    with pytest.raises(ValueError, match="duplicate image id 1"):
        build_store(tmp_path / "store", [*recs, recs[1]], W, H, progress=False)
    build_store(tmp_path / "store", recs, W, H, progress=False)
    fs = FrameStore(tmp_path / "store")
    with pytest.raises(KeyError, match="image id 5 is not in frame store"):
        fs.read([0, 5])
    with pytest.raises(ValueError, match="unknown modality"):
        fs.read([0], ("depth",))
    assert fs.read([], ("rgb",))["rgb"].shape == (0, H, W, 3)
    first = fs.read([1, 0])
    clone = pickle.loads(pickle.dumps(fs))
    assert clone._maps == {}
    assert all(np.array_equal(clone.read([1, 0])[m], first[m]) for m in first)
    (tmp_path / "store" / "seq_0.event.u8").unlink()
    fresh = FrameStore.__new__(FrameStore)
    fresh.__setstate__(pickle.loads(pickle.dumps(fs)).__dict__)
    with pytest.raises(FileNotFoundError, match=r"frame store file missing: .*seq_0\.event\.u8"):
        fresh.read([0])


def test_damaged_shard_files_are_skipped_and_checked_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "store"
    build_store(d, _make_records(tmp_path / "src", {0: 2, 1: 2, 2: 2}), W, H, progress=False)
    reference = _all_frames(d)  # rows: ids 0, 1, 100, 101, 200, 201
    # damaged after prepare: seq 0 rgb truncated, seq 1 event replaced by a folder; seq 2 intact
    with open(d / "seq_0.rgb.u8", "r+b") as f:
        f.truncate(10)
    (d / "seq_1.event.u8").unlink()
    (d / "seq_1.event.u8").mkdir()
    fs = FrameStore(d)  # opening the store does not fail: the damage is per file
    expected = 2 * W * H * 3
    with pytest.raises(OSError, match=rf"seq_0\.rgb\.u8: 10 bytes, expected {expected}"):
        fs.read([0])
    with pytest.raises(OSError, match=r"seq_1\.event\.u8: unreadable \(Is a directory\)"):
        fs.read([200, 101])

    fstats = []
    real_fstat = os.fstat
    monkeypatch.setattr(store_mod.os, "fstat", lambda fd: fstats.append(fd) or real_fstat(fd))
    fs = FrameStore(d)
    ids = [200, 0, 101, 201]
    frames, bad, problems = fs.read_valid(ids)
    assert bad.tolist() == [False, True, True, False]
    assert problems == [
        (0, str(d / "seq_0.rgb.u8"), f"10 bytes, expected {expected} (truncated or rewritten after prepare)"),
        (101, str(d / "seq_1.event.u8"), "unreadable (Is a directory)"),
    ]
    for m in ("rgb", "event"):
        assert not frames[m][1:3].any()
        assert np.array_equal(frames[m][0], reference[m][4]) and np.array_equal(frames[m][3], reference[m][5])
    assert len(fstats) == 5  # one open + fstat per file (the folder fails at open)
    fs.read_valid(ids)
    assert len(fstats) == 5  # per file and process, not per read
    assert [p[0] for p in fs.damaged([0, 1, 100, 101, 200, 201])] == [0, 1, 100, 101]
    assert fs.damaged([200, 201], ("rgb",)) == []
    assert pickle.loads(pickle.dumps(fs))._problems == {}  # a worker process checks for itself

    # a file truncated while it is mapped: skipped at the next read (a copy would be SIGBUS)
    with open(d / "seq_2.rgb.u8", "r+b") as f:
        f.truncate(0)
    _, bad, problems = fs.read_valid([201, 200])
    assert bad.tolist() == [True, True]
    assert problems[0][1:] == (
        str(d / "seq_2.rgb.u8"),
        f"0 bytes, expected {expected} (changed during training)",
    )
    with pytest.raises(OSError, match=r"seq_2\.rgb\.u8"):
        fs.read([200])
