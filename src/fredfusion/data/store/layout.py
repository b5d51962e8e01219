"""The frame store on disk: file names, manifests, fingerprints, atomic JSON writes.

Layout of a store folder (format 2; format-1 stores are raw-only and read the same way)::

    manifest.json              size, codec per frame kind, kinds, shard list (written last)
    seq_<id>.<kind>.json       one shard kind (sequence, frame kind): ids, bad frames, codec,
                               fingerprint and, for encoded frames, each frame's offset, size and
                               CRC-32 (written last)
    seq_<id>.<kind>.u8         raw rows (n, H, W, 3), RGB order, in the order of the shard ids
    seq_<id>.<kind>.jpg|.zst   encoded frames, one after another (empty = no frame)

Format 1 kept one ``seq_<id>.json`` for both raw files. A shard kind is valid only when its json
exists with a matching fingerprint and its data file has the expected size. Data files are written
under a temporary name and renamed before the json is written, so an interrupted build never leaves
a shard that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fredfusion.data.store.codecs import Codec

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SHARD_FILE = re.compile(r"^seq_(-?\d+)\.(?:(rgb|event)\.)?(json|u8|jpg|zst)(\..*)?$")


@dataclass(frozen=True)
class FrameRecord:
    """One image of the store: its id, sequence and absolute source paths (None = no frame)."""

    image_id: int
    sequence_id: int
    rgb_path: Path | None
    event_path: Path | None
    orig_size: tuple[int, int] = (1280, 720)

    def path(self, kind: str) -> Path | None:
        """The source file of frame kind ``kind``."""
        return self.rgb_path if kind == "rgb" else self.event_path


def shard_json(sequence_id: int, kind: str | None = None) -> str:
    """The json of one shard kind (format 2), or of a whole format-1 shard (``kind`` None)."""
    return f"seq_{sequence_id}.json" if kind is None else f"seq_{sequence_id}.{kind}.json"


def data_file(sequence_id: int, kind: str, codec: Codec) -> str:
    return f"seq_{sequence_id}.{kind}.{codec.extension}"


def _stat(path: Path | None) -> list[Any]:
    if path is None:
        return [None, None, None]
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def fingerprint(records: Sequence[FrameRecord], kind: str, codec: Codec, width: int, height: int) -> str:
    """Hash of what one shard kind is built from: size, codec and, per record, id, source path, size
    and mtime."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, kind, codec.to_dict(), width, height]).encode())
    for r in records:
        h.update(json.dumps([int(r.image_id), *_stat(r.path(kind)), list(r.orig_size)]).encode())
    return h.hexdigest()


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)
