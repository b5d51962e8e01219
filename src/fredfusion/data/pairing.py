"""Pair RGB frames with event frames by time, attach boxes, and report pairing statistics.

RGB file names carry the wall-clock time of day; event frames and boxes share the recording
clock. Each RGB frame is placed on the event clock by its offset from the first RGB frame plus
the time of the first event frame (so equal clocks reproduce index-based pairing, and a
drifting RGB clock degrades gracefully). Pairs are then formed one-to-one by nearest time.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from fredfusion.data.fred import SequenceIndex

__all__ = [
    "BOX_MATCH_S",
    "DEFAULT_FIRST_FRAME_S",
    "DUAL",
    "EVENT_ONLY",
    "RGB_ONLY",
    "PairedImage",
    "PairedSequence",
    "PairingStats",
    "check_pairing_settings",
    "pair_frames",
    "pair_sequence",
    "place_rgb_on_event_clock",
]

FRAME_PERIOD_S = 1.0 / 30.0
BOX_MATCH_S = FRAME_PERIOD_S / 2.0  # a box time matches an image within half a frame period
DEFAULT_FIRST_FRAME_S = 0.033333  # first frame time on the annotation clock (frame 1)

DUAL = "dual"
RGB_ONLY = "rgb_only"
EVENT_ONLY = "event_only"


def check_pairing_settings(stride: int, tolerance_ms: float) -> None:
    """ValueError unless ``stride >= 1`` and ``tolerance_ms >= 0``."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if tolerance_ms < 0:
        raise ValueError(f"tolerance_ms must be >= 0, got {tolerance_ms}")


def _nearest(ref_t: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each time of ``t``, the nearest time of sorted non-empty ``ref_t`` (ties: the earlier one).

    Returns ``(left, right, nearest, distance)``: the neighbours below and at-or-above (may be -1 or
    ``len(ref_t)``), the index of the nearest one and its distance.
    """
    n = len(ref_t)
    right = np.searchsorted(ref_t, t, side="left")
    left = right - 1
    d_left = np.where(left >= 0, t - ref_t[np.maximum(left, 0)], np.inf)
    d_right = np.where(right < n, ref_t[np.minimum(right, n - 1)] - t, np.inf)
    take_left = d_left <= d_right
    return left, right, np.where(take_left, left, right), np.where(take_left, d_left, d_right)


def place_rgb_on_event_clock(rgb_t: np.ndarray, event_t: np.ndarray) -> np.ndarray:
    """RGB times (seconds of day) moved onto the event clock.

    The first RGB frame is placed at the first event frame's time; the others keep their
    offsets from it. Without event frames the first RGB frame is placed at
    ``DEFAULT_FIRST_FRAME_S`` (the annotation clock's first frame).
    """
    rgb_t = np.asarray(rgb_t, dtype=np.float64)
    if len(rgb_t) == 0:
        return rgb_t.copy()
    start = float(event_t[0]) if len(event_t) else DEFAULT_FIRST_FRAME_S
    return rgb_t - rgb_t[0] + start


def pair_frames(rgb_t: np.ndarray, event_t: np.ndarray, tolerance_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair RGB frames with event frames one-to-one by nearest time.

    Both time arrays must be sorted ascending and on the same clock. The result is the global
    greedy matching: all (rgb, event) edges with ``|dt| <= tolerance_s`` are taken in order of
    increasing ``|dt|`` (ties: lower RGB index, then lower event index) and accepted when both
    frames are still free (among event frames with equal time stamps, which one is taken is
    unspecified). Edges are generated lazily, nearest first, per RGB frame (an RGB frame
    whose nearest event frames are taken tries the next ones outward), so the cost is
    O(n log n) for any tolerance in practice.

    Returns:
        ``(rgb_idx, event_idx)`` int64 arrays of the pairs, sorted by RGB index.
    """
    rgb_t = np.asarray(rgb_t, dtype=np.float64)
    event_t = np.asarray(event_t, dtype=np.float64)
    n_rgb, n_ev = len(rgb_t), len(event_t)
    empty = np.zeros(0, dtype=np.int64)
    if n_rgb == 0 or n_ev == 0 or not tolerance_s >= 0:
        return empty, empty.copy()

    # Nearest event frame of every RGB frame (ties go to the earlier event frame).
    left, right, nearest, d_near = _nearest(event_t, rgb_t)
    ok = d_near <= tolerance_s

    # Fast path: when no two RGB frames share a nearest event frame, greedy accepts every
    # nearest edge within tolerance.
    cand = nearest[ok]
    if len(cand) < 2 or bool(np.all(np.diff(cand) > 0)):
        return np.flatnonzero(ok).astype(np.int64), cand.astype(np.int64)
    return _greedy_lazy(rgb_t, event_t, tolerance_s, left, right, ok)


def _greedy_lazy(
    rgb_t: np.ndarray,
    event_t: np.ndarray,
    tol: float,
    left: np.ndarray,
    right: np.ndarray,
    ok: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact global greedy matching with one pending candidate per RGB frame in a heap."""
    ev = event_t.tolist()
    rt = rgb_t.tolist()
    n_ev = len(ev)
    lo = left.tolist()  # next candidate to the left (index), moves down
    hi = right.tolist()  # next candidate to the right (index), moves up
    event_used = [False] * n_ev
    rgb_match = [-1] * len(rt)

    def next_candidate(i: int) -> tuple[float, int, int] | None:
        li, ri = lo[i], hi[i]
        dl = rt[i] - ev[li] if li >= 0 else float("inf")
        dr = ev[ri] - rt[i] if ri < n_ev else float("inf")
        if dl <= dr:
            if dl > tol:
                return None
            lo[i] = li - 1
            return (dl, i, li)
        if dr > tol:
            return None
        hi[i] = ri + 1
        return (dr, i, ri)

    heap: list[tuple[float, int, int]] = []
    for i in np.flatnonzero(ok).tolist():
        c = next_candidate(i)
        if c is not None:
            heap.append(c)
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        _, i, j = pop(heap)
        if not event_used[j]:
            event_used[j] = True
            rgb_match[i] = j
            continue
        c = next_candidate(i)
        if c is not None:
            push(heap, c)
    match = np.asarray(rgb_match, dtype=np.int64)
    rgb_idx = np.flatnonzero(match >= 0).astype(np.int64)
    return rgb_idx, match[rgb_idx]


@dataclass
class PairingStats:
    """Pairing statistics of one sequence (or, merged, of several).

    ``dual_rate`` is the share of images that have both modalities:
    ``pairs / (pairs + unpaired_rgb + unpaired_event)`` (0.0 when there are no images).
    ``avg_tdiff_ms`` and ``max_tdiff_ms`` are the mean and max of ``|dt|`` over the pairs
    (0.0 when there are none).
    """

    rgb_frames: int = 0
    event_frames: int = 0
    pairs: int = 0
    unpaired_rgb: int = 0
    unpaired_event: int = 0
    dual_rate: float = 0.0
    avg_tdiff_ms: float = 0.0
    max_tdiff_ms: float = 0.0

    @classmethod
    def from_pairs(cls, n_rgb: int, n_event: int, abs_dt_ms: np.ndarray) -> PairingStats:
        """Statistics of a pairing given the frame counts and the ``|dt|`` (ms) of each pair."""
        pairs = len(abs_dt_ms)
        images = n_rgb + n_event - pairs
        return cls(
            rgb_frames=n_rgb,
            event_frames=n_event,
            pairs=pairs,
            unpaired_rgb=n_rgb - pairs,
            unpaired_event=n_event - pairs,
            dual_rate=pairs / images if images else 0.0,
            avg_tdiff_ms=float(np.mean(abs_dt_ms)) if pairs else 0.0,
            max_tdiff_ms=float(np.max(abs_dt_ms)) if pairs else 0.0,
        )

    @classmethod
    def merge(cls, stats: Iterable[PairingStats]) -> PairingStats:
        """Overall statistics: sums of the counts, pair-weighted mean of ``|dt|``, max of maxima."""
        out = cls()
        weighted = 0.0
        for s in stats:
            out.rgb_frames += s.rgb_frames
            out.event_frames += s.event_frames
            out.pairs += s.pairs
            out.unpaired_rgb += s.unpaired_rgb
            out.unpaired_event += s.unpaired_event
            weighted += s.avg_tdiff_ms * s.pairs
            out.max_tdiff_ms = max(out.max_tdiff_ms, s.max_tdiff_ms)
        images = out.pairs + out.unpaired_rgb + out.unpaired_event
        out.dual_rate = out.pairs / images if images else 0.0
        out.avg_tdiff_ms = weighted / out.pairs if out.pairs else 0.0
        return out

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (JSON-ready)."""
        return asdict(self)


@dataclass(slots=True)
class PairedImage:
    """One image of a sequence: a pair, or a lone RGB or event frame, with its boxes.

    ``boxes`` are ``x1, y1, x2, y2`` float32 in original frame pixels. ``time_diff_ms`` is
    ``|dt|`` between the placed RGB time and the event time (None unless ``dual``).
    ``image_id`` is -1 until ids are assigned over a whole prepared folder.
    """

    sequence_id: int
    frame_index: int
    time_s: float
    pair_status: str
    rgb_file_name: str | None
    event_file_name: str | None
    time_diff_ms: float | None
    boxes: np.ndarray
    track_ids: np.ndarray
    drone_models: list[str]
    image_id: int = -1


@dataclass
class PairedSequence:
    """The images of one sequence in time order (after ``stride``) and its statistics.

    ``stats`` and the box counters describe the full pairing, before ``stride`` is applied.
    """

    seq_id: int
    images: list[PairedImage]
    stats: PairingStats
    stride: int = 1
    tolerance_ms: float = 33.0
    n_images_total: int = 0
    boxes_total: int = 0
    boxes_matched: int = 0
    unmatched_boxes: int = 0


def _match_times(image_t: np.ndarray, ref_t: np.ndarray, max_d: float) -> np.ndarray:
    """Index into sorted ``ref_t`` of the nearest time to each image time within ``max_d``, else -1."""
    if len(ref_t) == 0 or len(image_t) == 0:
        return np.full(len(image_t), -1, dtype=np.int64)
    _, _, idx, dist = _nearest(ref_t, image_t)
    return np.where(dist <= max_d + 1e-9, idx, -1).astype(np.int64)


def _timeline(
    rgb_t: np.ndarray, event_t: np.ndarray, ri: np.ndarray, ei: np.ndarray, abs_dt_ms: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Every image of a sequence in time order: pairs (at the event time), lone RGB and lone event frames.

    Returns ``(times, kinds, rgb index, event index, |dt| ms)``; kind 0 is dual, 1 rgb_only, 2
    event_only; an absent frame has index -1, an image that is not a pair has |dt| NaN.
    """
    rgb_paired = np.zeros(len(rgb_t), dtype=bool)
    rgb_paired[ri] = True
    ev_paired = np.zeros(len(event_t), dtype=bool)
    ev_paired[ei] = True
    lone_rgb = np.flatnonzero(~rgb_paired)
    lone_ev = np.flatnonzero(~ev_paired)

    times = np.concatenate([event_t[ei], rgb_t[lone_rgb], event_t[lone_ev]])
    kinds = np.concatenate(
        [np.zeros(len(ei), np.int8), np.ones(len(lone_rgb), np.int8), np.full(len(lone_ev), 2, np.int8)]
    )
    a_idx = np.concatenate([ri, lone_rgb, np.full(len(lone_ev), -1, np.int64)])
    b_idx = np.concatenate([ei, np.full(len(lone_rgb), -1, np.int64), lone_ev])
    dts = np.concatenate([abs_dt_ms, np.full(len(lone_rgb) + len(lone_ev), np.nan)])
    order = np.lexsort((b_idx, a_idx, kinds, times))
    return times[order], kinds[order], a_idx[order], b_idx[order], dts[order]


def _images(
    seq: SequenceIndex,
    timeline: tuple[np.ndarray, ...],
    group: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    stride: int,
) -> list[PairedImage]:
    """Every ``stride``-th image of ``timeline`` with the boxes of its annotation time group
    (``group``: index into the groups that start at ``starts`` and hold ``counts`` rows, or -1)."""
    status_names = (DUAL, RGB_ONLY, EVENT_ONLY)
    rgb_files, ev_files = seq.rgb_files, seq.event_files
    all_boxes, all_tids, all_models = seq.boxes, seq.track_ids, seq.drone_models
    empty_boxes = np.zeros((0, 4), dtype=np.float32)
    empty_ids = np.zeros(0, dtype=np.int64)
    keep = slice(None, None, stride)
    l_times, l_kinds, l_a, l_b, l_dt = (x[keep].tolist() for x in timeline)
    l_g = group[keep].tolist()
    l_starts, l_counts = starts.tolist(), counts.tolist()
    seq_id = seq.seq_id
    images: list[PairedImage] = []
    append = images.append
    for n, (t, kind, a, b, g, dt) in enumerate(zip(l_times, l_kinds, l_a, l_b, l_g, l_dt)):
        if g >= 0:
            s0 = l_starts[g]
            s1 = s0 + l_counts[g]
            boxes, tids, models = all_boxes[s0:s1], all_tids[s0:s1], all_models[s0:s1]
        else:
            boxes, tids, models = empty_boxes, empty_ids, []
        append(
            PairedImage(
                seq_id,
                n * stride,
                t,
                status_names[kind],
                rgb_files[a] if a >= 0 else None,
                ev_files[b] if b >= 0 else None,
                dt if kind == 0 else None,
                boxes,
                tids,
                models,
            )
        )
    return images


def pair_sequence(seq: SequenceIndex, tolerance_ms: float, stride: int = 1) -> PairedSequence:
    """Pair the frames of a sequence and list its images in time order with their boxes.

    Images are the pairs (``dual``, at the event time), the unpaired RGB frames (``rgb_only``,
    at their placed RGB time) and the unpaired event frames (``event_only``), sorted by time;
    ``frame_index`` is the 0-based position in that full list. Boxes are attached from the
    annotation time nearest to the image time within half a frame period (``BOX_MATCH_S``);
    boxes whose time matches no image are counted in ``unmatched_boxes``. ``stride`` keeps every
    ``stride``-th image of the list; the statistics describe the full pairing.
    """
    check_pairing_settings(stride, tolerance_ms)
    rgb_t = place_rgb_on_event_clock(seq.rgb_t, seq.event_t)
    event_t = seq.event_t
    ri, ei = pair_frames(rgb_t, event_t, tolerance_ms / 1000.0)
    abs_dt_ms = np.abs(rgb_t[ri] - event_t[ei]) * 1000.0
    timeline = _timeline(rgb_t, event_t, ri, ei, abs_dt_ms)

    # Boxes: group annotation lines by unique time, match each image to the nearest group.
    box_t = seq.box_t
    uniq_t, starts, counts = np.unique(box_t, return_index=True, return_counts=True)
    group = _match_times(timeline[0], uniq_t, BOX_MATCH_S)
    used = np.zeros(len(uniq_t), dtype=bool)
    used[group[group >= 0]] = True
    boxes_matched = int(counts[used].sum()) if len(uniq_t) else 0
    return PairedSequence(
        seq_id=seq.seq_id,
        images=_images(seq, timeline, group, starts, counts, stride),
        stats=PairingStats.from_pairs(len(rgb_t), len(event_t), abs_dt_ms),
        stride=stride,
        tolerance_ms=float(tolerance_ms),
        n_images_total=len(timeline[0]),
        boxes_total=len(box_t),
        boxes_matched=boxes_matched,
        unmatched_boxes=len(box_t) - boxes_matched,
    )
