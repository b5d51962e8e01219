"""Synthetic FRED-layout sequences: the built-in sample and the test fixture.

The sample is written in the exact on-disk layout of FRED (see ``FRED_FORMAT.md``)::

    <seq>/RGB/Video_<id>_<HH>_<MM>_<SS.ffffff>.jpg
    <seq>/Event/Frames/Video_<id>_frame_<t_us>.png
    <seq>/coordinates.txt           "time: x1, y1, x2, y2, id, class"
    <seq>/conditions.json           side file, not FRED's: the sequence's scenario and its conditions

One scene is simulated per sequence on the event clock (one step per 33333 us). Event frames are
thresholded log-brightness changes between consecutive simulated steps (plus hot pixels and
background activity); RGB frames are snapshots of the same scene at the step nearest to their
wall-clock time, seen through a camera model (exposure, sensor noise, JPEG). Each sequence follows a
scenario (day, night, hover, clutter, noise, multi, optionally with edge and/or small) chosen so that
each modality fails somewhere. The scenario's parts are the sequence's conditions
(``data.conditions``), which ``eval`` reports AP by.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from fredfusion.data.conditions import write_conditions

__all__ = [
    "CANONICAL_TEST_IDS",
    "DRONE_MODELS",
    "EVENT_PERIOD_US",
    "SampleInfo",
    "SequenceInfo",
    "default_sequence_ids",
    "plan_scenarios",
    "scenario_names",
    "write_sample",
    "write_sequence",
]

#: Canonical FRED test sequence ids (every other id of 0..230 is train).
CANONICAL_TEST_IDS: tuple[int, ...] = (
    8, 9, 12, 20, 21, 29, 34, 39, 41, 46, 51, 60, 63, 64, 65, 80, 83, 90, 93, 110, 111, 114,
    115, 127, 128, 129, 138, 139, 142, 152, 153, 154, 162, 163, 167, 178, 179, 187, 194, 195,
    196, 202, 210, 217, 219, 223, 230,
)  # fmt: skip
_NUM_FRED_IDS = 231

#: Drone models written in the ``class`` column.
DRONE_MODELS: tuple[str, ...] = (
    "DJI Mini 2",
    "DJI Mini 3",
    "DJI Tello EDU",
    "Betafpv air75",
    "DarwinFPV cineape20",
)
# model -> (drawing kind, box aspect h/w range)
_MODEL_STYLE: dict[str, tuple[str, tuple[float, float]]] = {
    "DJI Mini 2": ("dji", (0.55, 0.70)),
    "DJI Mini 3": ("dji", (0.50, 0.65)),
    "DJI Tello EDU": ("tello", (0.70, 0.85)),
    "Betafpv air75": ("fpv", (0.60, 0.75)),
    "DarwinFPV cineape20": ("fpv", (0.55, 0.70)),
}

#: Event frame period in microseconds (event frame k is named ``k * EVENT_PERIOD_US``).
EVENT_PERIOD_US = 33333
_RGB_GAP_US = (33400, 40000)  # RGB wall-clock gaps; >= one event period, so no two share a step
_JPEG_QUALITY = 90
# event frames are mostly black: no row filter + run-length zlib is ~4x faster than the defaults
_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    3,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_NONE,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
]
_PRIMARY = ("day", "night", "hover", "clutter", "noise", "multi")
_MODIFIERS = ("edge", "small")
_MODIFIER_HOSTS = ("night", "clutter", "noise", "multi")
_EVENT_THRESHOLD = 0.2  # log-intensity contrast threshold
_LOG_LUT = np.log(np.arange(256, dtype=np.float32) + 10.0)
_POS_BGR = np.array([255, 96, 32], dtype=np.uint8)  # brightness up: blue-ish
_NEG_BGR = np.array([40, 48, 235], dtype=np.uint8)  # brightness down: red-ish
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_SUB = 1 << _SHIFT


@dataclass(frozen=True)
class SequenceInfo:
    """What was written for one sequence."""

    sequence_id: int
    path: Path
    scenario: str
    split: str | None  # "train" / "test" in the official layout, None in the flat layout
    rgb_frames: int
    event_frames: int
    boxes: int

    @property
    def conditions(self) -> tuple[str, ...]:
        """The scenario's parts (``night+small`` -> night, small), as written to ``conditions.json``."""
        return tuple(self.scenario.split("+"))


@dataclass(frozen=True)
class SampleInfo:
    """What :func:`write_sample` wrote."""

    out: Path
    layout: str
    sequences: tuple[SequenceInfo, ...]

    @property
    def sequence_ids(self) -> list[int]:
        """Sequence ids in writing order."""
        return [s.sequence_id for s in self.sequences]

    @property
    def scenarios(self) -> list[str]:
        """Scenario name of each sequence (same order as :attr:`sequence_ids`)."""
        return [s.scenario for s in self.sequences]

    @property
    def rgb_frames(self) -> int:
        """Total RGB frames written."""
        return sum(s.rgb_frames for s in self.sequences)

    @property
    def event_frames(self) -> int:
        """Total event frames written."""
        return sum(s.event_frames for s in self.sequences)

    @property
    def boxes(self) -> int:
        """Total annotation lines written."""
        return sum(s.boxes for s in self.sequences)


def scenario_names() -> tuple[str, ...]:
    """All scenario names; a sequence's scenario is one primary name, optionally ``+edge``/``+small``."""
    return _PRIMARY + _MODIFIERS


def plan_scenarios(sequences: int, seed: int = 0) -> list[str]:
    """Scenario name per sequence, deterministic for ``seed``; all names appear when ``sequences >= 6``.

    The plan is prefix-stable: the first ``n`` entries do not depend on ``sequences``.
    """
    if sequences < 0:
        raise ValueError(f"sequences must be >= 0, got {sequences}")
    _check_seed(seed)
    rng = np.random.default_rng([seed, 0x5CE])
    primaries = [str(p) for p in rng.permutation(_PRIMARY)]
    hosts = [i for i, p in enumerate(primaries) if p in _MODIFIER_HOSTS]
    host_order = [hosts[i] for i in rng.permutation(len(hosts))]
    modifiers: dict[int, list[str]] = {}
    for mod, pos in zip(_MODIFIERS, host_order):
        modifiers.setdefault(pos, []).append(mod)
    names = []
    for i in range(sequences):
        if i < len(primaries):
            names.append("+".join([primaries[i], *modifiers.get(i, [])]))
            continue
        prim = str(rng.choice(_PRIMARY, p=[0.3, 0.14, 0.14, 0.14, 0.14, 0.14]))
        mods = [m for m in _MODIFIERS if rng.random() < 0.25 and prim != "hover"]
        names.append("+".join([prim, *mods]))
    return names


def default_sequence_ids(sequences: int, layout: str = "flat", seed: int = 0) -> list[int]:
    """Default sequence ids: ``0..n-1`` (flat) or a sorted mix of canonical test and train FRED ids."""
    _check_layout(layout)
    if sequences < 1:
        raise ValueError(f"sequences must be >= 1, got {sequences}")
    if layout == "flat":
        return list(range(sequences))
    if sequences > _NUM_FRED_IDS:
        raise ValueError(f"the official layout has at most {_NUM_FRED_IDS} sequences, got {sequences}")
    _check_seed(seed)
    rng = np.random.default_rng([seed, 0x1D5])
    test_pool = [int(i) for i in rng.permutation(CANONICAL_TEST_IDS)]
    train_ids = [i for i in range(_NUM_FRED_IDS) if i not in set(CANONICAL_TEST_IDS)]
    train_pool = [int(i) for i in rng.permutation(train_ids)]
    n_test = 0 if sequences < 2 else max(1, sequences // 4)
    n_test = max(n_test, sequences - len(train_pool))
    return sorted(test_pool[:n_test] + train_pool[: sequences - n_test])


def write_sample(
    out: Path,
    sequences: int = 6,
    frames: int = 90,
    width: int = 1280,
    height: int = 720,
    seed: int = 0,
    layout: str = "flat",
    sequence_ids: Sequence[int] | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> SampleInfo:
    """Write a synthetic FRED-layout sample under ``out`` and describe it.

    ``frames`` is the number of RGB frames per sequence; the event recording covers the RGB span
    (RGB gaps are 33.4-40 ms, events every 33.333 ms) plus 2-6 frames. ``layout`` is ``"flat"``
    (``out/<id>/``) or ``"official"`` (``out/train/<id>/``, ``out/test/<id>/`` by the canonical
    test list). ``sequence_ids``, when given, replaces ``sequences`` and the default ids. Files
    this function writes that already exist in a target sequence folder are replaced; stale
    ``RGB/*.jpg`` and ``Event/Frames/*.png`` there are removed. Same arguments, same bytes, with
    any number of ``workers`` (threads writing whole sequences; default: one per CPU core).
    """
    _check_layout(layout)
    _check_seed(seed)
    _check_dims(frames, width, height)
    if sequence_ids is None:
        ids = default_sequence_ids(sequences, layout, seed)
    else:
        ids = _check_ids(sequence_ids, layout)
    out = Path(out)
    scenarios = plan_scenarios(len(ids), seed)
    test_ids = set(CANONICAL_TEST_IDS)
    jobs = []
    for sid, scenario in zip(ids, scenarios):
        split = None
        seq_dir = out / str(sid)
        if layout == "official":
            split = "test" if sid in test_ids else "train"
            seq_dir = out / split / str(sid)
        jobs.append((seq_dir, sid, scenario, split))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="synth", unit="seq")
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    # each sequence has its own RNG, and OpenCV's encoders and numpy's array work release the GIL,
    # so whole sequences written by threads give the same bytes in less time
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(write_sequence, seq_dir, sid, scenario, frames, width, height, seed)
            for seq_dir, sid, scenario, _split in jobs
        ]
        try:
            for future in as_completed(futures):
                future.result()
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
    written = [replace(f.result(), split=job[3]) for f, job in zip(futures, jobs)]
    return SampleInfo(out=out, layout=layout, sequences=tuple(written))


def write_sequence(
    seq_dir: Path,
    sequence_id: int,
    scenario: str,
    frames: int = 90,
    width: int = 1280,
    height: int = 720,
    seed: int = 0,
) -> SequenceInfo:
    """Write one synthetic FRED sequence folder ``seq_dir`` for a scenario such as ``"night+edge"``
    (its parts are written to ``seq_dir/conditions.json``)."""
    flags = _parse_scenario(scenario)
    _check_seed(seed)
    _check_dims(frames, width, height)
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | np.integer) or sequence_id < 0:
        raise ValueError(f"sequence_id must be a non-negative int, got {sequence_id!r}")
    sid = int(sequence_id)
    rng = np.random.default_rng([seed, sid, 0x5E0])
    seq_dir = Path(seq_dir)
    rgb_dir = seq_dir / "RGB"
    ev_dir = seq_dir / "Event" / "Frames"
    _clear_stale(seq_dir)
    rgb_dir.mkdir(parents=True, exist_ok=True)
    ev_dir.mkdir(parents=True, exist_ok=True)

    wall_us, rgb_step, n_steps = _clocks(rng, frames, flags["night"])
    sim = _Simulation(rng, width, height, n_steps, flags)
    rgb_at = {int(k): j for j, k in enumerate(rgb_step)}
    lines: list[str] = []
    prev_gray: np.ndarray | None = None
    for k in range(n_steps + 1):
        scene = sim.render(k)
        gray = cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)
        if prev_gray is not None:
            ev = sim.events(k, prev_gray, gray)
            _write_image(ev_dir / f"Video_{sid}_frame_{k * EVENT_PERIOD_US}.png", ev, png=True)
            lines.extend(sim.annotation_lines(k))
        j = rgb_at.get(k)
        if j is not None:
            name = _rgb_name(sid, int(wall_us[j]))
            _write_image(rgb_dir / name, sim.camera(scene), png=False)
        prev_gray = gray
    (seq_dir / "coordinates.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    write_conditions(seq_dir, scenario.split("+"), scenario=scenario, source="fredfusion synth")
    return SequenceInfo(
        sequence_id=sid,
        path=seq_dir,
        scenario=scenario,
        split=None,
        rgb_frames=frames,
        event_frames=n_steps,
        boxes=len(lines),
    )


# ----------------------------------------------------------------------------------------------
# argument checks and small helpers


def _check_layout(layout: str) -> None:
    if layout not in ("flat", "official"):
        raise ValueError(f"layout must be 'flat' or 'official', got {layout!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _check_dims(frames: int, width: int, height: int) -> None:
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if width < 16 or height < 16:
        raise ValueError(f"width and height must be >= 16, got {width}x{height}")


def _check_ids(sequence_ids: Sequence[int], layout: str) -> list[int]:
    ids = list(sequence_ids)
    if not ids:
        raise ValueError("sequence_ids is empty")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or i < 0:
            raise ValueError(f"sequence ids must be non-negative ints, got {i!r}")
        if layout == "official" and i >= _NUM_FRED_IDS:
            raise ValueError(f"the official layout needs FRED ids 0..{_NUM_FRED_IDS - 1}, got {i}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"sequence_ids has duplicates: {ids}")
    return [int(i) for i in ids]


def _parse_scenario(scenario: str) -> dict[str, bool]:
    parts = scenario.split("+") if isinstance(scenario, str) else []
    if not parts or parts[0] not in _PRIMARY or any(p not in _MODIFIERS for p in parts[1:]):
        raise ValueError(
            f"unknown scenario {scenario!r}: expected one of {', '.join(_PRIMARY)} "
            f"optionally followed by +edge and/or +small"
        )
    flags = dict.fromkeys(scenario_names(), False)
    for p in parts:
        flags[p] = True
    return flags


def _clear_stale(seq_dir: Path) -> None:
    for pattern in ("RGB/*.jpg", "Event/Frames/*.png"):
        for f in seq_dir.glob(pattern):
            f.unlink()


def _write_image(path: Path, img: np.ndarray, png: bool) -> None:
    if png:
        ok, buf = cv2.imencode(".png", img, _PNG_PARAMS)
    else:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def _rgb_name(sid: int, wall_us: int) -> str:
    hh, rem = divmod(wall_us % 86_400_000_000, 3_600_000_000)
    mm, rem = divmod(rem, 60_000_000)
    ss, us = divmod(rem, 1_000_000)
    return f"Video_{sid}_{hh:02d}_{mm:02d}_{ss:02d}.{us:06d}.jpg"


def _fmt_time(k: int) -> str:
    """``k * 0.033333`` with up to 6 decimals (exact, from integer microseconds)."""
    us = k * EVENT_PERIOD_US
    frac = f"{us % 1_000_000:06d}".rstrip("0") or "0"
    return f"{us // 1_000_000}.{frac}"


def _clocks(rng: np.random.Generator, frames: int, night: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """RGB wall-clock times (us of day), the event step each RGB frame shows, and the event frame count."""
    gaps = rng.integers(_RGB_GAP_US[0], _RGB_GAP_US[1] + 1, size=frames - 1)
    offsets = np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64)
    lo_h, hi_h = (20.5, 23.0) if night else (7.0, 19.0)
    start = int(rng.integers(int(lo_h * 3600e6), int(hi_h * 3600e6)))
    start = max(0, min(start, 86_400_000_000 - int(offsets[-1]) - 1_000_000))
    step = 1 + (offsets + EVENT_PERIOD_US // 2) // EVENT_PERIOD_US
    n_steps = int(step[-1]) + int(rng.integers(2, 7))
    return start + offsets, step, n_steps


def _ou(rng: np.random.Generator, n: int, a: float, sigma: float) -> np.ndarray:
    """Stationary AR(1) sequence of length ``n`` with marginal std ``sigma`` and correlation ``a``."""
    eps = rng.standard_normal(n)
    out = np.empty(n)
    v = eps[0] * sigma
    b = sigma * math.sqrt(1.0 - a * a)
    for i in range(n):
        if i:
            v = a * v + b * eps[i]
        out[i] = v
    return out


def _lowfreq(rng: np.random.Generator, size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Smooth unit-ish noise of ``size`` (h, w) from a random ``grid`` (gh, gw) upsampled bicubically."""
    small = rng.standard_normal((max(2, grid[0]), max(2, grid[1]))).astype(np.float32)
    return cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(x * _SUB), round(y * _SUB)


def _axes(a: float, b: float) -> tuple[int, int]:
    return max(1, round(a * _SUB)), max(1, round(b * _SUB))


def _color(v: np.ndarray) -> tuple[int, int, int]:
    return int(v[0]), int(v[1]), int(v[2])


# ----------------------------------------------------------------------------------------------
# the simulated scene


@dataclass
class _Track:
    track_id: int
    model: str
    kind: str
    cx: np.ndarray  # per step 0..n_steps
    cy: np.ndarray
    w: np.ndarray
    h: np.ndarray
    active: np.ndarray
    body: tuple[int, int, int]
    rotor: tuple[int, int, int]


@dataclass
class _Bird:
    x: np.ndarray
    y: np.ndarray
    span: float
    period: float
    phase: float
    color: tuple[int, int, int]


@dataclass
class _Foliage:
    ax: float  # anchor
    ay: float
    leaves: np.ndarray  # (m, 5): dx, dy, semi-axis a, semi-axis b, angle
    colors: list[tuple[int, int, int]]
    amp: float
    period: float
    phase: float
    rect: tuple[int, int, int, int]


class _Simulation:
    """One sequence's scene on the event clock: background, drones, distractors, sensor models."""

    def __init__(
        self, rng: np.random.Generator, width: int, height: int, n_steps: int, flags: dict[str, bool]
    ) -> None:
        self.rng = rng
        self.w, self.h = width, height
        self.n = n_steps
        self.flags = flags
        self.s = width / 1280.0
        clutter = flags["clutter"]
        self.horizon = height * float(rng.uniform(0.5, 0.64) if clutter else rng.uniform(0.64, 0.82))
        self.background = self._background(clutter)
        self.tracks = self._tracks()
        self.birds = self._birds() if clutter else []
        self.foliage = self._foliage() if clutter else []
        # camera (RGB) model
        if flags["night"]:
            self.gain, self.bias, sigma = float(rng.uniform(0.04, 0.08)), float(rng.uniform(1, 4)), 3.5
        else:
            self.gain, self.bias, sigma = float(rng.uniform(0.92, 1.08)), float(rng.uniform(-8, 8)), 2.5
        if flags["noise"]:
            sigma = float(rng.uniform(16, 24))
        self._pad = 32
        noise = rng.standard_normal((height + self._pad, width + self._pad, 3), dtype=np.float32) * sigma
        noise = np.rint(noise)
        self._noise_pos = np.clip(noise, 0, 255).astype(np.uint8)
        self._noise_neg = np.clip(-noise, 0, 255).astype(np.uint8)
        # event sensor model: background activity rate and hot pixels
        rate = 2e-4
        if flags["night"]:
            rate *= 2
        if flags["noise"]:
            rate *= 15
        self.ba_rate = rate
        n_hot = max(1, round(width * height * (1e-4 if flags["noise"] else 2e-5)))
        self.hot_idx = rng.integers(0, width * height, n_hot)
        self.hot_pos = rng.random(n_hot) < 0.5

    # -- setup -------------------------------------------------------------------------------
    def _background(self, clutter: bool) -> np.ndarray:
        rng, w, h = self.rng, self.w, self.h
        y = np.arange(h, dtype=np.float32)[:, None]
        if rng.random() < 0.3:  # overcast
            top = np.full(3, 180.0) + rng.uniform(-12, 12)
            low = np.full(3, 212.0) + rng.uniform(-10, 10)
        else:
            top = np.array([205.0, 160.0, 115.0]) + rng.uniform(-20, 20, 3)
            low = np.array([232.0, 215.0, 198.0]) + rng.uniform(-12, 12, 3)
        t = np.clip(y / self.horizon, 0, 1)[..., None]
        sky = (top * (1 - t) + low * t).astype(np.float32)  # (h, 1, 3)
        clouds = _lowfreq(rng, (h, w), (4, 7)) * float(rng.uniform(6, 16))
        clouds += _lowfreq(rng, (h, w), (12, 21)) * float(rng.uniform(3, 8))
        sky = sky + clouds[..., None]
        # horizon profile: hills plus a tree line
        xs = np.linspace(0, 1, w, dtype=np.float32)
        hills = np.interp(xs, np.linspace(0, 1, 6), rng.standard_normal(6)) * 0.03 * h
        trees = np.interp(xs, np.linspace(0, 1, max(8, w // 12)), rng.standard_normal(max(8, w // 12)))
        hy = (self.horizon + hills + trees * (0.02 if clutter else 0.008) * h).astype(np.float32)
        ground_col = (np.array([72.0, 118.0, 98.0]) + rng.uniform(-15, 15, 3)).astype(np.float32)
        depth = np.clip((y - hy[None, :]) / np.float32(0.35 * h), 0, 1)  # 0 at the horizon
        tex_amp = 34.0 if clutter else 14.0
        tex = _lowfreq(rng, (h, w), (max(2, h // 10), max(2, w // 10))) * tex_amp
        tex += _lowfreq(rng, (h, w), (max(2, h // 3), max(2, w // 3))) * tex_amp * 0.6
        tree_dark = np.exp(-depth * np.float32(12.0))[..., None] * np.float32(0.45 if clutter else 0.3)
        ground = ground_col * (1.0 - tree_dark) * (1.0 - 0.25 * depth[..., None]) + tex[..., None]
        img = np.where((y >= hy[None, :])[..., None], ground, sky)
        img = np.clip(img, 0, 255).astype(np.uint8)
        if clutter:  # power lines and poles cutting through the sky
            for _ in range(int(rng.integers(1, 3))):
                x0, x1 = -0.05 * w, 1.05 * w
                y0, y1 = (float(v) for v in rng.uniform(0.1, 0.5, 2) * self.horizon)
                sag = float(rng.uniform(0.02, 0.08)) * h
                px = np.linspace(x0, x1, 24)
                py = y0 + (y1 - y0) * (px - x0) / (x1 - x0) + sag * np.sin(np.pi * (px - x0) / (x1 - x0))
                pts = np.stack([px, py], 1) * _SUB
                cv2.polylines(
                    img, [np.rint(pts).astype(np.int32)], False, (50, 50, 55), 1, cv2.LINE_AA, _SHIFT
                )
            for _ in range(int(rng.integers(1, 3))):
                px = float(rng.uniform(0.05, 0.95)) * w
                top_y = float(rng.uniform(0.2, 0.6)) * self.horizon
                thick = max(1, round(4 * self.s))
                cv2.line(img, _pt(px, top_y), _pt(px, h + 1.0), (45, 50, 55), thick, cv2.LINE_AA, _SHIFT)
        return img

    def _region(self, bw: float, bh: float) -> tuple[float, float, float, float]:
        """Where a drone centre may fly: inside the frame, in the sky (or lower with clutter)."""
        mx = 0.5 * bw + 0.02 * self.w
        y_lo = 0.06 * self.h + 0.5 * bh
        y_hi = self.horizon - 0.5 * bh - 0.02 * self.h
        if self.flags["clutter"]:
            y_hi = min(self.h - 0.5 * bh - 0.02 * self.h, self.horizon + 0.15 * self.h)
        x_lo, x_hi = mx, self.w - mx
        if x_lo > x_hi:
            x_lo = x_hi = self.w / 2
        if y_lo > y_hi:
            y_lo = y_hi = (y_lo + y_hi) / 2
        return x_lo, x_hi, y_lo, y_hi

    def _wander(
        self, n: int, speed: float, region: tuple[float, float, float, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Smooth random flight (AR(1) velocity) reflected at the region borders."""
        rng = self.rng
        x_lo, x_hi, y_lo, y_hi = region
        vx = _ou(rng, n, 0.96, speed / 1.1)
        vy = _ou(rng, n, 0.96, speed / 1.1 * 0.6)
        x, y = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
        sx = sy = 1.0
        xs, ys = np.empty(n), np.empty(n)
        for i in range(n):
            x += sx * vx[i]
            y += sy * vy[i]
            if x < x_lo or x > x_hi:
                x = min(max(2 * (x_lo if x < x_lo else x_hi) - x, x_lo), x_hi)
                sx = -sx
            if y < y_lo or y > y_hi:
                y = min(max(2 * (y_lo if y < y_lo else y_hi) - y, y_lo), y_hi)
                sy = -sy
            xs[i], ys[i] = x, y
        return xs, ys

    def _tracks(self) -> list[_Track]:
        rng, f, n = self.rng, self.flags, self.n + 1
        n_tracks = int(rng.integers(2, 4)) if f["multi"] else 1
        models = [str(m) for m in rng.permutation(DRONE_MODELS)[:n_tracks]]
        k = np.arange(n)
        n_bg_start = max(1, round(self.n * float(rng.uniform(0.05, 0.12))))
        n_bg_end = round(self.n * float(rng.uniform(0.0, 0.08)))
        tracks = []
        for i, model in enumerate(models):
            kind, (ar_lo, ar_hi) = _MODEL_STYLE[model]
            if f["small"]:
                w0 = float(rng.uniform(15, 30))
            elif f["multi"]:
                w0 = float(rng.uniform(28, 70))
            else:
                w0 = float(rng.uniform(34, 80))
            w0 = max(4.0, w0 * self.s)
            aspect = float(rng.uniform(ar_lo, ar_hi))
            if f["hover"]:
                scale = np.ones(n)
                speed = 0.0
            else:
                scale = np.exp(_ou(rng, n, 0.98, 0.1))
                if f["small"]:
                    speed = float(rng.uniform(2.5, 6.0))
                elif f["multi"]:
                    speed = float(rng.uniform(3.0, 9.0))
                else:
                    speed = float(rng.uniform(4.0, 10.0))
                speed *= self.s
            bw, bh = w0 * scale, w0 * aspect * scale
            region = self._region(float(bw.max()), float(bh.max()))
            a0 = 1 + n_bg_start + (int(rng.integers(0, max(1, self.n // 5))) if i else 0)
            a1 = self.n - n_bg_end - (int(rng.integers(0, max(1, self.n // 5))) if i else 0)
            if f["hover"]:
                x_lo, x_hi, y_lo, y_hi = region
                x0, y0 = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
                ang = float(rng.uniform(0, 2 * np.pi))
                drift = 0.02 * self.s * k  # sub-pixel jitter and a slow drift
                jitter = 0.3 * max(self.s, 0.2)
                cx = x0 + drift * math.cos(ang) + _ou(rng, n, 0.8, jitter)
                cy = y0 + drift * math.sin(ang) + _ou(rng, n, 0.8, jitter)
            else:
                cx, cy = self._wander(n, speed, region)
            if f["edge"] and i == 0:
                cx, cy = self._edge_path(cx, cy, float(bw.mean()), float(bh.mean()), region, a0, a1)
            gray = float(rng.uniform(25, 55))
            tint = rng.uniform(-6, 6, 3)
            body = _color(np.clip(gray + tint, 0, 255))
            rotor = _color(np.clip(gray + float(rng.uniform(40, 70)) + tint, 0, 255))
            tracks.append(
                _Track(
                    track_id=i + 1,
                    model=model,
                    kind=kind,
                    cx=cx,
                    cy=cy,
                    w=bw,
                    h=bh,
                    active=(k >= a0) & (k <= a1),
                    body=body,
                    rotor=rotor,
                )
            )
        return tracks

    def _edge_path(
        self,
        cx: np.ndarray,
        cy: np.ndarray,
        bw: float,
        bh: float,
        region: tuple[float, float, float, float],
        a0: int,
        a1: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fly out through a frame edge (centre a quarter box past it) and back in."""
        rng = self.rng
        k = np.arange(cx.size, dtype=np.float64)
        span = max(2, a1 - a0)
        period = span * float(rng.uniform(0.5, 0.8))
        k0 = a0 + float(rng.uniform(0, span - period))
        phase = np.clip((k - k0) / period, 0.0, 1.0)
        bump = 0.5 - 0.5 * np.cos(2 * np.pi * phase)
        _, _, y_lo, y_hi = region
        side = int(rng.integers(0, 3))
        # keep the wandering motion small around the excursion so the crossing dominates
        wob_x = (cx - cx.mean()) * 0.25
        wob_y = (cy - cy.mean()) * 0.25
        if side == 0:  # right
            x_in = float(rng.uniform(0.6, 0.8)) * self.w
            return x_in + (self.w + 0.25 * bw - x_in) * bump + wob_x * (1 - bump), cy
        if side == 1:  # left
            x_in = float(rng.uniform(0.2, 0.4)) * self.w
            return x_in + (-0.25 * bw - x_in) * bump + wob_x * (1 - bump), cy
        y_in = float(rng.uniform(y_lo, max(y_lo, y_hi)))  # top
        return cx, y_in + (-0.25 * bh - y_in) * bump + wob_y * (1 - bump)

    def _birds(self) -> list[_Bird]:
        rng, n = self.rng, self.n + 1
        k = np.arange(n)
        birds = []
        for _ in range(int(rng.integers(2, 5))):
            speed = float(rng.uniform(3, 12)) * self.s
            ang = float(rng.uniform(-0.4, 0.4)) + (np.pi if rng.random() < 0.5 else 0.0)
            x0 = float(rng.uniform(0.1, 0.9)) * self.w
            y0 = float(rng.uniform(0.08, 0.9)) * self.horizon
            wob = float(rng.uniform(1, 4)) * self.s
            x = x0 + speed * math.cos(ang) * k
            y = y0 + speed * math.sin(ang) * k + wob * np.sin(k / float(rng.uniform(6, 14)))
            g = int(rng.integers(20, 60))
            birds.append(
                _Bird(
                    x=x,
                    y=y,
                    span=max(4.0, float(rng.uniform(18, 45)) * self.s),
                    period=float(rng.uniform(4, 9)),
                    phase=float(rng.uniform(0, 2 * np.pi)),
                    color=(g, g, g + 5),
                )
            )
        return birds

    def _foliage(self) -> list[_Foliage]:
        rng = self.rng
        out = []
        for _ in range(int(rng.integers(2, 4))):
            left = rng.random() < 0.5
            ax = float(rng.uniform(0.0, 0.12) if left else rng.uniform(0.88, 1.0)) * self.w
            ay = float(rng.uniform(0.45, 0.95)) * self.h
            radius = float(rng.uniform(40, 110)) * self.s
            m = int(rng.integers(8, 16))
            leaves = np.empty((m, 5))
            r = radius * np.sqrt(rng.random(m))
            th = rng.uniform(0, 2 * np.pi, m)
            leaves[:, 0] = r * np.cos(th)
            leaves[:, 1] = r * np.sin(th)
            leaves[:, 2] = rng.uniform(6, 16, m) * self.s
            leaves[:, 3] = leaves[:, 2] * rng.uniform(0.35, 0.6, m)
            leaves[:, 4] = rng.uniform(0, 180, m)
            colors = [
                (int(rng.integers(25, 70)), int(rng.integers(70, 130)), int(rng.integers(30, 75)))
                for _ in range(m)
            ]
            amp = float(rng.uniform(2, 6)) * self.s
            reach = radius + float(leaves[:, 2].max()) + amp + 3
            rect = (int(ax - reach), int(ay - reach), int(ax + reach) + 1, int(ay + reach) + 1)
            out.append(
                _Foliage(
                    ax=ax,
                    ay=ay,
                    leaves=leaves,
                    colors=colors,
                    amp=amp,
                    period=float(rng.uniform(10, 25)),
                    phase=float(rng.uniform(0, 2 * np.pi)),
                    rect=rect,
                )
            )
        return out

    # -- per step ----------------------------------------------------------------------------
    def render(self, k: int) -> np.ndarray:
        """The scene at step ``k`` (BGR uint8, well exposed: what the event sensor sees)."""
        img = self.background.copy()
        for fol in self.foliage:
            sway = fol.amp * math.sin(2 * math.pi * k / fol.period + fol.phase)
            for (dx, dy, a, b, ang), col in zip(fol.leaves, fol.colors):
                c = _pt(fol.ax + dx + sway, fol.ay + dy + 0.4 * sway)
                cv2.ellipse(img, c, _axes(a, b), float(ang), 0, 360, col, -1, cv2.LINE_AA, _SHIFT)
        for bird in self.birds:
            self._draw_bird(img, bird, k)
        for tr in self.tracks:
            if tr.active[k]:
                _draw_drone(img, tr.cx[k], tr.cy[k], tr.w[k], tr.h[k], tr.kind, tr.body, tr.rotor)
        return img

    def _draw_bird(self, img: np.ndarray, bird: _Bird, k: int) -> None:
        x, y = float(bird.x[k]), float(bird.y[k])
        half = bird.span / 2
        theta = 0.25 + 0.45 * math.sin(2 * math.pi * k / bird.period + bird.phase)
        t = max(1, round(bird.span * 0.1))
        for side in (-1, 1):
            tip = (x + side * half * math.cos(theta), y - half * math.sin(theta))
            mid = (x + side * half * 0.5 * math.cos(theta), y - half * 0.5 * math.sin(theta) - 0.08 * half)
            cv2.line(img, _pt(x, y), _pt(*mid), bird.color, t, cv2.LINE_AA, _SHIFT)
            cv2.line(img, _pt(*mid), _pt(*tip), bird.color, max(1, t - 1), cv2.LINE_AA, _SHIFT)
        cv2.ellipse(
            img, _pt(x, y), _axes(half * 0.18, half * 0.1), 0, 0, 360, bird.color, -1, cv2.LINE_AA, _SHIFT
        )

    def _dirty_rects(self, k: int) -> list[tuple[int, int, int, int]]:
        """Regions where the scene may differ between steps ``k-1`` and ``k`` (objects present at k)."""
        rects = []
        for tr in self.tracks:
            if not tr.active[k]:
                continue
            ks = (k - 1, k) if tr.active[k - 1] else (k,)
            x1 = min(tr.cx[j] - tr.w[j] / 2 for j in ks) - 3
            y1 = min(tr.cy[j] - tr.h[j] / 2 for j in ks) - 3
            x2 = max(tr.cx[j] + tr.w[j] / 2 for j in ks) + 3
            y2 = max(tr.cy[j] + tr.h[j] / 2 for j in ks) + 3
            rects.append((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)))
        for bird in self.birds:
            r = bird.span / 2 + bird.span * 0.1 + 3
            xs, ys = bird.x[k - 1 : k + 1], bird.y[k - 1 : k + 1]
            rects.append(
                (
                    math.floor(xs.min() - r),
                    math.floor(ys.min() - r),
                    math.ceil(xs.max() + r),
                    math.ceil(ys.max() + r),
                )
            )
        rects.extend(fol.rect for fol in self.foliage)
        return rects

    def events(self, k: int, prev_gray: np.ndarray, gray: np.ndarray) -> np.ndarray:
        """Event frame ``k``: polarity of log-brightness changes from step ``k-1`` plus sensor noise."""
        h, w = self.h, self.w
        ev = np.zeros((h, w, 3), dtype=np.uint8)
        for x1, y1, x2, y2 in self._dirty_rects(k):
            x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
            if x2 <= x1 or y2 <= y1:
                continue
            d = _LOG_LUT[gray[y1:y2, x1:x2]] - _LOG_LUT[prev_gray[y1:y2, x1:x2]]
            view = ev[y1:y2, x1:x2]
            view[d > _EVENT_THRESHOLD] = _POS_BGR
            view[d < -_EVENT_THRESHOLD] = _NEG_BGR
        flat = ev.reshape(-1, 3)
        rate = self.ba_rate * (6.0 if k <= 3 else 1.0)  # sensor start-up noise
        n_ba = int(self.rng.poisson(rate * h * w))
        idx = self.rng.integers(0, h * w, n_ba)
        pos = self.rng.random(n_ba) < 0.5
        flat[idx[pos]] = _POS_BGR
        flat[idx[~pos]] = _NEG_BGR
        fire = self.rng.random(self.hot_idx.size) < 0.7
        flat[self.hot_idx[fire & self.hot_pos]] = _POS_BGR
        flat[self.hot_idx[fire & ~self.hot_pos]] = _NEG_BGR
        return ev

    def camera(self, scene: np.ndarray) -> np.ndarray:
        """The RGB camera's view of a scene: exposure, then sensor noise (shifted noise tile)."""
        img = cv2.convertScaleAbs(scene, alpha=self.gain, beta=self.bias)
        oy = int(self.rng.integers(0, self._pad))
        ox = int(self.rng.integers(0, self._pad))
        pos = np.ascontiguousarray(self._noise_pos[oy : oy + self.h, ox : ox + self.w])
        neg = np.ascontiguousarray(self._noise_neg[oy : oy + self.h, ox : ox + self.w])
        img = cv2.add(img, pos)
        return cv2.subtract(img, neg)

    def annotation_lines(self, k: int) -> list[str]:
        """``coordinates.txt`` lines for step ``k`` (drones at least 1 px inside the frame)."""
        lines = []
        t = _fmt_time(k)
        for tr in self.tracks:
            if not tr.active[k]:
                continue
            x1, x2 = tr.cx[k] - tr.w[k] / 2, tr.cx[k] + tr.w[k] / 2
            y1, y2 = tr.cy[k] - tr.h[k] / 2, tr.cy[k] + tr.h[k] / 2
            if min(x2, self.w) - max(x1, 0) < 1 or min(y2, self.h) - max(y1, 0) < 1:
                continue
            lines.append(f"{t}: {x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}, {tr.track_id}, {tr.model}")
        return lines


def _draw_drone(
    img: np.ndarray,
    cx: float,
    cy: float,
    w: float,
    h: float,
    kind: str,
    body: tuple[int, int, int],
    rotor: tuple[int, int, int],
) -> None:
    """Draw a quadcopter whose extent is the box ``cx +- w/2, cy +- h/2`` (dark body, arms, rotors)."""
    aa = cv2.LINE_AA
    if kind == "tello":
        rw, rh = 0.25 * w, 0.25 * h
    elif kind == "fpv":
        rw, rh = 0.22 * w, 0.23 * h
    else:
        rw, rh = 0.2 * w, 0.18 * h
    centers = [(cx + sx * (w / 2 - rw), cy + sy * (h / 2 - rh)) for sx in (-1, 1) for sy in (-1, 1)]
    arm = max(1, round(0.07 * w))
    for x, y in centers:
        cv2.line(img, _pt(cx, cy), _pt(x, y), body, arm, aa, _SHIFT)
    ring = max(1, round(0.04 * w))
    for x, y in centers:
        cv2.ellipse(img, _pt(x, y), _axes(rw, rh), 0, 0, 360, rotor, -1, aa, _SHIFT)
        if kind != "dji" and w >= 12:  # prop guards / ducts
            cv2.ellipse(
                img, _pt(x, y), _axes(rw - ring / 2, rh - ring / 2), 0, 0, 360, body, ring, aa, _SHIFT
            )
        cv2.ellipse(img, _pt(x, y), _axes(0.3 * rw, 0.3 * rh), 0, 0, 360, body, -1, aa, _SHIFT)
    if kind == "tello":
        cv2.ellipse(img, _pt(cx, cy), _axes(0.24 * w, 0.27 * h), 0, 0, 360, body, -1, aa, _SHIFT)
    elif kind == "fpv":
        cv2.ellipse(img, _pt(cx, cy), _axes(0.16 * w, 0.22 * h), 0, 0, 360, body, -1, aa, _SHIFT)
    else:
        cv2.ellipse(img, _pt(cx, cy), _axes(0.22 * w, 0.3 * h), 0, 0, 360, body, -1, aa, _SHIFT)
        dark = tuple(max(0, c - 15) for c in body)
        cv2.ellipse(img, _pt(cx, cy + 0.2 * h), _axes(0.07 * w, 0.07 * w), 0, 0, 360, dark, -1, aa, _SHIFT)
