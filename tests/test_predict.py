"""Tests of `fredfusion predict` on tiny untrained models and synthetic FRED frames."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fredfusion.commands.predict import add_parser
from fredfusion.predict import CSV_COLUMNS, annotate, fit_size, open_source, predict

W, H = 320, 180  # synthetic frame size
INPUT_HW = (64, 128)
QUIET = {"log": lambda _m: None}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained YOLO-n checkpoints of the three modalities, trained input shape 64x128."""
    from fredfusion.engine.checkpoint import save_checkpoint
    from fredfusion.model import build_model
    from fredfusion.model.weights import model_meta

    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for modality in ("dual", "rgb", "event"):
        torch.manual_seed(0)
        m = build_model(modality, "n")
        path = folder / f"{modality}.pth"
        save_checkpoint(
            {"meta": model_meta(m), "model": m.state_dict(), "config": {"input_shape": list(INPUT_HW)}}, path
        )
        out[modality] = path
    return out


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic FRED sequence folder (6 RGB frames, 320x180)."""
    from fredfusion.data.synth import write_sample

    root = tmp_path_factory.mktemp("fred")
    write_sample(root, sequences=1, frames=6, width=W, height=H, seed=0)
    (seq,) = [p for p in root.iterdir() if p.is_dir()]
    return seq


def _pairs(seq: Path) -> list:
    from fredfusion.data.fred import read_sequence
    from fredfusion.data.pairing import pair_sequence

    return pair_sequence(read_sequence(seq, seq.parent), 33.0).images


def _rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _video_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


def _assert_inside(rows: list[dict[str, str]], w: float, h: float) -> None:
    assert rows, "expected some boxes"
    for r in rows:
        x1, y1, x2, y2 = (float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0.0 <= x1 < x2 <= w and 0.0 <= y1 < y2 <= h, r
        assert 0.0 <= float(r["score"]) <= 1.0


# ------------------------------------------------------------------------------------------ sequences
def test_sequence_dual_writes_playable_video_and_detections(
    ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path
) -> None:
    pairs = [im for im in _pairs(seq_dir) if im.pair_status == "dual"]
    assert len(pairs) >= 3
    res = predict(ckpts["dual"], seq_dir, out=tmp_path / "o", conf=0.0, max_det=10, batch=4, **QUIET)
    assert res.frames == len(pairs)

    # the MP4 plays back with one frame per pair, RGB | Event side by side (320 + 4 + 320)
    assert res.video_path == tmp_path / "o" / "predictions.mp4"
    frames = _video_frames(res.video_path)
    assert len(frames) == len(pairs)
    assert frames[0].shape == (H, 2 * W + 4, 3)

    header, rows = _rows(res.csv_path)
    assert header == [
        "frame", "rgb_file", "event_file", "time_s", "x1", "y1", "x2", "y2", "score", "class"
    ]  # fmt: skip
    assert tuple(header) == CSV_COLUMNS
    _assert_inside(rows, W, H)
    by_frame = {int(r["frame"]): r for r in rows}
    assert set(by_frame) <= set(range(len(pairs)))
    for k, r in by_frame.items():
        assert r["rgb_file"] == pairs[k].rgb_file_name
        assert r["event_file"] == pairs[k].event_file_name
        assert float(r["time_s"]) == pytest.approx(pairs[k].time_s, abs=1e-6)

    data = json.loads(res.json_path.read_text())
    assert data["modality"] == "dual" and data["input_shape"] == list(INPUT_HW)
    preds = data["predictions"]
    assert [p["frame"] for p in preds] == list(range(len(pairs)))
    assert [p["event_file"] for p in preds] == [im.event_file_name for im in pairs]
    assert sum(len(p["boxes"]) for p in preds) == len(rows) == res.boxes
    assert all(len(p["boxes"]) <= 10 for p in preds)

    # few frames: every one is saved as an annotated JPEG
    assert len(res.annotated) == len(pairs)
    names = sorted(p.name for p in (tmp_path / "o" / "frames").iterdir())
    assert names[0] == f"000000_{Path(pairs[0].rgb_file_name).stem}.jpg"
    assert cv2.imread(str(res.annotated[0])).shape == (H, 2 * W + 4, 3)


def test_sequence_event_model_uses_every_event_frame(
    ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path
) -> None:
    events = [im for im in _pairs(seq_dir) if im.event_file_name is not None]
    n_event_files = len(list((seq_dir / "Event" / "Frames").glob("*.png")))
    assert len(events) == n_event_files > 6  # the synthetic event recording runs longer than RGB
    res = predict(ckpts["event"], seq_dir, out=tmp_path / "o", conf=0.0, max_det=3, save_frames=0, **QUIET)
    assert res.frames == n_event_files
    assert res.annotated == [] and not (tmp_path / "o" / "frames").exists()
    assert len(_video_frames(res.video_path)) == n_event_files
    preds = json.loads(res.json_path.read_text())["predictions"]
    assert all(p["rgb_file"] is None for p in preds)
    times = [p["time_s"] for p in preds]
    assert times == sorted(times) and times[0] == pytest.approx(0.033333)


def test_save_frames_spreads_the_jpegs_over_the_source(
    ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path
) -> None:
    n_rgb = len(list((seq_dir / "RGB").glob("*.jpg")))
    out = tmp_path / "o"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "000099_stale.jpg").write_bytes(b"old run")
    (out / "frames" / "keep.txt").write_text("not ours")
    res = predict(ckpts["rgb"], seq_dir, out=out, conf=0.5, save_frames=2, **QUIET)
    assert res.frames == n_rgb
    names = sorted(p.name for p in (out / "frames").glob("*.jpg"))
    assert [n[:6] for n in names] == ["000000", f"{n_rgb - 1:06d}"]
    assert (out / "frames" / "keep.txt").exists()


# --------------------------------------------------------------------------------------- single image
def test_single_image_with_event_frame(ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path) -> None:
    pair = next(im for im in _pairs(seq_dir) if im.pair_status == "dual")
    rgb = seq_dir.parent / pair.rgb_file_name
    ev = seq_dir.parent / pair.event_file_name
    res = predict(ckpts["dual"], rgb, event=ev, out=tmp_path / "o", conf=0.0, max_det=5, **QUIET)
    assert res.frames == 1 and res.video_path is None
    assert not (tmp_path / "o" / "predictions.mp4").exists()
    assert res.annotated == [tmp_path / "o" / f"{rgb.stem}.jpg"]
    assert cv2.imread(str(res.annotated[0])).shape == (H, 2 * W + 4, 3)
    _, rows = _rows(res.csv_path)
    _assert_inside(rows, W, H)
    assert {(r["frame"], r["rgb_file"], r["event_file"], r["time_s"]) for r in rows} == {
        ("0", rgb.name, ev.name, "")
    }


def test_dual_model_needs_the_event_frame(ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path) -> None:
    rgb = next((seq_dir / "RGB").glob("*.jpg"))
    with pytest.raises(ValueError, match="dual model needs --event"):
        predict(ckpts["dual"], rgb, out=tmp_path / "o", **QUIET)


def test_event_flag_is_refused_for_single_modality_models(
    ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path
) -> None:
    rgb = next((seq_dir / "RGB").glob("*.jpg"))
    ev = next((seq_dir / "Event" / "Frames").glob("*.png"))
    with pytest.raises(ValueError, match="only used by dual models"):
        predict(ckpts["rgb"], rgb, event=ev, out=tmp_path / "o", **QUIET)


def test_unreadable_image_is_named(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: not an image \(cannot decode\)"):
        predict(ckpts["rgb"], bad, out=tmp_path / "o", **QUIET)


def test_missing_source_and_weights(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg: source not found"):
        predict(ckpts["rgb"], tmp_path / "nope.jpg", out=tmp_path / "o", **QUIET)
    with pytest.raises(FileNotFoundError, match=r"none\.pth: checkpoint not found"):
        predict(tmp_path / "none.pth", tmp_path, out=tmp_path / "o", **QUIET)


def test_input_shape_must_fit_the_strides(ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path) -> None:
    rgb = next((seq_dir / "RGB").glob("*.jpg"))
    with pytest.raises(ValueError, match="multiples of 32"):
        predict(ckpts["rgb"], rgb, out=tmp_path / "o", input_hw=(60, 128), **QUIET)


# ---------------------------------------------------------------------------------------------- video
def _write_video(path: Path, n: int, w: int, h: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for k in range(n):
        img = np.full((h, w, 3), 40, dtype=np.uint8)
        img += rng.integers(0, 20, size=img.shape, dtype=np.uint8)
        cv2.rectangle(img, (10 + 5 * k, 20), (30 + 5 * k, 34), (220, 220, 220), -1)
        writer.write(img)
    writer.release()


def test_video_source_for_an_rgb_model(ckpts: dict[str, Path], tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, n=7, w=160, h=96, fps=10.0)
    res = predict(ckpts["rgb"], video, out=tmp_path / "o", conf=0.0, max_det=4, batch=3, **QUIET)
    assert res.frames == 7
    frames = _video_frames(res.video_path)
    assert len(frames) == 7 and frames[0].shape == (96, 160, 3)
    header, rows = _rows(res.csv_path)
    assert tuple(header) == CSV_COLUMNS
    _assert_inside(rows, 160, 96)
    for r in rows:
        assert float(r["time_s"]) == pytest.approx(int(r["frame"]) / 10.0, abs=1e-6)
        assert r["rgb_file"] == r["event_file"] == ""
    assert len(res.annotated) == 7  # short source: all frames saved
    assert sorted(p.name for p in res.annotated) == [f"{k:06d}.jpg" for k in range(7)]


def test_default_output_folder_is_named_after_the_source(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = tmp_path / "flight.avi"
    _write_video(video, n=3, w=64, h=64, fps=30.0)
    monkeypatch.chdir(tmp_path)
    res = predict(ckpts["event"], video, conf=0.5, **QUIET)
    assert res.out_dir == Path("runs/predict/flight")
    assert (tmp_path / "runs" / "predict" / "flight" / "detections.json").is_file()


def test_dual_model_on_a_video_is_a_clear_error(ckpts: dict[str, Path], tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, n=2, w=64, h=64, fps=30.0)
    with pytest.raises(ValueError, match="dual model needs RGB and event frames"):
        predict(ckpts["dual"], video, out=tmp_path / "o", **QUIET)
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------- folders
def test_folder_of_event_frames_is_sorted_by_frame_number(
    ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path
) -> None:
    folder = seq_dir / "Event" / "Frames"
    files = list(folder.glob("*.png"))
    numeric = sorted(files, key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert [p.name for p in numeric] != sorted(p.name for p in files)  # string order would be wrong
    res = predict(ckpts["event"], folder, out=tmp_path / "o", conf=0.0, max_det=2, **QUIET)
    preds = json.loads(res.json_path.read_text())["predictions"]
    assert [p["event_file"] for p in preds] == [p.name for p in numeric]
    assert all(p["time_s"] is None for p in preds)
    assert len(_video_frames(res.video_path)) == len(files)


def test_dual_folders_pair_by_sorted_order(ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path) -> None:
    pairs = [im for im in _pairs(seq_dir) if im.pair_status == "dual"][:3]
    rgb_dir, ev_dir = tmp_path / "rgb", tmp_path / "ev"
    rgb_dir.mkdir()
    ev_dir.mkdir()
    for k, im in enumerate(pairs):
        shutil.copy(seq_dir.parent / im.rgb_file_name, rgb_dir / f"f{k + 8}.jpg")  # f8, f9, f10
        shutil.copy(seq_dir.parent / im.event_file_name, ev_dir / f"e{k + 8}.png")
    res = predict(ckpts["dual"], rgb_dir, event=ev_dir, out=tmp_path / "o", conf=0.0, max_det=2, **QUIET)
    preds = json.loads(res.json_path.read_text())["predictions"]
    assert [(p["rgb_file"], p["event_file"]) for p in preds] == [
        ("f8.jpg", "e8.png"),
        ("f9.jpg", "e9.png"),
        ("f10.jpg", "e10.png"),
    ]


def test_dual_folders_with_different_counts_are_refused(ckpts: dict[str, Path], seq_dir: Path) -> None:
    n_rgb = len(list((seq_dir / "RGB").glob("*.jpg")))
    n_ev = len(list((seq_dir / "Event" / "Frames").glob("*.png")))
    with pytest.raises(ValueError, match=f"has {n_rgb} images but .* has {n_ev}"):
        open_source(seq_dir / "RGB", seq_dir / "Event" / "Frames", "dual")


def test_sequence_folder_refuses_an_extra_event_source(seq_dir: Path) -> None:
    with pytest.raises(ValueError, match="holds its own event frames"):
        open_source(seq_dir, seq_dir / "Event" / "Frames", "dual")


# ------------------------------------------------------------------------------------------- geometry
def test_fit_size_keeps_the_aspect() -> None:
    assert fit_size((720, 1280), (384, 640)) == (360, 640)
    assert fit_size((180, 320), (64, 128)) == (64, 114)  # scale min(128/320, 64/180) = 0.3556
    assert fit_size((36, 64), (64, 128)) == (64, 114)  # small frames are enlarged
    assert fit_size((1000, 100), (64, 128)) == (64, 6)


def test_boxes_are_scaled_back_to_frame_pixels(
    ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fredfusion.eval.evaluator as evaluator

    calls: list[tuple] = []

    def fake(model, rgb, event, input_hw, **kwargs):
        calls.append((rgb.shape, None if event is None else event.shape, tuple(input_hw)))
        return [np.array([[10.0, 5.0, 20.0, 15.0, 0.9, 0.0]], dtype=np.float32) for _ in range(len(rgb))]

    monkeypatch.setattr(evaluator, "predict_frames", fake)
    n = sum(im.pair_status == "dual" for im in _pairs(seq_dir))
    res = predict(ckpts["dual"], seq_dir, out=tmp_path / "o", batch=4, **QUIET)
    # 320x180 frames fit 128x64 as 114x64; batches of 4
    assert calls[0] == ((4, 64, 114, 3), (4, 64, 114, 3), INPUT_HW)
    assert [c[0][0] for c in calls] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    _, rows = _rows(res.csv_path)
    assert len(rows) == n
    x1, y1, x2, y2 = (float(rows[0][k]) for k in ("x1", "y1", "x2", "y2"))
    assert (x1, y1, x2, y2) == pytest.approx(
        (10 * 320 / 114, 5 * 180 / 64, 20 * 320 / 114, 15 * 180 / 64), abs=0.01
    )
    assert rows[0]["score"] == "0.90000" and rows[0]["class"] == "0"


def test_annotate_draws_boxes_on_both_panels() -> None:
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    ev = np.zeros((40, 60, 3), dtype=np.uint8)
    tile = annotate(rgb, ev, np.array([[30.0, 20.0, 50.0, 35.0, 0.5, 0.0]]))
    assert tile.shape == (40, 124, 3)
    assert rgb.max() == 0 and ev.max() == 0  # inputs untouched
    # the right edge of the box (x = 50) is drawn in both panels
    assert tile[28, 50].max() > 0 and tile[28, 64 + 50].max() > 0
    assert tile[28, 40].max() == 0  # inside the box stays empty
    assert annotate(rgb, None, np.zeros((0, 6))).shape == (40, 60, 3)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_subcommand(ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="fredfusion")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    ev = next((seq_dir / "Event" / "Frames").glob("*.png"))
    args = parser.parse_args(
        ["predict", "--weights", str(ckpts["event"]), "--source", str(ev), "--out", str(tmp_path / "o"),
         "--conf", "0.0", "--max-det", "3", "--input-shape", "96", "160", "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    data = json.loads((tmp_path / "o" / "detections.json").read_text())
    assert data["input_shape"] == [96, 160] and data["frames"] == 1
    assert (tmp_path / "o" / f"{ev.stem}.jpg").is_file()


# -------------------------------------------------------------------------------------- video codec
def _fourcc(path: Path) -> str:
    cap = cv2.VideoCapture(str(path))
    code = int(cap.get(cv2.CAP_PROP_FOURCC))
    cap.release()
    return "".join(chr((code >> 8 * i) & 0xFF) for i in range(4)).lower()


def test_video_is_h264_with_the_video_extra(ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path) -> None:
    from fredfusion.predict.outputs import h264_available

    if not h264_available():
        pytest.skip("PyAV (the video extra) is not installed")
    lines: list[str] = []
    res = predict(ckpts["dual"], seq_dir, out=tmp_path / "o", batch=4, log=lines.append)
    assert res.video_codec == "H.264" and _fourcc(res.video_path) in ("h264", "avc1")
    assert f"  video: {res.video_path} (H.264)" in lines
    head = res.video_path.read_bytes()[:64]
    assert head.index(b"moov") < 64  # the index comes first: a browser plays it while loading
    assert len(_video_frames(res.video_path)) == res.frames


def test_video_is_mp4v_without_it_and_says_so(
    ckpts: dict[str, Path], seq_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fredfusion.predict.outputs.h264_available", lambda: False)
    lines: list[str] = []
    res = predict(ckpts["dual"], seq_dir, out=tmp_path / "o", batch=4, log=lines.append)
    assert res.video_codec == "mp4v" and _fourcc(res.video_path) in ("mp4v", "fmp4")
    assert f'  video: {res.video_path} (mp4v; browsers need H.264: pip install -e ".[video]")' in lines
    assert len(_video_frames(res.video_path)) == res.frames
