"""The frame store: every frame decoded once, resized to the training size, kept compressed.

``build`` writes it (parallel, resumable, one unit per sequence and frame kind), ``reader`` reads it
(random access by image id, CPU decoding or checked bytes for the device), ``codecs`` says how a frame
is kept and ``layout`` where.
"""

from fredfusion.data.store.build import StoreReport, StoreSpaceError, build_store
from fredfusion.data.store.codecs import AUTO, RAW, Codec, CorruptFrame, parse_codecs
from fredfusion.data.store.layout import FORMAT_VERSION, MANIFEST_NAME, FrameRecord
from fredfusion.data.store.reader import EncodedFrames, FrameStore

__all__ = [
    "AUTO",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "RAW",
    "Codec",
    "CorruptFrame",
    "EncodedFrames",
    "FrameRecord",
    "FrameStore",
    "StoreReport",
    "StoreSpaceError",
    "build_store",
    "parse_codecs",
]
