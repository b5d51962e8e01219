"""Frame codecs for the frame store: bytes per frame, decode rate per CPU core (and on the GPU), PSNR.

Frames, all at the store size 640x360:

- ``synthetic``: RGB and event frames of the built-in sample (``fredfusion synth`` at 1280x720,
  area-resized as ``prepare`` does);
- ``photo`` (RGB): natural photographs shipped with scikit-image and matplotlib, cropped to 16:9;
- ``dense`` (events): event frames made like the synthetic ones (thresholded log-brightness change,
  two polarity colours on black) from the stereo photo pair ``motorcycle_left/right`` and from
  photos shifted by a few pixels: the edge-rich frames of a moving camera or a windy scene.

Every codec is a maintained library (libjpeg-turbo through simplejpeg, OpenCV, TorchCodec and
torchvision; zstd through zstandard; blosc2; PNG through OpenCV). Decode rates are single-threaded
(one core). With CUDA, batched JPEG decoding on the device is timed too.

    python benchmarks/bench_codecs.py [--frames 64] [--out runs/bench_codecs.json]

Needs the ``bench`` extra (``pip install -e ".[bench]"``: scikit-image, blosc2) besides the store's
own codec libraries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

W, H = 640, 360


def _crop_16x9(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    ch = min(h, round(w * 9 / 16))
    cw = round(ch * 16 / 9)
    y, x = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(img[y : y + ch, x : x + cw], (W, H), interpolation=cv2.INTER_AREA)


def photos() -> list[np.ndarray]:
    """Natural RGB photographs at 640x360."""
    import matplotlib
    import skimage

    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "grass.png"]
    paths = [Path(skimage.__file__).parent / "data" / n for n in names]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    out = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is not None:
            out.append(cv2.cvtColor(_crop_16x9(img), cv2.COLOR_BGR2RGB))
    return out


def _events_from(a: np.ndarray, b: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """An event frame (black, two polarity colours) from the log-brightness change a -> b."""
    la = np.log1p(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float32))
    lb = np.log1p(cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float32))
    d = lb - la
    ev = np.zeros((*a.shape[:2], 3), np.uint8)
    ev[d > threshold] = (235, 48, 40)
    ev[d < -threshold] = (32, 96, 255)
    return ev


def dense_events() -> list[np.ndarray]:
    """Edge-rich event frames at 640x360: a stereo pair and photos shifted by 2-4 pixels."""
    import skimage

    d = Path(skimage.__file__).parent / "data"
    left = cv2.cvtColor(cv2.imread(str(d / "motorcycle_left.png")), cv2.COLOR_BGR2RGB)
    right = cv2.cvtColor(cv2.imread(str(d / "motorcycle_right.png")), cv2.COLOR_BGR2RGB)
    frames = [cv2.resize(_events_from(left, right), (W, H), interpolation=cv2.INTER_AREA)]
    for k, img in enumerate(photos()):
        big = cv2.resize(img, (2 * W, 2 * H))
        shifted = np.roll(big, 2 + k % 3, axis=1)
        frames.append(cv2.resize(_events_from(big, shifted), (W, H), interpolation=cv2.INTER_AREA))
    return frames


def synthetic(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB and event frames of the built-in sample, resized to 640x360 like the store."""
    from fredfusion.data.frames import read_frame
    from fredfusion.data.synth import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        write_sample(Path(tmp), sequences=8, frames=max(8, math.ceil(n / 8)), seed=3)
        rgb = sorted(Path(tmp).glob("*/RGB/*.jpg"))
        ev = sorted(Path(tmp).glob("*/Event/Frames/*.png"))
        step_r, step_e = max(1, len(rgb) // n), max(1, len(ev) // n)
        return (
            [read_frame(p, W, H) for p in rgb[::step_r][:n]],
            [read_frame(p, W, H) for p in ev[::step_e][:n]],
        )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------- codecs
def _jpeg(quality: int, subsampling: str = "420") -> tuple[Callable, dict[str, Callable]]:
    import simplejpeg

    def enc(img: np.ndarray) -> bytes:
        return simplejpeg.encode_jpeg(
            np.ascontiguousarray(img), quality=quality, colorspace="RGB", colorsubsampling=subsampling
        )

    def dec_simplejpeg(data: bytes) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")

    def dec_cv2(data: bytes) -> np.ndarray:
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    decoders = {"simplejpeg": dec_simplejpeg, "opencv": dec_cv2}
    try:
        import torch
        from torchcodec.decoders import decode_jpeg as tc_decode

        decoders["torchcodec"] = lambda data: tc_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except ImportError:
        pass
    return enc, decoders


def _zstd(level: int) -> tuple[Callable, dict[str, Callable]]:
    import zstandard

    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()

    def enc(img: np.ndarray) -> bytes:
        return cctx.compress(np.ascontiguousarray(img).tobytes())

    def dec(data: bytes) -> np.ndarray:
        return np.frombuffer(dctx.decompress(data), np.uint8).reshape(H, W, 3)

    return enc, {"zstandard": dec}


def _blosc2(level: int) -> tuple[Callable, dict[str, Callable]]:
    import blosc2

    def enc(img: np.ndarray) -> bytes:
        return blosc2.compress(
            np.ascontiguousarray(img).tobytes(),
            codec=blosc2.Codec.ZSTD,
            clevel=level,
            filter=blosc2.Filter.SHUFFLE,
        )

    def dec(data: bytes) -> np.ndarray:
        return np.frombuffer(blosc2.decompress(data), np.uint8).reshape(H, W, 3)

    return enc, {"blosc2": dec}


def _png(level: int) -> tuple[Callable, dict[str, Callable]]:
    def enc(img: np.ndarray) -> bytes:
        _ok, buf = cv2.imencode(".png", img[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, level])
        return buf.tobytes()

    def dec(data: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]

    return enc, {"opencv": dec}


def codecs(kind: str) -> dict[str, tuple[Callable, dict[str, Callable]]]:
    """The codecs measured for RGB (``rgb``) or event (``event``) frames."""
    table = {f"jpeg q{q} 4:2:0": _jpeg(q) for q in (75, 85, 90, 95)}
    table.update({f"jpeg q{q} 4:4:4": _jpeg(q, "444") for q in (90, 95)})
    if kind == "event":
        table = {"jpeg q90 4:2:0": _jpeg(90), "jpeg q95 4:4:4": _jpeg(95, "444")}
        table.update({"zstd 1": _zstd(1), "zstd 3": _zstd(3), "zstd 9": _zstd(9)})
        table.update({"blosc2 zstd 5": _blosc2(5)})
    table["png 1"] = _png(1)
    return table


def _rate(decode: Callable, blobs: list[bytes], seconds: float = 0.6) -> float:
    decode(blobs[0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for blob in blobs:
            decode(blob)
        n += len(blobs)
    return n / (time.perf_counter() - t0)


def _gpu_rate(blobs: list[bytes], batch: int = 128) -> dict[str, float]:
    """Batched JPEG decode on CUDA (TorchCodec and torchvision.io), frames per second."""
    import torch

    if not torch.cuda.is_available():
        return {}
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    tensors = (tensors * math.ceil(batch / len(tensors)))[:batch]
    rates: dict[str, float] = {}
    decoders: dict[str, Callable] = {}
    try:
        from torchcodec.decoders import decode_jpeg as tc_decode

        decoders["torchcodec cuda"] = lambda ts: tc_decode(ts, device="cuda")
    except ImportError:
        pass
    try:
        from torchvision.io import decode_jpeg as tv_decode

        decoders["torchvision cuda"] = lambda ts: tv_decode(ts, device="cuda")
    except ImportError:
        pass
    for name, dec in decoders.items():
        try:
            for _ in range(3):
                dec(tensors)
            torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 1.0:
                dec(tensors)
                n += batch
            torch.cuda.synchronize()
            rates[name] = n / (time.perf_counter() - t0)
        except Exception as exc:  # report, do not stop the table
            rates[name] = float("nan")
            print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return rates


def _finite_mean(scores: list[float]) -> float:
    finite = [s for s in scores if math.isfinite(s)]
    return float(np.mean(finite)) if finite else math.inf


def measure(kind: str, frames: list[np.ndarray]) -> list[dict]:
    """One row per codec: mean bytes per frame, min / mean PSNR, decode rates."""
    rows = []
    for name, (enc, decoders) in codecs(kind).items():
        blobs = [enc(f) for f in frames]
        first = next(iter(decoders.values()))
        decoded = [np.asarray(first(b)) for b in blobs]
        decoded = [d if d.shape == f.shape else np.moveaxis(d, 0, -1) for d, f in zip(decoded, frames)]
        scores = [psnr(f, d) for f, d in zip(frames, decoded)]
        row = {
            "codec": name,
            "bytes": float(np.mean([len(b) for b in blobs])),
            "psnr_min": min(scores),
            "psnr_mean": float(np.mean([s for s in scores if math.isfinite(s)]))
            if any(map(math.isfinite, scores))
            else math.inf,
            "decode_per_core": {k: _rate(d, blobs) for k, d in decoders.items()},
        }
        if name.startswith("jpeg"):
            row["decode_gpu"] = _gpu_rate(blobs)
        rows.append(row)
    raw = {"codec": "raw", "bytes": float(W * H * 3), "psnr_min": math.inf, "psnr_mean": math.inf}
    return [raw, *rows]


def _fmt_rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.0f}" for k, v in rates.items()) or "-"


def _fmt_psnr(v: float) -> str:
    return "lossless" if math.isinf(v) else f"{v:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=64, help="synthetic frames per modality")
    p.add_argument("--out", type=Path, default=Path("runs/bench_codecs.json"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    syn_rgb, syn_ev = synthetic(args.frames)
    sets = {
        ("rgb", "synthetic"): syn_rgb,
        ("rgb", "photo"): photos(),
        ("event", "synthetic"): syn_ev,
        ("event", "dense"): dense_events(),
    }
    report = {"frame": f"{W}x{H}x3 uint8", "cpu": os.cpu_count(), "rows": {}}
    print("| frames | codec | bytes/frame | PSNR min / mean dB | decode frames/s per core | decode GPU |")
    print("|---|---|---:|---|---|---|")
    for (kind, source), frames in sets.items():
        rows = measure(kind, frames)
        report["rows"][f"{kind} {source}"] = rows
        for r in rows:
            print(
                f"| {kind} {source} ({len(frames)}) | {r['codec']} | {r['bytes']:,.0f} | "
                f"{_fmt_psnr(r['psnr_min'])} / {_fmt_psnr(r['psnr_mean'])} | "
                f"{_fmt_rates(r.get('decode_per_core', {}))} | {_fmt_rates(r.get('decode_gpu', {}))} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
