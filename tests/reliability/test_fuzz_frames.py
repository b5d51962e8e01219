"""Fuzzing of the frame decoder the store build uses: damaged JPEG/PNG bytes never crash prepare.

Whatever the bytes, ``read_frame`` returns a frame of the asked size or raises BadFrameError
(which prepare reports and excludes); any other exception would stop the whole store build.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fredfusion.data.frames import BadFrameError, read_frame

W, H = 64, 36
_IMG = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
SOURCES = {ext: cv2.imencode(ext, _IMG)[1].tobytes() for ext in (".jpg", ".png")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(sorted(SOURCES)),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.floats(0, 1)),
)
def test_damaged_frames_decode_or_are_bad(
    tmp_path: Path, ext: str, flips: list[tuple[float, int]], cut: float | None
) -> None:
    data = bytearray(SOURCES[ext])
    for where, value in flips:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / f"frame{ext}"
    path.write_bytes(bytes(data))
    try:
        frame = read_frame(path, W // 2, H // 2, orig_size=(W, H))
    except BadFrameError as exc:
        assert exc.path == path and exc.reason
    else:
        assert frame.shape == (H // 2, W // 2, 3) and frame.dtype == np.uint8


@pytest.mark.parametrize("ext", sorted(SOURCES))
def test_undamaged_source_decodes(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"frame{ext}"
    path.write_bytes(SOURCES[ext])
    assert read_frame(path, W, H, orig_size=(W, H)).shape == (H, W, 3)
