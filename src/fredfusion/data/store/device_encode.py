"""Store build on the device: source JPEGs decoded in batches (nvJPEG), area-resized and re-encoded there.

Only the JPEG-coded frame kind (RGB by default) takes this path; everything the device cannot take
(a source that is not a plain JPEG of the expected size, a batch the decoder refuses) goes through
the CPU path of ``build.encode_frame``, which also gives a bad frame its reason. On a CPU device the
same code runs with libjpeg-turbo, which is how the suite checks it without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fredfusion.data.frames import BadFrameError, read_bytes, truncation_reason
from fredfusion.data.store.codecs import Codec

_READ_THREADS = 8


def encode_jpeg_batch(images: list[torch.Tensor], quality: int) -> list[bytes]:
    """JPEG bytes of ``(3, H, W)`` uint8 RGB images (on any device): TorchCodec, else torchvision."""
    try:
        from torchcodec.encoders import JpegEncoder
    except ImportError:
        from torchvision.io import encode_jpeg

        return [bytes(t.cpu().numpy()) for t in encode_jpeg(images, quality=quality)]
    return [bytes(JpegEncoder(img).to_tensor(quality=quality).cpu().numpy()) for img in images]


class DeviceJpegEncoder:
    """Encodes batches of source frames of one kind into store JPEGs on ``device``."""

    def __init__(self, device: torch.device, width: int, height: int, codec: Codec) -> None:
        if codec.name != "jpeg":
            raise ValueError(f"the device path encodes JPEG frames, not {codec}")
        self.device, self.width, self.height, self.codec = device, width, height, codec
        self.pool = ThreadPoolExecutor(max_workers=_READ_THREADS)

    def close(self) -> None:
        self.pool.shutdown()

    def _plain_jpeg(self, data: bytes, orig_size: Any) -> bool:
        """True when ``data`` is a whole baseline JPEG of ``orig_size`` (else the CPU path decides)."""
        import simplejpeg

        if truncation_reason(data) or not data.startswith(b"\xff\xd8"):
            return False
        try:
            h, w, _colour, _sub = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return False
        return orig_size is None or (w, h) == (int(orig_size[0]), int(orig_size[1]))

    def _resize(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Area-average each image to the store size (the CPU path's ``INTER_AREA``), rounded."""
        out = []
        for img in images:
            if tuple(img.shape[1:]) == (self.height, self.width):
                out.append(img)
                continue
            small = F.interpolate(img[None].float(), size=(self.height, self.width), mode="area")
            out.append(small[0].round_().clamp_(0, 255).to(torch.uint8))
        return out

    def encode(
        self, paths: Sequence[Path | None], orig_sizes: Sequence[Any], fallback: Any
    ) -> tuple[list[bytes | None], list[tuple[int, str, str]]]:
        """(blob per path, [(index, path, reason)] for bad frames). ``fallback(path, orig_size)`` is the
        CPU encoder for frames the device does not take."""
        from fredfusion.data.device_decode import jpeg_decoder

        def read(path: Path | None) -> bytes | BadFrameError | None:
            if path is None:
                return None
            try:
                return read_bytes(path)
            except BadFrameError as e:
                return e

        datas = list(self.pool.map(read, paths))
        blobs: list[bytes | None] = [None] * len(paths)
        bad: list[tuple[int, str, str]] = []
        on_device = [
            k for k, d in enumerate(datas) if isinstance(d, bytes) and self._plain_jpeg(d, orig_sizes[k])
        ]
        if on_device:
            try:
                _name, decode = jpeg_decoder()
                images = decode(
                    [torch.frombuffer(bytearray(datas[k]), dtype=torch.uint8) for k in on_device], self.device
                )
                encoded = encode_jpeg_batch(self._resize(images), self.codec.level)
            except RuntimeError:
                encoded, on_device = [], []  # the decoder refused the batch: every frame takes the CPU path
            for k, blob in zip(on_device, encoded):
                blobs[k] = blob
        taken = set(on_device)
        for k, data in enumerate(datas):
            if data is None or k in taken:
                continue
            try:
                blobs[k] = fallback(paths[k], orig_sizes[k])
            except BadFrameError as e:
                bad.append((k, str(paths[k]), e.reason))
        return blobs, bad
