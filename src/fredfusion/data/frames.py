"""The one frame reader: image files (JPEG, PNG, ...) decoded to RGB uint8, checked, resized.

Serves the frame store build, the decoding fallback of a prepared folder and ``predict``. Every
problem with a file is a :class:`BadFrameError` naming the file and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadFrameError(ValueError):
    """A source frame that cannot be used; carries the file path and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (BadFrameError, (self.path, self.reason))


def truncation_reason(data: bytes) -> str | None:
    """Return a reason when a JPEG/PNG byte string is visibly cut short, else None."""
    if data.startswith(_JPEG_MAGIC):
        tail = data[-4096:].rstrip(b"\x00\r\n ")
        if not tail.endswith(b"\xff\xd9"):
            return "truncated JPEG (no end-of-image marker)"
    elif data.startswith(_PNG_MAGIC) and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk)"
    return None


def read_bytes(path: Path) -> bytes:
    """The bytes of an image file; BadFrameError for a missing, unreadable or empty file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadFrameError(path, "missing file") from None
    except OSError as e:
        raise BadFrameError(path, f"unreadable ({e.strerror or type(e).__name__})") from None
    if not data:
        raise BadFrameError(path, "zero-byte file")
    return data


def decode_image(
    data: bytes, path: Path | str, allow_16bit: bool = False, keep_gray: bool = False
) -> np.ndarray:
    """Decode image bytes to ``(H, W, 3)`` uint8 RGB: gray frames are replicated to 3 channels (kept as
    ``(H, W, 1)`` with ``keep_gray``) and an alpha plane is dropped. 16-bit images are an error unless
    ``allow_16bit`` (then scaled to 8 bits). Truncated JPEG / PNG data is an error even when the
    decoder would accept it."""
    reason = truncation_reason(data)
    if reason:
        raise BadFrameError(path, reason)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadFrameError(path, "not an image (cannot decode)")
    if img.dtype == np.uint16 and allow_16bit:
        img = (img >> 8).astype(np.uint8)
    if img.dtype != np.uint8:
        raise BadFrameError(path, f"unsupported pixel type {img.dtype} (expected 8-bit)")
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels == 1:  # grayscale event frames in some copies: replicate to 3 channels
        gray = img.reshape(img.shape[:2])
        return gray[..., None] if keep_gray else cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if channels == 4:  # PNG with alpha: the alpha plane is dropped
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if channels != 3:
        raise BadFrameError(path, f"wrong channel count {channels} (expected 1, 3 or 4)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: Path, allow_16bit: bool = False, keep_gray: bool = False) -> np.ndarray:
    """Read and decode one image file to ``(H, W, 3)`` uint8 RGB (see :func:`decode_image`)."""
    return decode_image(read_bytes(Path(path)), path, allow_16bit, keep_gray)


def resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``img`` at ``(height, width)``: area averaging when shrinking (as the store does), else linear."""
    if img.shape[:2] == tuple(hw):
        return img
    shrink = hw[0] < img.shape[0] or hw[1] < img.shape[1]
    out = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out.reshape(*hw, img.shape[2]) if img.ndim == 3 else out


def read_frame(
    path: Path, width: int, height: int, orig_size: tuple[int, int] | None = None, keep_gray: bool = False
) -> np.ndarray:
    """Decode one source frame and resize it to ``(height, width, 3)`` uint8 RGB (``INTER_AREA``);
    a gray source stays ``(height, width, 1)`` with ``keep_gray``.

    ``orig_size`` is the expected (width, height) of the source; a different size is an error.
    Raises BadFrameError(path, reason) for missing, zero-byte, truncated, undecodable,
    wrong-size, wrong-channel-count or unreadable files.
    """
    img = read_image(Path(path), keep_gray=keep_gray)
    h, w = img.shape[:2]
    if orig_size is not None and (w, h) != (int(orig_size[0]), int(orig_size[1])):
        raise BadFrameError(path, f"wrong size {w}x{h} (expected {orig_size[0]}x{orig_size[1]})")
    return resize(img, (height, width))
