"""How the frame store keeps one frame: raw rows, JPEG (RGB) or zstd (lossless, events).

The default (``auto``) was chosen by measurement (``benchmarks/bench_codecs.py``, docs/PERFORMANCE.md):
RGB frames as JPEG quality 90 with 4:2:0 chroma subsampling (as camera JPEGs and nvJPEG's encoder)
through libjpeg-turbo (simplejpeg), event frames losslessly as zstd
level 3 of the pixel rows (sparse frames shrink ~140x and decode at >15k frames/s per core; JPEG was
lossy and larger on edge-rich event frames). ``raw`` keeps fixed-size uint8 rows (memory-mapped),
the only layout of format-1 stores, and suits small sets.

A codec turns a ``(H, W, C)`` uint8 RGB frame (C = 3, or 1 for a gray source) into bytes and back
into a ``(H, W, 3)`` buffer; a frame whose bytes do not decode to the store size is a
:class:`CorruptFrame` error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fredfusion.spec import FRAME_KINDS

DEFAULT_JPEG_QUALITY = 90
DEFAULT_ZSTD_LEVEL = 3


class CorruptFrame(ValueError):
    """Encoded bytes that do not decode to a frame of the store's size."""


@dataclass(frozen=True)
class Codec:
    """A codec name and its parameter (JPEG quality or zstd level; 0 for raw)."""

    name: str
    level: int = 0
    extension: str = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; choose from {', '.join(CODECS)}")
        low, high = LEVELS[self.name]
        if not low <= self.level <= high:
            raise ValueError(f"{self.name} level must be within [{low}, {high}], got {self.level}")
        object.__setattr__(self, "extension", {"raw": "u8", "jpeg": "jpg", "zstd": "zst"}[self.name])

    @property
    def fixed_size(self) -> bool:
        """True for raw rows (frame k at k * frame bytes), False for variable-size encoded frames."""
        return self.name == "raw"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Codec:
        return cls(str(d["name"]), int(d.get("level", 0)))

    def __str__(self) -> str:
        return self.name if self.name == "raw" else f"{self.name}:{self.level}"

    # ------------------------------------------------------------------------------ encode / decode
    def encode(self, frame: np.ndarray) -> bytes:
        """Bytes of one ``(H, W, C)`` uint8 frame (C = 1 or 3)."""
        frame = np.ascontiguousarray(frame)
        if self.name == "jpeg":
            import simplejpeg

            gray = frame.ndim == 2 or frame.shape[2] == 1
            return simplejpeg.encode_jpeg(
                frame.reshape(*frame.shape[:2], 1) if gray else frame,
                quality=self.level,
                colorspace="GRAY" if gray else "RGB",
                colorsubsampling="420",
            )
        if self.name == "zstd":
            import zstandard

            return zstandard.ZstdCompressor(level=self.level).compress(frame.tobytes())
        if frame.ndim == 2 or frame.shape[2] == 1:  # raw rows always hold three channels
            frame = np.repeat(frame.reshape(*frame.shape[:2], 1), 3, axis=2)
        return frame.tobytes()

    def decode_into(self, data: Any, out: np.ndarray) -> None:
        """Decode ``data`` (bytes-like) into ``out`` ``(H, W, 3)`` uint8; CorruptFrame when it does not
        decode to that size (a gray frame fills all three channels)."""
        h, w = out.shape[:2]
        if self.name == "jpeg":
            import simplejpeg

            try:
                hh, ww, _colour, _sub = simplejpeg.decode_jpeg_header(data)
                if (hh, ww) != (h, w):
                    raise CorruptFrame(f"JPEG frame is {ww}x{hh}, the store is {w}x{h}")
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=True)
            except ValueError as exc:
                raise CorruptFrame(f"JPEG frame does not decode ({exc})") from None
            return
        if self.name == "zstd":
            import zstandard

            try:
                pixels = zstandard.ZstdDecompressor().decompress(data, max_output_size=h * w * 3)
            except zstandard.ZstdError as exc:
                raise CorruptFrame(f"zstd frame does not decompress ({exc})") from None
            raw = np.frombuffer(pixels, np.uint8)
        else:
            raw = np.frombuffer(data, np.uint8)
        if raw.size == h * w * 3:
            out[...] = raw.reshape(h, w, 3)
        elif raw.size == h * w:
            out[...] = raw.reshape(h, w, 1)
        else:
            raise CorruptFrame(f"{self.name} frame holds {raw.size} bytes, a {w}x{h} frame needs {h * w * 3}")


CODECS = ("raw", "jpeg", "zstd")
LEVELS = {"raw": (0, 0), "jpeg": (1, 100), "zstd": (1, 22)}
_DEFAULT_LEVEL = {"raw": 0, "jpeg": DEFAULT_JPEG_QUALITY, "zstd": DEFAULT_ZSTD_LEVEL}
AUTO: dict[str, Codec] = {
    "rgb": Codec("jpeg", DEFAULT_JPEG_QUALITY),
    "event": Codec("zstd", DEFAULT_ZSTD_LEVEL),
}
"""The default codec of each frame kind."""
RAW: dict[str, Codec] = {kind: Codec("raw") for kind in FRAME_KINDS}


def _one(text: str) -> Codec:
    name, _, level = text.strip().partition(":")
    name = name.strip().lower()
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose from auto, {', '.join(CODECS)}")
    try:
        value = int(level) if level.strip() else _DEFAULT_LEVEL[name]
    except ValueError:
        raise ValueError(f"codec level must be an integer, got {level!r}") from None
    return Codec(name, value)


def parse_codecs(spec: str) -> dict[str, Codec]:
    """The codec of each frame kind from a ``--codec`` value.

    ``auto`` (JPEG 90 for RGB, zstd 3 for events), one codec for both kinds (``raw``, ``jpeg:95``,
    ``zstd``), or per kind: ``rgb=jpeg:95,event=zstd:9`` (a kind not named keeps its auto codec).
    ValueError names what is wrong.
    """
    text = (spec or "auto").strip()
    if text == "auto":
        return dict(AUTO)
    if "=" not in text:
        codec = _one(text)
        return {kind: codec for kind in FRAME_KINDS}
    chosen = dict(AUTO)
    for part in text.split(","):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        if kind not in FRAME_KINDS:
            raise ValueError(
                f"--codec: unknown frame kind {kind!r} in {spec!r}; kinds: {', '.join(FRAME_KINDS)}"
            )
        chosen[kind] = _one(value)
    return chosen
