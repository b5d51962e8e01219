"""Tests for the synthetic FRED-layout sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from fredfusion.data.conditions import CONDITION_ORDER, read_conditions
from fredfusion.data.synth import (
    CANONICAL_TEST_IDS,
    DRONE_MODELS,
    EVENT_PERIOD_US,
    _fmt_time,
    default_sequence_ids,
    plan_scenarios,
    scenario_names,
    write_sample,
    write_sequence,
)

RGB_RE = re.compile(r"^Video_(\d+)_(\d{2})_(\d{2})_(\d{2})\.(\d{6})\.jpg$")
EVENT_RE = re.compile(r"^Video_(\d+)_frame_(\d+)\.png$")
LINE_RE = re.compile(
    r"^(\d+\.\d{1,6}): (-?\d+\.\d), (-?\d+\.\d), (-?\d+\.\d), (-?\d+\.\d), (\d+), ([A-Za-z0-9 ]+)$"
)


# -- helpers reading a sequence folder the way FRED_FORMAT.md describes it ---------------------


def rgb_times_us(seq: Path) -> list[tuple[Path, int]]:
    """RGB files with their time of day in microseconds, in time order."""
    out = []
    for f in (seq / "RGB").iterdir():
        m = RGB_RE.match(f.name)
        assert m, f.name
        hh, mm, ss, us = (int(g) for g in m.groups()[1:])
        out.append((f, ((hh * 60 + mm) * 60 + ss) * 1_000_000 + us))
    return sorted(out, key=lambda p: p[1])


def event_frames(seq: Path) -> dict[int, Path]:
    """Event frame index k -> file, from ``t_us = k * 33333``."""
    out = {}
    for f in (seq / "Event" / "Frames").iterdir():
        m = EVENT_RE.match(f.name)
        assert m, f.name
        t_us = int(m.group(2))
        assert t_us % EVENT_PERIOD_US == 0
        out[t_us // EVENT_PERIOD_US] = f
    return out


def read_boxes(seq: Path) -> dict[int, list[tuple[float, float, float, float, int, str]]]:
    """Event frame index k -> boxes (x1, y1, x2, y2, track id, model) from coordinates.txt."""
    out: dict[int, list] = {}
    for n, line in enumerate((seq / "coordinates.txt").read_text().splitlines(), 1):
        m = LINE_RE.match(line)
        assert m, f"line {n}: {line!r}"
        k = round(float(m.group(1)) / 0.033333)
        assert m.group(1) == _fmt_time(k)
        x1, y1, x2, y2 = (float(m.group(i)) for i in range(2, 6))
        out.setdefault(k, []).append((x1, y1, x2, y2, int(m.group(6)), m.group(7)))
    return out


def rgb_steps(seq: Path) -> list[tuple[Path, int]]:
    """RGB files with the event frame they pair with (first RGB at the first event frame)."""
    frames = rgb_times_us(seq)
    t0 = frames[0][1]
    return [(f, 1 + round((t - t0) / EVENT_PERIOD_US)) for f, t in frames]


def event_mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR).max(axis=2) > 0


def box_mask(shape: tuple[int, int], boxes: list, grow: float) -> np.ndarray:
    """Pixels within the boxes grown by ``grow`` box sizes on each side."""
    m = np.zeros(shape, dtype=bool)
    for x1, y1, x2, y2, *_ in boxes:
        gw, gh = (x2 - x1) * grow, (y2 - y1) * grow
        m[
            max(0, int(y1 - gh)) : max(0, int(y2 + gh) + 1), max(0, int(x1 - gw)) : max(0, int(x2 + gw) + 1)
        ] = True
    return m


def event_stats(seq: Path) -> tuple[float, float, float]:
    """Per annotated frame (k > 3): events near boxes per perimeter px, events far away, density ratio."""
    boxes = read_boxes(seq)
    near_per, far, ratio = [], [], []
    for k, f in event_frames(seq).items():
        if k <= 3 or k not in boxes:
            continue
        ev = event_mask(f)
        near = box_mask(ev.shape, boxes[k], 0.5)
        perim = sum(2 * (b[2] - b[0] + b[3] - b[1]) for b in boxes[k])
        near_per.append((ev & near).sum() / perim)
        far.append((ev & ~near).sum())
        ratio.append(((ev & near).sum() / near.sum()) / (((ev & ~near).sum() + 1) / (~near).sum()))
    return float(np.mean(near_per)), float(np.mean(far)), float(np.median(ratio))


# -- layout and naming --------------------------------------------------------------------------


def test_flat_layout_names_and_annotations(tmp_path: Path) -> None:
    info = write_sample(tmp_path, sequences=2, frames=8, width=128, height=72, seed=3)
    assert info.out == tmp_path
    assert info.sequence_ids == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]
    assert info.rgb_frames == 16
    total_events = total_boxes = 0
    for seq_info in info.sequences:
        seq = tmp_path / str(seq_info.sequence_id)
        assert seq_info.path == seq and seq_info.split is None
        assert sorted(p.name for p in seq.iterdir()) == ["Event", "RGB", "conditions.json", "coordinates.txt"]
        assert [p.name for p in (seq / "Event").iterdir()] == ["Frames"]
        rgb = rgb_times_us(seq)
        assert len(rgb) == 8
        assert all(RGB_RE.match(f.name).group(1) == str(seq_info.sequence_id) for f, _ in rgb)
        gaps = np.diff([t for _, t in rgb])
        assert gaps.min() >= 33_000 and gaps.max() <= 40_000
        events = event_frames(seq)
        n_ev = len(events)
        assert sorted(events) == list(range(1, n_ev + 1))
        assert all(EVENT_RE.match(f.name).group(1) == str(seq_info.sequence_id) for f in events.values())
        steps = [k for _, k in rgb_steps(seq)]
        assert len(set(steps)) == 8  # every RGB frame pairs with its own event frame
        assert 2 <= n_ev - steps[-1] <= 6  # event recording runs a few frames longer
        assert seq_info.event_frames == n_ev
        boxes = read_boxes(seq)
        assert set(boxes) <= set(range(1, n_ev + 1))
        assert steps[0] not in boxes  # background frame at the start
        for lines in boxes.values():
            for x1, y1, x2, y2, tid, model in lines:
                assert x2 > x1 and y2 > y1 and tid >= 1 and model in DRONE_MODELS
        assert seq_info.boxes == sum(len(v) for v in boxes.values())
        total_events += n_ev
        total_boxes += seq_info.boxes
        rgb_img = cv2.imread(str(rgb[0][0]), cv2.IMREAD_UNCHANGED)
        ev_img = cv2.imread(str(events[1]), cv2.IMREAD_UNCHANGED)
        assert rgb_img.shape == (72, 128, 3) and ev_img.shape == (72, 128, 3)
    assert info.event_frames == total_events and info.boxes == total_boxes


def test_time_format() -> None:
    assert _fmt_time(40) == "1.33332"
    assert _fmt_time(1) == "0.033333"
    assert _fmt_time(30) == "0.99999"
    assert _fmt_time(300) == "9.9999"


def test_official_layout_splits(tmp_path: Path) -> None:
    info = write_sample(tmp_path, sequences=5, frames=3, width=64, height=36, seed=1, layout="official")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "train"]
    test_ids = {int(p.name) for p in (tmp_path / "test").iterdir()}
    train_ids = {int(p.name) for p in (tmp_path / "train").iterdir()}
    assert test_ids and train_ids
    assert test_ids <= set(CANONICAL_TEST_IDS)
    assert not train_ids & set(CANONICAL_TEST_IDS)
    assert sorted(test_ids | train_ids) == info.sequence_ids
    for s in info.sequences:
        assert s.split == ("test" if s.sequence_id in CANONICAL_TEST_IDS else "train")
        assert s.path == tmp_path / s.split / str(s.sequence_id)
        rgb_times_us(s.path)  # names carry the real id
    assert info.sequence_ids == default_sequence_ids(5, "official", seed=1)
    assert default_sequence_ids(4, "flat") == [0, 1, 2, 3]


def test_explicit_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = write_sample(
        tmp_path, frames=2, width=64, height=36, layout="official", sequence_ids=[230, 3], progress=True
    )
    assert "synth" in capsys.readouterr().err  # progress bar
    assert info.sequence_ids == [230, 3]
    assert (tmp_path / "test" / "230" / "coordinates.txt").is_file()
    assert (tmp_path / "train" / "3" / "coordinates.txt").is_file()
    assert any(f.name.startswith("Video_230_frame_") for f in (tmp_path / "test/230/Event/Frames").iterdir())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout": "nested"}, "layout"),
        ({"layout": "official", "sequence_ids": [231]}, "0..230"),
        ({"sequence_ids": [1, 1]}, "duplicates"),
        ({"sequence_ids": [-1]}, "non-negative"),
        ({"frames": 0}, "frames"),
        ({"width": 8}, "width"),
        ({"seed": -1}, "seed"),
        ({"sequences": 0}, "sequences"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_sample(tmp_path, **{"frames": 2, "width": 64, "height": 36, **kwargs})


def test_bad_scenario(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown scenario 'sunny'"):
        write_sequence(tmp_path / "0", 0, "sunny", frames=2, width=64, height=36)
    with pytest.raises(ValueError, match="unknown scenario"):
        write_sequence(tmp_path / "0", 0, "edge", frames=2, width=64, height=36)


# -- scenarios ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_plan_covers_every_scenario(seed: int) -> None:
    plan = plan_scenarios(6, seed)
    used = {part for name in plan for part in name.split("+")}
    assert used == set(scenario_names())
    assert plan_scenarios(11, seed)[:6] == plan == plan_scenarios(6, seed)
    assert plan_scenarios(3, seed) == plan[:3]


def test_day_boxes_lie_on_the_drone(tmp_path: Path) -> None:
    seq = tmp_path / "0"
    write_sequence(seq, 0, "day", frames=20, width=320, height=180, seed=1)
    boxes = read_boxes(seq)
    checked = 0
    for f, k in rgb_steps(seq):
        if k not in boxes:
            continue
        gray = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2GRAY).astype(np.float64)
        x1, y1, x2, y2 = boxes[k][0][:4]
        if x1 < 0 or y1 < 0 or x2 > 320 or y2 > 180:
            continue
        inside = box_mask(gray.shape, boxes[k], 0.0)
        ring = box_mask(gray.shape, boxes[k], 0.5) & ~box_mask(gray.shape, boxes[k], 0.1)
        assert gray[inside].mean() < gray[ring].mean() - 25
        checked += 1
    assert checked >= 10
    _, _, density_ratio = event_stats(seq)
    assert density_ratio > 20  # events are concentrated near the moving drone


def test_night_rgb_is_dark_but_events_are_fine(tmp_path: Path) -> None:
    write_sequence(tmp_path / "day", 2, "day", frames=6, width=160, height=90, seed=0)
    write_sequence(tmp_path / "night", 2, "night", frames=20, width=320, height=180, seed=0)
    night = [cv2.imread(str(f)).mean() for f, _ in rgb_steps(tmp_path / "night")]
    day = [cv2.imread(str(f)).mean() for f, _ in rgb_steps(tmp_path / "day")]
    assert max(night) < 30 and min(day) > 90
    assert rgb_times_us(tmp_path / "night")[0][1] >= 20 * 3600 * 10**6  # recorded in the evening
    _, _, density_ratio = event_stats(tmp_path / "night")
    assert density_ratio > 20


def test_hovering_drone_makes_few_events(tmp_path: Path) -> None:
    hover, moving = [], []
    for sid in (0, 1):
        write_sequence(tmp_path / f"h{sid}", sid, "hover", frames=20, width=320, height=180, seed=0)
        write_sequence(tmp_path / f"d{sid}", sid, "day", frames=20, width=320, height=180, seed=0)
        hover.append(event_stats(tmp_path / f"h{sid}")[0])
        moving.append(event_stats(tmp_path / f"d{sid}")[0])
    assert np.mean(hover) < 0.3 * np.mean(moving)
    assert min(moving) > 0.5


def test_clutter_and_noise_add_events_away_from_drones(tmp_path: Path) -> None:
    far = {}
    for sc in ("day", "clutter", "noise"):
        write_sequence(tmp_path / sc, 1, sc, frames=12, width=320, height=180, seed=0)
        far[sc] = event_stats(tmp_path / sc)[1]
    assert far["clutter"] > 2 * far["day"]
    assert far["noise"] > 2 * far["day"]


def test_noise_scenario_has_noisy_rgb(tmp_path: Path) -> None:
    def grain(seq: Path) -> float:
        img = cv2.imread(str(rgb_steps(seq)[0][0]), cv2.IMREAD_GRAYSCALE).astype(np.float64)
        return float((img - cv2.blur(img, (3, 3)))[: img.shape[0] // 3].std())  # sky

    write_sequence(tmp_path / "day", 1, "day", frames=2, width=320, height=180, seed=0)
    write_sequence(tmp_path / "noise", 1, "noise", frames=2, width=320, height=180, seed=0)
    assert grain(tmp_path / "noise") > 4 * grain(tmp_path / "day")


def test_multi_and_edge(tmp_path: Path) -> None:
    seq = tmp_path / "5"
    info = write_sequence(seq, 5, "multi+edge", frames=40, width=320, height=180, seed=0)
    boxes = read_boxes(seq)
    ids = {b[4] for lines in boxes.values() for b in lines}
    assert ids in ({1, 2}, {1, 2, 3})
    assert max(len({b[4] for b in lines}) for lines in boxes.values()) >= 2
    outside = [
        b for lines in boxes.values() for b in lines if b[0] < 0 or b[1] < 0 or b[2] > 320 or b[3] > 180
    ]
    assert outside  # some box sticks out of the frame ...
    for x1, y1, x2, y2, *_ in outside:  # ... but still overlaps it
        assert min(x2, 320) - max(x1, 0) >= 1 and min(y2, 180) - max(y1, 0) >= 1
    assert info.scenario == "multi+edge" and info.boxes == sum(len(v) for v in boxes.values())


def test_small_drones_are_small(tmp_path: Path) -> None:
    write_sequence(tmp_path / "s", 0, "day+small", frames=20, width=640, height=360, seed=0)
    write_sequence(tmp_path / "n", 0, "day", frames=20, width=640, height=360, seed=0)
    small = np.median([b[2] - b[0] for lines in read_boxes(tmp_path / "s").values() for b in lines])
    normal = np.median([b[2] - b[0] for lines in read_boxes(tmp_path / "n").values() for b in lines])
    assert 6 <= small <= 18  # ~15-30 px at 1280 wide, halved at 640
    assert normal >= 15


def test_every_scenario_at_tiny_size(tmp_path: Path) -> None:
    for i, prim in enumerate(scenario_names()[:6]):
        info = write_sequence(tmp_path / str(i), i, f"{prim}+edge+small", frames=4, width=64, height=36)
        assert info.rgb_frames == 4 and len(list((tmp_path / str(i) / "RGB").iterdir())) == 4
        read_boxes(tmp_path / str(i))


def test_scenarios_written_as_conditions(tmp_path: Path) -> None:
    info = write_sample(tmp_path, sequences=6, frames=2, width=32, height=18, seed=2, layout="official")
    for seq in info.sequences:
        # each sequence's side file holds its scenario's parts: "night+small" -> night, small
        assert read_conditions(seq.path) == list(seq.conditions) == seq.scenario.split("+")
        assert json.loads((seq.path / "conditions.json").read_text())["scenario"] == seq.scenario
    assert {c for s in info.sequences for c in s.conditions} == set(scenario_names())
    assert set(scenario_names()) <= set(CONDITION_ORDER)  # every scenario has its place in the tables


# -- determinism and rewriting ------------------------------------------------------------------


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_bytes(tmp_path: Path) -> None:
    args = {"sequences": 3, "frames": 6, "width": 128, "height": 72}
    info = write_sample(tmp_path / "a", seed=5, workers=1, **args)
    threaded = write_sample(tmp_path / "b", seed=5, workers=3, **args)
    write_sample(tmp_path / "c", seed=6, **args)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert a == b  # threads writing whole sequences change nothing
    assert (threaded.sequence_ids, threaded.scenarios) == (info.sequence_ids, info.scenarios)
    assert a["0/coordinates.txt"] != c["0/coordinates.txt"]
    assert set(a) != set(c)  # different wall-clock times -> different RGB names


def test_rewrite_removes_stale_frames(tmp_path: Path) -> None:
    write_sample(tmp_path, sequences=1, frames=10, width=64, height=36)
    info = write_sample(tmp_path, sequences=1, frames=4, width=64, height=36, seed=1)
    seq = tmp_path / "0"
    assert len(list((seq / "RGB").iterdir())) == 4
    assert len(event_frames(seq)) == info.event_frames
