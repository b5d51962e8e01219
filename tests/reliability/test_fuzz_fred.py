"""Fuzzing of the FRED annotation and file-name parsers (hypothesis).

No input crashes them: arbitrary bytes, mutated lines and arbitrary names only ever end up as
kept boxes / frames or as reported problems. Every data line that yields no box has exactly one
``file:line: reason`` entry.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fredfusion.data.fred import (
    _parse_event_names,
    _parse_rgb_names,
    parse_annotations,
    read_sequence,
)

PATH = "/fred/17/coordinates.txt"
PROBLEM_RE = re.compile(r"^/fred/17/coordinates\.txt:(\d+): \S.*$", re.DOTALL)
UTF8_NOTE = "invalid UTF-8 bytes (replaced)"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _line_count(data: bytes) -> int:
    text = data.decode("utf-8-sig", errors="replace")
    return len(re.split(r"\r\n|\r|\n", text))


def check_invariants(data: bytes, width: int = 1280, height: int = 720) -> None:
    """Parse ``data`` and check everything that must hold whatever the input."""
    a = parse_annotations(data, PATH, width, height)
    n = len(a.box_t)
    assert a.boxes.shape == (n, 4) and a.boxes.dtype == np.float32
    assert a.track_ids.shape == (n,) and a.track_ids.dtype == np.int64
    assert len(a.drone_models) == n and all(isinstance(m, str) for m in a.drone_models)
    assert np.isfinite(a.box_t).all() and (a.box_t >= 0).all()
    assert (np.diff(a.box_t) >= 0).all()
    b = a.boxes
    assert np.isfinite(b).all()
    assert ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= width) & (b[:, 3] <= height)).all()
    assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
    # every data line is kept, malformed, dropped or a repeat; each one not kept is reported once
    assert n + a.n_malformed + a.n_dropped_empty + a.n_duplicates == a.n_lines
    lines = _line_count(data)
    reasons = []
    for p in a.problems:
        m = PROBLEM_RE.match(p)
        assert m, p
        assert 1 <= int(m.group(1)) <= lines, (p, lines)
        reasons.append((int(m.group(1)), p.split(": ", 1)[1]))
    not_kept = [ln for ln, r in reasons if r != UTF8_NOTE]
    assert len(not_kept) == len(set(not_kept)) == a.n_lines - n
    assert [ln for ln, _ in reasons] == sorted(ln for ln, _ in reasons)
    assert 0 <= a.n_clipped <= n


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    check_invariants(data)


_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64).map(repr),
    st.floats(-50, 1400).map(lambda v: f"{v:.3f}"),
    st.integers(-(10**25), 10**25).map(str),
    st.sampled_from(["nan", "-inf", "1e999", "", " ", "1_0", "0x10", "--1", "1.2.3", "１"]),
)
_TAIL = st.one_of(
    st.just(""),
    _NUMBER.map(lambda v: f", {v}"),
    st.tuples(_NUMBER, st.text(max_size=12)).map(lambda t: f", {t[0]}, {t[1]}"),
    st.text(max_size=20).map(lambda t: f", {t}"),
)
_LINE = st.one_of(
    st.tuples(_NUMBER, _NUMBER, _NUMBER, _NUMBER, _NUMBER, _TAIL).map(
        lambda p: f"{p[0]}: {p[1]}, {p[2]}, {p[3]}, {p[4]}{p[5]}"
    ),
    st.text(max_size=40),
    st.sampled_from(["", "# comment", ":", "1.0:", "1.0: 1, 2, 3", ",,,,", "\x00", "\ufeff1.0: 1,2,3,4"]),
)
_SEPARATOR = st.sampled_from(["\n", "\r\n", "\r"])


@FUZZ
@given(st.lists(st.tuples(_LINE, _SEPARATOR), max_size=25), st.sampled_from([(1280, 720), (64, 36)]))
def test_mutated_annotation_lines_never_crash(lines: list[tuple[str, str]], size: tuple[int, int]) -> None:
    text = "".join(line + sep for line, sep in lines)
    check_invariants(text.encode("utf-8", errors="surrogatepass"), *size)


@FUZZ
@given(st.lists(st.tuples(_LINE, st.binary(max_size=3)), max_size=10))
def test_lines_with_invalid_utf8_are_reported(lines: list[tuple[str, bytes]]) -> None:
    data = b"".join(line.encode("utf-8", errors="surrogatepass") + junk + b"\n" for line, junk in lines)
    check_invariants(data)


_COORD = st.integers(0, 1279)


@st.composite
def _valid_rows(draw: st.DrawFn) -> list[tuple[int, int, int, int, int, int]]:
    rows = []
    for k in range(draw(st.integers(0, 15))):
        x1, y1 = draw(st.integers(0, 1279)), draw(st.integers(0, 719))
        x2, y2 = draw(st.integers(x1 + 1, 1280)), draw(st.integers(y1 + 1, 720))
        frame = draw(st.integers(1, 9000))
        rows.append((frame, x1, y1, x2, y2, k))  # track ids unique: no line repeats another
    return rows


@FUZZ
@given(_valid_rows(), st.sampled_from(["DJI Mini 2", "Betafpv air75", ""]))
def test_valid_lines_round_trip(rows: list[tuple[int, ...]], model: str) -> None:
    text = "".join(
        f"{frame * 0.033333:.6f}: {x1}.0, {y1}.0, {x2}.0, {y2}.0, {tid}, {model}\n"
        for frame, x1, y1, x2, y2, tid in rows
    )
    a = parse_annotations(text.encode(), PATH)
    assert a.problems == [] and len(a.box_t) == len(rows) and a.n_clipped == 0
    order = sorted(range(len(rows)), key=lambda i: (round(rows[i][0] * 0.033333, 6), i))
    expect = np.array([rows[i][1:5] for i in order], np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(a.boxes, expect)
    np.testing.assert_array_equal(a.track_ids, [rows[i][5] for i in order])
    np.testing.assert_allclose(a.box_t, [round(rows[i][0] * 0.033333, 6) for i in order])
    assert a.drone_models == [model] * len(rows)


_DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=3)
_RGB_LIKE = st.builds(
    lambda pre, h, m, sec, frac, ext: f"{pre}{h}_{m}_{sec}{frac}.{ext}",
    st.sampled_from(["", "Video_5_", "Video__", "video_12_"]),
    _DIGITS,
    _DIGITS,
    _DIGITS,
    st.sampled_from(["", ".", ".5", ".033333", ".12345678901234567890"]),
    st.sampled_from(["jpg", "JPEG", "png", "jpg.tmp"]),
)
_EVENT_LIKE = st.builds(
    lambda mid, t, ext: f"Video_3_{mid}{t}.{ext}",
    st.sampled_from(["", "frame_", "frame", "FRAME_"]),
    st.text(alphabet="0123456789", min_size=0, max_size=25),
    st.sampled_from(["png", "PNG", "jpg"]),
)
_NAME = st.one_of(
    st.text(max_size=30),
    _RGB_LIKE,
    _EVENT_LIKE,
    st.sampled_from(  # other Unicode digits, which int() and float() would read
        [
            "Video_\u0663_10_00_00.5.jpg",
            "10_\u0661\u0662_00.5.jpg",
            "Video_1_frame_\u0663\u0663.png",
            "Video_1_\uff11.png",
            "Video_1_frame_5.png\n",
        ]
    ),
)


@FUZZ
@given(st.lists(_NAME, max_size=20))
def test_name_parsers_never_crash_and_partition_the_names(names: list[str]) -> None:
    kept, times, bad = _parse_rgb_names(names)
    assert len(kept) == len(times) and sorted(kept + bad) == sorted(names)
    assert all(math.isfinite(t) and 0 <= t < 86400 for t in times)
    assert all(n.isascii() for n in kept)  # ASCII digits only: int() also reads other digits
    kept_e, times_e, bad_e = _parse_event_names(names)
    assert len(kept_e) == len(times_e) and sorted(kept_e + bad_e) == sorted(names)
    assert all(n.isascii() for n in kept_e)
    assert all(isinstance(t, int) and 0 <= t < 2**63 for t in times_e)
    np.asarray(times_e, dtype=np.int64)  # what _read_events does with them


@FUZZ
@given(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59_999_999), st.booleans())
def test_rgb_name_round_trip(h: int, m: int, micro_s: int, prefix: bool) -> None:
    name = f"{'Video_4_' if prefix else ''}{h:02d}_{m:02d}_{micro_s / 1e6:09.6f}.jpg"
    kept, times, bad = _parse_rgb_names([name])
    assert kept == [name] and bad == []
    assert times[0] == h * 3600 + m * 60 + micro_s / 1e6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_read_sequence_survives_any_annotation_file(tmp_path: Path, data: bytes) -> None:
    seq_dir = tmp_path / "17"
    seq_dir.mkdir(exist_ok=True)
    (seq_dir / "coordinates.txt").write_bytes(data)
    seq = read_sequence(seq_dir, tmp_path)
    assert seq.annotation_file == "17/coordinates.txt"
    assert len(seq.box_t) == len(seq.boxes) == len(seq.track_ids)
    assert all(p.startswith(str(seq_dir)) for p in seq.problems)
