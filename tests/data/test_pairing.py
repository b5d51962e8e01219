"""Tests for RGB/Event pairing, box attachment and pairing statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fredfusion.data.fred import SequenceIndex
from fredfusion.data.pairing import (
    PairingStats,
    pair_frames,
    pair_sequence,
    place_rgb_on_event_clock,
)


def brute_force_greedy(rgb_t: np.ndarray, event_t: np.ndarray, tol: float) -> list[tuple[int, int]]:
    """Reference: all edges within tolerance sorted by (|dt|, rgb, event), accepted greedily."""
    edges = sorted(
        (abs(float(r) - float(e)), i, j)
        for i, r in enumerate(rgb_t)
        for j, e in enumerate(event_t)
        if abs(float(r) - float(e)) <= tol
    )
    used_r: set[int] = set()
    used_e: set[int] = set()
    out = []
    for _, i, j in edges:
        if i not in used_r and j not in used_e:
            used_r.add(i)
            used_e.add(j)
            out.append((i, j))
    return sorted(out)


def make_index(
    rgb_offsets_ms: list[float],
    event_us: list[int],
    box_t: list[float] = (),
    seq_id: int = 3,
) -> SequenceIndex:
    rgb_t = 36000.0 + np.asarray(rgb_offsets_ms, dtype=np.float64) / 1000.0
    n_box = len(box_t)
    return SequenceIndex(
        seq_id=seq_id,
        seq_dir=Path("/fred") / str(seq_id),
        rgb_dir=f"{seq_id}/RGB",
        rgb_files=[f"{seq_id}/RGB/r{i}.jpg" for i in range(len(rgb_t))],
        rgb_t=rgb_t,
        event_files=[f"{seq_id}/Event/Frames/e{i}.png" for i in range(len(event_us))],
        event_t=np.asarray(event_us, dtype=np.float64) / 1e6,
        annotation_file=f"{seq_id}/coordinates.txt",
        box_t=np.asarray(box_t, dtype=np.float64),
        boxes=np.tile(np.array([[1, 2, 11, 12]], np.float32), (n_box, 1))
        + np.arange(n_box, dtype=np.float32)[:, None],
        track_ids=np.arange(n_box, dtype=np.int64),
        drone_models=[f"m{i}" for i in range(n_box)],
    )


# ------------------------------------------------------------------------------------------ pair_frames


def test_pair_frames_tolerance_inclusive_and_empty() -> None:
    ri, ei = pair_frames(np.array([0.0]), np.array([0.033]), 0.033)
    assert ri.tolist() == [0] and ei.tolist() == [0]
    ri, ei = pair_frames(np.array([0.0]), np.array([0.0331]), 0.033)
    assert len(ri) == 0 and len(ei) == 0
    ri, ei = pair_frames(np.zeros(0), np.array([1.0]), 0.033)
    assert ri.dtype == np.int64 and len(ri) == 0


def test_pair_frames_conflict_goes_to_nearest_then_outward() -> None:
    # Both RGB frames are nearest to event 1; RGB 1 is nearer, RGB 0 falls back to event 0.
    rgb = np.array([0.105, 0.1])
    rgb.sort()  # [0.1, 0.105]
    ev = np.array([0.08, 0.104, 0.2])
    ri, ei = pair_frames(rgb, ev, 0.03)
    assert list(zip(ri.tolist(), ei.tolist())) == [(0, 0), (1, 1)]
    # With a tolerance that excludes event 0, RGB 0 stays unpaired.
    ri, ei = pair_frames(rgb, ev, 0.015)
    assert list(zip(ri.tolist(), ei.tolist())) == [(1, 1)]


def test_pair_frames_tries_beyond_immediate_neighbours() -> None:
    # Three RGB frames crowd around two events; the third must reach the event two steps away.
    rgb = np.array([0.50, 0.51, 0.52])
    ev = np.array([0.40, 0.505, 0.515, 0.60])
    ri, ei = pair_frames(rgb, ev, 0.2)
    assert sorted(zip(ri.tolist(), ei.tolist())) == brute_force_greedy(rgb, ev, 0.2)
    assert len(ri) == 3


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(st.integers(0, 60), max_size=14, unique=True),
    st.lists(st.integers(0, 60), max_size=14, unique=True),
    st.integers(0, 12),
)
def test_pair_frames_matches_brute_force(rgb_ms: list[int], ev_ms: list[int], tol_ms: int) -> None:
    rgb = np.sort(np.asarray(rgb_ms, dtype=np.float64)) / 1000.0
    ev = np.sort(np.asarray(ev_ms, dtype=np.float64)) / 1000.0
    ri, ei = pair_frames(rgb, ev, tol_ms / 1000.0)
    assert list(zip(ri.tolist(), ei.tolist())) == brute_force_greedy(rgb, ev, tol_ms / 1000.0)
    assert np.all(np.diff(ri) > 0)  # sorted by rgb index, one-to-one
    assert len(set(ei.tolist())) == len(ei)


def test_pair_frames_duplicate_times_stay_one_to_one() -> None:
    ri, ei = pair_frames(np.array([0.048, 0.048]), np.array([0.047, 0.047, 0.047]), 0.002)
    assert ri.tolist() == [0, 1] and sorted(ei.tolist()) in ([0, 1], [0, 2], [1, 2])
    assert len(set(ei.tolist())) == 2


def test_place_rgb_on_event_clock() -> None:
    rgb = np.array([36000.0, 36000.04, 36000.075])
    np.testing.assert_allclose(
        place_rgb_on_event_clock(rgb, np.array([0.033333, 0.066666])), [0.033333, 0.073333, 0.108333]
    )
    np.testing.assert_allclose(place_rgb_on_event_clock(rgb, np.zeros(0)), [0.033333, 0.073333, 0.108333])


# ---------------------------------------------------------------------------------------- pair_sequence

# RGB gaps of 36 ms drift against the 33.333 ms event clock; RGB 1 is a spurious early frame
# (unpaired at the start) and the event recording runs one frame longer (unpaired at the end).
RGB_MS = [0, 8, 40, 76, 112, 148]
EVENT_US = [33333, 66666, 99999, 133332, 166665, 199998]
BOX_T = [0.033333, 0.033333, 0.099999, 0.2, 5.0]


def test_pair_sequence_stats_hand_computed() -> None:
    ps = pair_sequence(make_index(RGB_MS, EVENT_US, BOX_T), tolerance_ms=20.0)
    s = ps.stats
    assert (s.rgb_frames, s.event_frames, s.pairs, s.unpaired_rgb, s.unpaired_event) == (6, 6, 5, 1, 1)
    assert s.dual_rate == pytest.approx(5 / 7)
    # |dt| of the pairs: 0, 6.667, 9.334, 12.001, 14.668 ms
    assert s.avg_tdiff_ms == pytest.approx((0 + 6.667 + 9.334 + 12.001 + 14.668) / 5, abs=1e-6)
    assert s.max_tdiff_ms == pytest.approx(14.668, abs=1e-6)


def test_pair_sequence_images_in_time_order_with_boxes() -> None:
    ps = pair_sequence(make_index(RGB_MS, EVENT_US, BOX_T), tolerance_ms=20.0)
    imgs = ps.images
    assert [im.pair_status for im in imgs] == [
        "dual",
        "rgb_only",
        "dual",
        "dual",
        "dual",
        "dual",
        "event_only",
    ]
    assert [im.frame_index for im in imgs] == list(range(7))
    np.testing.assert_allclose(
        [im.time_s for im in imgs], [0.033333, 0.041333, 0.066666, 0.099999, 0.133332, 0.166665, 0.199998]
    )
    assert [im.rgb_file_name for im in imgs] == [
        "3/RGB/r0.jpg",
        "3/RGB/r1.jpg",
        "3/RGB/r2.jpg",
        "3/RGB/r3.jpg",
        "3/RGB/r4.jpg",
        "3/RGB/r5.jpg",
        None,
    ]
    assert [im.event_file_name for im in imgs] == [
        "3/Event/Frames/e0.png",
        None,
        "3/Event/Frames/e1.png",
        "3/Event/Frames/e2.png",
        "3/Event/Frames/e3.png",
        "3/Event/Frames/e4.png",
        "3/Event/Frames/e5.png",
    ]
    assert imgs[1].time_diff_ms is None and imgs[6].time_diff_ms is None
    assert imgs[2].time_diff_ms == pytest.approx(6.667, abs=1e-6)
    # boxes: two at frame 1 (also seen by the spurious RGB frame 8 ms later), one at frame 3,
    # one at 0.2 s (the lone event frame), one at 5.0 s that matches no image
    assert [len(im.boxes) for im in imgs] == [2, 2, 0, 1, 0, 0, 1]
    np.testing.assert_array_equal(imgs[3].boxes, np.array([[3, 4, 13, 14]], np.float32))
    assert imgs[3].track_ids.tolist() == [2] and imgs[3].drone_models == ["m2"]
    assert (ps.boxes_total, ps.boxes_matched, ps.unmatched_boxes) == (5, 4, 1)
    assert all(im.image_id == -1 and im.sequence_id == 3 for im in imgs)


def test_pair_sequence_stride_keeps_stats() -> None:
    full = pair_sequence(make_index(RGB_MS, EVENT_US, BOX_T), tolerance_ms=20.0)
    ps = pair_sequence(make_index(RGB_MS, EVENT_US, BOX_T), tolerance_ms=20.0, stride=3)
    assert [im.frame_index for im in ps.images] == [0, 3, 6]
    assert ps.stats == full.stats and ps.n_images_total == 7
    with pytest.raises(ValueError, match="stride"):
        pair_sequence(make_index(RGB_MS, EVENT_US), tolerance_ms=20.0, stride=0)


def test_pair_sequence_one_modality_only() -> None:
    ps = pair_sequence(make_index([], [33333, 66666]), tolerance_ms=33.0)
    assert [im.pair_status for im in ps.images] == ["event_only", "event_only"]
    assert ps.stats.dual_rate == 0.0 and ps.stats.avg_tdiff_ms == 0.0 and ps.stats.max_tdiff_ms == 0.0
    ps = pair_sequence(make_index([0, 33], []), tolerance_ms=33.0)
    assert [im.pair_status for im in ps.images] == ["rgb_only", "rgb_only"]
    np.testing.assert_allclose([im.time_s for im in ps.images], [0.033333, 0.066333])
    empty = pair_sequence(make_index([], []), tolerance_ms=33.0)
    assert empty.images == [] and empty.stats.dual_rate == 0.0


def test_stats_merge_weighted() -> None:
    a = PairingStats.from_pairs(4, 5, np.array([1.0, 2.0, 3.0]))
    b = PairingStats.from_pairs(2, 1, np.array([10.0]))
    assert (a.pairs, a.unpaired_rgb, a.unpaired_event) == (3, 1, 2)
    assert a.dual_rate == pytest.approx(3 / 6)
    m = PairingStats.merge([a, b])
    assert (m.rgb_frames, m.event_frames, m.pairs, m.unpaired_rgb, m.unpaired_event) == (6, 6, 4, 2, 2)
    assert m.avg_tdiff_ms == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert m.max_tdiff_ms == 10.0
    assert m.dual_rate == pytest.approx(4 / 8)
    assert PairingStats.merge([]) == PairingStats()
    assert m.to_dict()["pairs"] == 4
