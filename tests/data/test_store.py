"""Frame store: build, reuse, rebuild, interruption, bad and corrupt frames, read; for every codec."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import zstandard

from fredfusion.data.frames import BadFrameError, read_frame
from fredfusion.data.store import FrameRecord, FrameStore, StoreSpaceError, build_store, parse_codecs
from fredfusion.data.store import build as build_mod
from fredfusion.data.store import reader as reader_mod

SRC_W, SRC_H = 128, 72
W, H = 64, 36
CODECS = ("raw", "jpeg", "zstd")
EXT = {"raw": "u8", "jpeg": "jpg", "zstd": "zst"}


def _write(path: Path, seed: int) -> Path:
    """A smooth random image (JPEG-friendly, so the JPEG round trip stays close to the source)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (SRC_H // 8, SRC_W // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (SRC_W, SRC_H), interpolation=cv2.INTER_CUBIC)
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


def _build(d: Path, recs: list[FrameRecord], codec: str = "raw", **kwargs) -> object:
    return build_store(
        d, recs, kwargs.pop("w", W), kwargs.pop("h", H), progress=False, codecs=parse_codecs(codec), **kwargs
    )


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())}


def _all_frames(d: Path) -> dict[str, np.ndarray]:
    fs = FrameStore(d)
    return fs.read(np.sort(fs.ids))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _stored_blob(d: Path, seq: int, kind: str, row: int) -> bytes:
    meta = json.loads((d / f"seq_{seq}.{kind}.json").read_text())
    start, size = meta["offsets"][row], meta["sizes"][row]
    return (d / meta["file"]).read_bytes()[start : start + size]


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(tmp_path: Path, codec: str) -> None:
    recs = _make_records(tmp_path / "src", {0: 3, 7: 2}, no_event=(1,))
    d = tmp_path / "store"
    report = _build(d, recs, codec)
    assert (report.built_shards, report.reused_shards, report.frames_written) == (2, 0, 5)
    assert report.bad_frames == [] and report.bytes_written > 0
    fs = FrameStore(d)
    assert (fs.width, fs.height) == (W, H) and fs.kinds == ("rgb", "event")
    assert sorted(fs.ids.tolist()) == [0, 1, 2, 700, 701]
    order = [701, 0, 2, 1, 700]
    out = fs.read(order)
    assert out["rgb"].shape == out["event"].shape == (5, H, W, 3) and out["rgb"].dtype == np.uint8
    for row, iid in enumerate(order):
        for kind, suffix in (("rgb", "jpg"), ("event", "png")):
            got = out[kind][row]
            if kind == "event" and iid == 1:
                assert not got.any()  # no event frame: zeros
                continue
            ref = _reference(tmp_path / "src" / f"{iid}.{suffix}")
            if codec == "jpeg":
                # an independent decoder (OpenCV) of the stored bytes gives the same pixels
                seq, k = divmod(iid, 100)
                blob = np.frombuffer(_stored_blob(d, seq, kind, k), np.uint8)
                assert np.array_equal(
                    got, cv2.cvtColor(cv2.imdecode(blob, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                )
                assert _psnr(got, ref) > 25  # 4:2:0 chroma on random colours
            else:
                assert np.array_equal(got, ref)
    assert set(fs.read([2], ("event",))) == {"event"}
    buf = np.full((2, H, W, 3), 7, np.uint8)
    filled = fs.read([700, 0], ("rgb",), out={"rgb": buf})["rgb"]
    assert filled is buf and np.array_equal(buf, out["rgb"][[4, 1]])
    with pytest.raises(ValueError, match=r"out\['rgb'\] must be uint8"):
        fs.read([0], ("rgb",), out={"rgb": buf})
    assert 700 in fs and 3 not in fs
    size = (d / f"seq_7.rgb.{EXT[codec]}").stat().st_size
    assert size == 2 * W * H * 3 if codec == "raw" else size > 0
    manifest = json.loads((d / "manifest.json").read_text())
    assert (manifest["width"], manifest["height"], manifest["format_version"]) == (W, H, 2)
    assert manifest["codecs"]["rgb"]["name"] == codec
    assert [s["sequence_id"] for s in manifest["shards"]] == [0, 7]


def test_auto_codec_and_gray_event_frames_keep_one_channel(tmp_path: Path) -> None:
    gray = np.tile(np.arange(SRC_W, dtype=np.uint8), (SRC_H, 1))
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    rgb = _write(tmp_path / "rgb.jpg", 1)
    d = tmp_path / "store"
    build_store(
        d,
        [FrameRecord(0, 0, rgb, tmp_path / "gray.png", (SRC_W, SRC_H))],
        W,
        H,
        progress=False,
        codecs=parse_codecs("auto"),
    )
    fs = FrameStore(d)
    assert {k: str(c) for k, c in fs.codecs.items()} == {"rgb": "jpeg:90", "event": "zstd:3"}
    blob = _stored_blob(d, 0, "event", 0)
    assert len(zstandard.ZstdDecompressor().decompress(blob)) == W * H  # one channel on disk
    expected = cv2.resize(np.dstack([gray] * 3), (W, H), interpolation=cv2.INTER_AREA)
    assert np.array_equal(fs.read([0], ("event",))["event"][0], expected)


def test_parse_codecs() -> None:
    assert {k: str(c) for k, c in parse_codecs("auto").items()} == {"rgb": "jpeg:90", "event": "zstd:3"}
    assert {k: str(c) for k, c in parse_codecs("raw").items()} == {"rgb": "raw", "event": "raw"}
    assert {k: str(c) for k, c in parse_codecs("rgb=jpeg:95").items()} == {
        "rgb": "jpeg:95",
        "event": "zstd:3",
    }
    assert {k: str(c) for k, c in parse_codecs("rgb=raw,event=zstd:9").items()} == {
        "rgb": "raw",
        "event": "zstd:9",
    }
    for bad, fragment in (
        ("webp", "unknown codec 'webp'"),
        ("jpeg:101", "within"),
        ("depth=raw", "frame kind"),
    ):
        with pytest.raises(ValueError, match=fragment):
            parse_codecs(bad)


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


def test_read_frame_same_size_and_orig_size(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.jpg", 3)
    full = read_frame(p, SRC_W, SRC_H, orig_size=(SRC_W, SRC_H))
    assert np.array_equal(full, cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB))
    with pytest.raises(BadFrameError, match=r"wrong size 128x72 \(expected 1280x720\)"):
        read_frame(p, W, H, orig_size=(1280, 720))


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


@pytest.mark.parametrize("codec", CODECS)
def test_bad_frames_reported_rows_zero(tmp_path: Path, codec: str) -> None:
    bad = _bad_files(tmp_path / "bad")
    good = _write(tmp_path / "good.png", 5)
    recs = [FrameRecord(0, 1, good, good, (SRC_W, SRC_H))]
    recs += [FrameRecord(i + 1, 1, path, good, (SRC_W, SRC_H)) for i, (path, _) in enumerate(bad.values())]
    report = _build(tmp_path / "store", recs, codec)
    assert len(report.bad_frames) == len(bad)
    for (iid, path, reason), (exp_path, fragment) in zip(report.bad_frames, bad.values()):
        assert path == str(exp_path)
        assert fragment in reason
        assert iid == recs[[str(r.rgb_path) for r in recs].index(path)].image_id
    fs = FrameStore(tmp_path / "store")
    assert fs.bad_ids == set(range(1, len(bad) + 1))
    out = fs.read(list(range(len(bad) + 1)))
    assert not out["rgb"][1:].any()
    assert np.array_equal(out["event"][1], out["event"][0])
    # a reused shard reports its bad frames again
    again = _build(tmp_path / "store", recs, codec)
    assert again.reused_shards == 1 and again.bad_frames == report.bad_frames


def test_idempotent_rerun_rewrites_nothing(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3})
    _build(tmp_path / "store", recs, "auto")
    before = _mtimes(tmp_path / "store")
    report = _build(tmp_path / "store", recs, "auto")
    assert (report.built_shards, report.reused_shards, report.frames_written) == (0, 2, 0)
    assert _mtimes(tmp_path / "store") == before


def test_changed_sequence_rebuilds_only_its_shard(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3})
    _build(tmp_path / "store", recs, "auto")
    before = _mtimes(tmp_path / "store")
    changed = _write(tmp_path / "src" / "101.jpg", 999)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    report = _build(tmp_path / "store", recs, "auto")
    assert (report.built_shards, report.reused_shards, report.frames_written) == (1, 1, 3)
    after = _mtimes(tmp_path / "store")
    for name in ("seq_0.rgb.json", "seq_0.rgb.jpg", "seq_0.event.json", "seq_0.event.zst", "seq_1.event.zst"):
        assert after[name] == before[name], name
    assert after["seq_1.rgb.json"] != before["seq_1.rgb.json"]
    got = FrameStore(tmp_path / "store").read([101])["rgb"][0]
    assert _psnr(got, _reference(changed)) > 25


def test_changed_codec_rebuilds_only_its_kind(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3})
    d = tmp_path / "store"
    _build(d, recs, "raw")
    reference = _all_frames(d)
    before = _mtimes(d)
    report = _build(d, recs, "rgb=zstd,event=raw")
    assert report.frames_written == 5 and report.codecs == {"rgb": "zstd:3", "event": "raw"}
    after = _mtimes(d)
    for name in ("seq_0.event.json", "seq_0.event.u8", "seq_1.event.u8"):
        assert after[name] == before[name], name
    assert "seq_0.rgb.u8" not in after and "seq_0.rgb.zst" in after
    got = _all_frames(d)
    assert all(np.array_equal(got[k], reference[k]) for k in ("rgb", "event"))  # both lossless


def test_one_kind_only(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2})
    d = tmp_path / "store"
    build_store(d, recs, W, H, progress=False, codecs=parse_codecs("auto"), kinds=("rgb",))
    assert not list(d.glob("*event*"))
    fs = FrameStore(d)
    assert fs.kinds == ("rgb",) and fs.read([0, 1], ("rgb",))["rgb"].shape == (2, H, W, 3)
    with pytest.raises(ValueError, match="holds no event frames"):
        fs.read([0], ("event",))


def test_format_1_store_is_read(tmp_path: Path) -> None:
    """A raw store written by format 1 (one seq json for both raw files) keeps working."""
    _make_records(tmp_path / "src", {3: 2})
    d = tmp_path / "v1"
    d.mkdir()
    for kind, suffix in (("rgb", "jpg"), ("event", "png")):
        rows = np.stack([_reference(tmp_path / "src" / f"{300 + k}.{suffix}") for k in range(2)])
        rows.tofile(d / f"seq_3.{kind}.u8")
    meta = {"format_version": 1, "sequence_id": 3, "width": W, "height": H, "n": 2, "ids": [300, 301]}
    (d / "seq_3.json").write_text(json.dumps({**meta, "bad": [], "fingerprint": "x"}))
    manifest = {"format_version": 1, "width": W, "height": H, "shards": [{"sequence_id": 3, "n": 2}]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    fs = FrameStore(d)
    assert fs.kinds == ("rgb", "event") and str(fs.codecs["rgb"]) == "raw"
    got = fs.read([301, 300])
    assert np.array_equal(got["event"][0], _reference(tmp_path / "src" / "301.png"))
    assert np.array_equal(got["rgb"][1], _reference(tmp_path / "src" / "300.jpg"))


def test_removed_sequence_is_deleted_and_size_change_rebuilds(tmp_path: Path) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 2})
    _build(tmp_path / "store", recs, "auto")
    report = _build(tmp_path / "store", [r for r in recs if r.sequence_id == 0], "auto")
    assert (report.built_shards, report.reused_shards) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "manifest.json",
        "seq_0.event.json",
        "seq_0.event.zst",
        "seq_0.rgb.jpg",
        "seq_0.rgb.json",
    ]
    assert sorted(FrameStore(tmp_path / "store").ids.tolist()) == [0, 1]
    report = _build(tmp_path / "store", recs, "auto", w=32, h=18)
    assert (report.built_shards, report.reused_shards) == (2, 0)
    with pytest.raises(ValueError, match="built at 32x18, expected 64x36"):
        FrameStore(tmp_path / "store", expect_wh=(W, H))


@pytest.mark.parametrize("codec", CODECS)
def test_interrupted_build_is_not_valid_and_rerun_completes(tmp_path: Path, codec: str) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3})
    _build(tmp_path / "reference", recs, codec)
    reference = _all_frames(tmp_path / "reference")

    # leftovers of a build killed after the data of shard 1 was renamed but before its json
    d = tmp_path / "store"
    _build(d, recs, codec)
    (d / "seq_1.rgb.json").unlink()
    (d / "manifest.json").unlink()
    (d / f"seq_0.rgb.{EXT[codec]}.tmp4242").write_bytes(b"\x01" * 100)
    (d / ".seq_0.event.json.abc.tmp").write_text("{")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        FrameStore(d)
    report = _build(d, recs, codec)
    assert (report.built_shards, report.reused_shards) == (1, 1)
    assert not list(d.glob("*.tmp*"))
    got = _all_frames(d)
    assert all(np.array_equal(got[m], reference[m]) for m in ("rgb", "event"))

    # an old manifest that lists a shard whose json is gone is not valid either
    (d / "seq_0.event.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"seq_0\.event\.json is missing"):
        FrameStore(d)
    (d / "seq_0.event.json").write_text("{}")
    with pytest.raises(ValueError, match="does not match"):
        FrameStore(d)


def _build_and_die(store_dir: str, recs: list[FrameRecord], codec: str) -> None:
    finish = build_mod._Writer._finish

    def finish_then_kill(self, unit):  # type: ignore[no-untyped-def]
        finish(self, unit)
        os.kill(os.getpid(), signal.SIGKILL)

    build_mod._Writer._finish = finish_then_kill
    _build(Path(store_dir), recs, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_killed_build_then_rerun_equals_uninterrupted(tmp_path: Path, codec: str) -> None:
    recs = _make_records(tmp_path / "src", {0: 2, 1: 3, 2: 1})
    _build(tmp_path / "reference", recs, codec)
    reference = _all_frames(tmp_path / "reference")
    proc = multiprocessing.get_context("fork").Process(
        target=_build_and_die, args=(str(tmp_path / "s"), recs, codec)
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    with pytest.raises(FileNotFoundError, match="incomplete frame store"):
        FrameStore(tmp_path / "s")
    report = _build(tmp_path / "s", recs, codec)
    assert report.reused_shards == 0 and report.frames_written == 6  # one unit (of seq 0) was done
    assert report.built_shards == 3
    got = _all_frames(tmp_path / "s")
    assert all(np.array_equal(got[m], reference[m]) for m in ("rgb", "event"))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        p.name for p in (tmp_path / "reference").iterdir()
    )


@pytest.mark.parametrize("codec", CODECS)
def test_parallel_build_equals_serial(tmp_path: Path, codec: str) -> None:
    recs = _make_records(tmp_path / "src", {0: 40, 3: 5}, no_event=(2, 301))
    serial = _build(tmp_path / "a", recs, codec, workers=0)
    parallel = _build(tmp_path / "b", recs, codec, workers=2)
    assert serial.frames_written == parallel.frames_written == 45
    assert parallel.frames_per_s > 0
    a, b = _all_frames(tmp_path / "a"), _all_frames(tmp_path / "b")
    assert all(np.array_equal(a[m], b[m]) for m in ("rgb", "event"))


def test_free_space_is_checked_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = _make_records(tmp_path / "src", {0: 4})
    real = build_mod.shutil.disk_usage
    monkeypatch.setattr(build_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    d = tmp_path / "store"
    with pytest.raises(StoreSpaceError, match=r"needs about 0\.00 GB .* 0\.00 GB are free"):
        _build(d, recs, "raw")
    assert not list(d.iterdir())
    raw_need = 4 * W * H * 3 * 2
    monkeypatch.setattr(build_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=raw_need))
    with pytest.raises(StoreSpaceError):
        _build(d, recs, "raw")  # the margin is required too
    _build(d, recs, "auto")  # compressed frames fit in the same space
    assert FrameStore(d).read([0])["rgb"].any()


def test_read_errors_and_pickling(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="frame store not found"):
        FrameStore(tmp_path / "nothing")
    recs = _make_records(tmp_path / "src", {0: 2})
    with pytest.raises(ValueError, match="duplicate image id 1"):
        _build(tmp_path / "store", [*recs, recs[1]])
    _build(tmp_path / "store", recs, "auto")
    fs = FrameStore(tmp_path / "store")
    with pytest.raises(KeyError, match="image id 5 is not in frame store"):
        fs.read([0, 5])
    with pytest.raises(ValueError, match="unknown frame kind"):
        fs.read([0], ("depth",))
    assert fs.read([], ("rgb",))["rgb"].shape == (0, H, W, 3)
    first = fs.read([1, 0])
    clone = pickle.loads(pickle.dumps(fs))
    assert clone._maps == {}
    assert all(np.array_equal(clone.read([1, 0])[m], first[m]) for m in first)
    (tmp_path / "store" / "seq_0.event.zst").unlink()
    fresh = FrameStore.__new__(FrameStore)
    fresh.__setstate__(pickle.loads(pickle.dumps(fs)).__dict__)
    with pytest.raises(FileNotFoundError, match=r"frame store file missing: .*seq_0\.event\.zst"):
        fresh.read([0])


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ("jpeg", "zstd"))
def test_corrupt_encoded_frames_are_bad_frames(tmp_path: Path, codec: str) -> None:
    recs = _make_records(tmp_path / "src", {0: 3})
    d = tmp_path / "store"
    _build(d, recs, codec)
    reference = _all_frames(d)
    meta = json.loads((d / "seq_0.rgb.json").read_text())
    data_path = d / meta["file"]
    # a bit flipped in the middle of frame 1
    _flip_byte(data_path, meta["offsets"][1] + meta["sizes"][1] // 2)
    fs = FrameStore(d)
    with pytest.raises(
        OSError, match=rf"{data_path.name}: image 1: corrupt {codec} frame 1 \(CRC-32 mismatch\)"
    ):
        fs.read([0, 1, 2])
    frames, bad, problems = fs.read_valid([2, 1, 0])
    assert bad.tolist() == [False, True, False]
    assert problems == [(1, str(data_path), f"corrupt {codec} frame 1 (CRC-32 mismatch)")]
    assert not frames["rgb"][1].any() and not frames["event"][1].any()
    assert np.array_equal(frames["rgb"][0], reference["rgb"][2])
    encoded, bad, problems = fs.read_encoded([1, 2], "rgb")
    assert bad.tolist() == [True, False] and encoded.sizes[0] == 0 and problems[0][0] == 1

    # a frame whose bytes pass the CRC but decode to another size (wrong length)
    _build(d, recs, "raw")
    _build(d, recs, codec)
    meta = json.loads((d / "seq_0.rgb.json").read_text())
    other = parse_codecs(codec)["rgb"].encode(np.zeros((H // 2, W // 2, 3), np.uint8))
    blob = (d / meta["file"]).read_bytes()
    start, size = meta["offsets"][2], meta["sizes"][2]
    (d / meta["file"]).write_bytes(blob[:start] + other + blob[start + size :])
    meta["sizes"][2], meta["crc32"][2] = len(other), zlib.crc32(other)
    meta["bytes"] = meta["bytes"] - size + len(other)
    (d / "seq_0.rgb.json").write_text(json.dumps(meta))
    _, bad, problems = FrameStore(d).read_valid([0, 1, 2])
    assert bad.tolist() == [False, False, True]
    assert "frame 2:" in problems[0][2] and (
        f"{W // 2}x{H // 2}" in problems[0][2] or "bytes" in problems[0][2]
    )

    # a truncated data file: every frame of the file is bad, named with the file
    with open(d / meta["file"], "r+b") as f:
        f.truncate(10)
    _, bad, problems = FrameStore(d).read_valid([0, 1, 2])
    assert bad.all() and "10 bytes, expected" in problems[0][2]


def test_damaged_shard_files_are_skipped_and_checked_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "store"
    _build(d, _make_records(tmp_path / "src", {0: 2, 1: 2, 2: 2}), "raw")
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
    monkeypatch.setattr(reader_mod.os, "fstat", lambda fd: fstats.append(fd) or real_fstat(fd))
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


def test_device_build_matches_the_cpu_build(tmp_path: Path) -> None:
    """The batched device path (run here on the CPU) stores the same frames as the worker path, up to
    the rounding of the area resize that JPEG then quantises; event frames stay identical."""
    import torch

    recs = _make_records(tmp_path / "src", {0: 5, 1: 3}, no_event=(2,))
    bad = _bad_files(tmp_path / "bad")
    recs.append(FrameRecord(900, 1, bad["trunc"][0], recs[0].event_path, (SRC_W, SRC_H)))
    recs.append(FrameRecord(901, 1, bad["big"][0], recs[0].event_path, (SRC_W, SRC_H)))
    cpu = _build(tmp_path / "cpu", recs, "auto")
    dev = _build(tmp_path / "dev", recs, "auto", device=torch.device("cpu"))
    assert dev.bad_frames == cpu.bad_frames and len(cpu.bad_frames) == 2
    a, b = _all_frames(tmp_path / "cpu"), _all_frames(tmp_path / "dev")
    assert np.array_equal(a["event"], b["event"])
    assert _psnr(a["rgb"], b["rgb"]) > 40
    assert not b["rgb"][-2:].any()  # the two bad sources


def test_dataset_on_a_one_modality_store(tmp_path: Path) -> None:
    """An rgb-only store serves rgb datasets (events read as zeros where both are asked for, e.g. the
    eval gallery) and refuses models that need the missing kind, naming it."""
    from fredfusion.data.dataset import PreparedDataset

    recs = _make_records(tmp_path / "src", {0: 2})
    root = tmp_path / "prepared"
    build_store(root / "store", recs, W, H, progress=False, codecs=parse_codecs("auto"), kinds=("rgb",))
    images = [
        {"id": r.image_id, "width": SRC_W, "height": SRC_H, "sequence_id": 0, "rgb_file_name": "x",
         "event_file_name": "y", "pair_status": "dual"}
        for r in recs
    ]  # fmt: skip
    (root / "annotations").mkdir()
    coco = {"info": {"store_width": W, "store_height": H}, "images": images, "annotations": []}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    ds = PreparedDataset(root, "train", modality="rgb")
    batch = ds.load([1, 0], ("rgb", "event"))
    assert batch.rgb.any() and not batch.event.any() and not batch.has_event.any()
    with pytest.raises(ValueError, match="holds no event frames"):
        PreparedDataset(root, "train", modality="dual").load([0])
