"""JPEG frames of the frame store decoded on the device in one batched call (nvJPEG on CUDA).

TorchCodec is the maintained successor of torchvision's image codecs (deprecated from torchvision 0.29)
and is used when installed (the ``gpu`` extra); torchvision's ``decode_jpeg`` otherwise. Both take the
encoded bytes on the CPU and return ``(3, H, W)`` uint8 RGB tensors on the device; on the CPU they run
libjpeg-turbo, which is how the suite checks this path without a GPU.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from fredfusion.data.store import EncodedFrames

Decoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def torchcodec_decoder() -> Decoder:
    """TorchCodec's batched JPEG decoder (ImportError when TorchCodec is not installed)."""
    from torchcodec.decoders import decode_jpeg

    return lambda data, device: decode_jpeg(data, mode="RGB", device=device)


def torchvision_decoder() -> Decoder:
    """torchvision's batched JPEG decoder (deprecated from torchvision 0.29, present through it)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


@functools.cache
def jpeg_decoder() -> tuple[str, Decoder]:
    """(library name, batched decoder): TorchCodec when importable, else torchvision.io."""
    try:
        return "torchcodec", torchcodec_decoder()
    except ImportError:
        return "torchvision", torchvision_decoder()


def decode_frames(
    frames: EncodedFrames, hw: tuple[int, int], device: torch.device, decoder: Decoder | None = None
) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 on ``device`` from a batch of encoded JPEG frames; an empty frame (none, or
    a bad image) is zeros. The frames were checked (CRC-32) when read; their size is the store's.
    ``decoder`` defaults to ``jpeg_decoder()``."""
    data = torch.as_tensor(frames.data)
    sizes = [int(s) for s in frames.sizes]
    out = torch.zeros((len(sizes), 3, *hw), dtype=torch.uint8, device=device)
    present = [k for k, s in enumerate(sizes) if s]
    if not present:
        return out
    parts = torch.split(data, sizes)
    decode = decoder or jpeg_decoder()[1]
    images = decode([parts[k] for k in present], device)
    index = torch.as_tensor(present, device=device)
    out.index_copy_(0, index, torch.stack(images))
    return out
