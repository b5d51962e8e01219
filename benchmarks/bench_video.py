"""Encoders for predict's video: OpenCV mp4v, PyAV libx264, imageio-ffmpeg libx264 (frames/s, MB, PSNR).

    python benchmarks/bench_video.py [--frames 60] [--width 1280] [--out /tmp/bench_video]

Encodes the annotated RGB | Event frames of a synthetic FRED sequence (what `fredfusion predict` writes
for a dual model) with each encoder that is installed, on one process, and prints one row per encoder:
encode frames/s, file size, PSNR of the decoded video against the frames, and whether the file is H.264
with yuv420p (what browsers play). Encoders not installed are listed as skipped.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from fredfusion.predict.outputs import annotate

FPS = 30


def _frames(n: int, width: int, out: Path) -> list[np.ndarray]:
    from fredfusion.data.synth import write_sample

    root = out / "fred"
    write_sample(root, sequences=1, frames=n, width=width, height=width * 9 // 16, seed=0)
    (seq,) = [p for p in root.iterdir() if p.is_dir()]
    rgb = sorted((seq / "RGB").glob("*.jpg"))[:n]
    event = sorted((seq / "Event" / "Frames").glob("*.png"))[:n]
    boxes = np.array([[100.0, 80.0, 140.0, 110.0, 0.91, 0.0]])
    frames = []
    for r, e in zip(rgb, event):
        a = cv2.imread(str(r))[..., ::-1]
        b = cv2.imread(str(e))[..., ::-1]
        tile = annotate(a, b, boxes, "frame")
        h, w = tile.shape[:2]
        frames.append(np.ascontiguousarray(tile[: h - h % 2, : w - w % 2]))
    return frames


def _opencv(path: Path, frames: list[np.ndarray]) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w, h))
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()


def _pyav(preset: str) -> Callable[[Path, list[np.ndarray]], None]:
    def write(path: Path, frames: list[np.ndarray]) -> None:
        import av

        h, w = frames[0].shape[:2]
        with av.open(str(path), mode="w", container_options={"movflags": "+faststart"}) as box:
            stream = box.add_stream("libx264", rate=Fraction(FPS))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"preset": preset, "crf": "23"}
            for f in frames:
                box.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            box.mux(stream.encode(None))

    return write


def _imageio_ffmpeg(path: Path, frames: list[np.ndarray]) -> None:
    import imageio_ffmpeg

    h, w = frames[0].shape[:2]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    cmd += ["-s", f"{w}x{h}", "-r", str(FPS), "-i", "-", "-c:v", "libx264", "-preset", "veryfast"]
    cmd += ["-crf", "23", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for f in frames:
        proc.stdin.write(f.tobytes())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("ffmpeg failed")


def _decoded(path: Path) -> tuple[list[np.ndarray], str]:
    cap = cv2.VideoCapture(str(path))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
    codec = "".join(chr((fourcc >> 8 * i) & 0xFF) for i in range(4))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        out.append(img[..., ::-1])
    cap.release()
    return out, codec


def _psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    mse = np.mean([np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2) for x, y in zip(a, b)])
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def main() -> int:
    """Encode, decode and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="frames to encode (default: 60)")
    parser.add_argument("--width", type=int, default=1280, help="source frame width (default: 1280)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_video"), help="scratch folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    frames = _frames(args.frames, args.width, args.out)
    h, w = frames[0].shape[:2]
    print(f"{len(frames)} annotated RGB | Event frames of {w}x{h} at {FPS} fps")
    encoders = {
        "opencv mp4v": ("cv2", _opencv),
        "pyav libx264 veryfast": ("av", _pyav("veryfast")),
        "pyav libx264 medium": ("av", _pyav("medium")),
        "pyav libx264 superfast": ("av", _pyav("superfast")),
        "pyav libx264 ultrafast": ("av", _pyav("ultrafast")),
        "imageio-ffmpeg libx264 veryfast": ("imageio_ffmpeg", _imageio_ffmpeg),
    }
    print(f"{'encoder':<34} {'frames/s':>9} {'MB':>7} {'PSNR dB':>8}  codec")
    for name, (module, write) in encoders.items():
        try:
            __import__(module)
        except ImportError:
            print(f"{name:<34} skipped ({module} not installed)")
            continue
        path = args.out / f"{name.replace(' ', '_')}.mp4"
        t0 = time.perf_counter()
        write(path, frames)
        rate = len(frames) / (time.perf_counter() - t0)
        decoded, codec = _decoded(path)
        psnr = _psnr(frames, decoded) if len(decoded) == len(frames) else float("nan")
        print(f"{name:<34} {rate:9.1f} {path.stat().st_size / 1e6:7.2f} {psnr:8.2f}  {codec}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
