"""Tests for the FRED tree reader (layouts, file-name quirks, annotation parsing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fredfusion.data.fred import FredError, parse_annotations, read_sequence, scan_root


def touch(path: Path, data: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_seq(
    seq_dir: Path,
    rgb_names: list[str] = (),
    event_names: list[str] = (),
    ann: str | bytes | None = "",
    rgb_dir: str = "RGB",
    ann_name: str = "coordinates.txt",
) -> Path:
    seq_dir.mkdir(parents=True, exist_ok=True)
    for n in rgb_names:
        touch(seq_dir / rgb_dir / n)
    for n in event_names:
        touch(seq_dir / "Event" / "Frames" / n)
    if ann is not None:
        touch(seq_dir / ann_name, ann.encode() if isinstance(ann, str) else ann)
    return seq_dir


# ------------------------------------------------------------------------------------------ scan_root


def test_scan_flat_layout_and_zipped(tmp_path: Path) -> None:
    make_seq(tmp_path / "3")
    make_seq(tmp_path / "12")
    touch(tmp_path / "3.zip")  # unzipped already: not listed
    touch(tmp_path / "7.zip")
    (tmp_path / "notes").mkdir()
    touch(tmp_path / "readme.txt")
    scan = scan_root(tmp_path)
    assert list(scan.sequences) == [3, 12]
    assert scan.sequences[12] == tmp_path.absolute() / "12"
    assert scan.zipped == [tmp_path.absolute() / "7.zip"]


def test_scan_official_layout_mixed_with_flat(tmp_path: Path) -> None:
    make_seq(tmp_path / "train" / "0")
    make_seq(tmp_path / "train" / "1")
    make_seq(tmp_path / "test" / "8")
    touch(tmp_path / "test" / "9.zip")
    make_seq(tmp_path / "5")
    scan = scan_root(tmp_path)
    assert list(scan.sequences) == [0, 1, 5, 8]
    assert scan.sequences[8].parent.name == "test"
    assert [p.name for p in scan.zipped] == ["9.zip"]


def test_scan_duplicate_id_reported(tmp_path: Path) -> None:
    make_seq(tmp_path / "4")
    make_seq(tmp_path / "train" / "4")
    scan = scan_root(tmp_path)
    assert list(scan.sequences) == [4]
    assert len(scan.problems) == 1 and "sequence 4" in scan.problems[0]


def test_scan_missing_root_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FredError, match="FRED root not found"):
        scan_root(tmp_path / "nope")
    touch(tmp_path / "file")
    with pytest.raises(FredError, match="not a folder"):
        scan_root(tmp_path / "file")


# ------------------------------------------------------------------------------------- read_sequence


def test_rgb_times_sorted_prefix_optional(tmp_path: Path) -> None:
    names = [
        "Video_5_10_00_01.100000.jpg",
        "10_00_00.500000.jpg",  # no Video_<id>_ prefix
        "Video_5_10_00_00.533333.jpg",
        "Video_5_09_59_59.999000.jpg",
        "thumbs.db",
    ]
    seq = read_sequence(make_seq(tmp_path / "5", rgb_names=names), tmp_path)
    assert seq.seq_id == 5
    assert seq.rgb_dir == "5/RGB"
    assert seq.rgb_files == [
        "5/RGB/Video_5_09_59_59.999000.jpg",
        "5/RGB/10_00_00.500000.jpg",
        "5/RGB/Video_5_10_00_00.533333.jpg",
        "5/RGB/Video_5_10_00_01.100000.jpg",
    ]
    np.testing.assert_allclose(seq.rgb_t, [35999.999, 36000.5, 36000.533333, 36001.1])
    assert seq.rgb_t.dtype == np.float64
    assert any("thumbs.db" in p and "1 file name" in p for p in seq.problems)


def test_padded_rgb_preferred(tmp_path: Path) -> None:
    d = make_seq(tmp_path / "2", rgb_names=["Video_2_10_00_00.000000.jpg"])
    touch(d / "PADDED_RGB" / "Video_2_10_00_00.000000.jpg")
    touch(d / "PADDED_RGB" / "Video_2_10_00_00.033000.jpg")
    seq = read_sequence(d, tmp_path)
    assert seq.rgb_dir == "2/PADDED_RGB"
    assert len(seq.rgb_files) == 2
    assert all(f.startswith("2/PADDED_RGB/") for f in seq.rgb_files)


def test_empty_padded_rgb_falls_back_to_rgb(tmp_path: Path) -> None:
    d = make_seq(tmp_path / "2", rgb_names=["Video_2_10_00_00.000000.jpg"])
    (d / "PADDED_RGB").mkdir()
    seq = read_sequence(d, tmp_path)
    assert seq.rgb_dir == "2/RGB"


def test_event_names_numeric_sort_and_without_frame(tmp_path: Path) -> None:
    names = [
        "Video_1_frame_100000.png",
        "Video_1_frame_99999.png",
        "Video_1_33333.png",
        "Video_1_frame_1000000.png",
    ]
    seq = read_sequence(make_seq(tmp_path / "train" / "1", event_names=names), tmp_path)
    assert seq.event_files == [
        "train/1/Event/Frames/Video_1_33333.png",
        "train/1/Event/Frames/Video_1_frame_99999.png",
        "train/1/Event/Frames/Video_1_frame_100000.png",
        "train/1/Event/Frames/Video_1_frame_1000000.png",
    ]
    np.testing.assert_allclose(seq.event_t, [0.033333, 0.099999, 0.1, 1.0])


def test_missing_folders_and_annotation_are_problems(tmp_path: Path) -> None:
    seq = read_sequence(make_seq(tmp_path / "0", ann=None), tmp_path)
    assert seq.rgb_files == [] and seq.event_files == []
    assert seq.n_boxes == 0 and seq.boxes.shape == (0, 4)
    assert seq.annotation_file is None
    text = "\n".join(seq.problems)
    assert "no RGB folder" in text and "event frame folder missing" in text and "background" in text


def test_interpolated_coordinates_preferred(tmp_path: Path) -> None:
    d = make_seq(tmp_path / "0", ann="1.0: 1, 2, 3, 4, 1, DJI Mini 2\n")
    touch(d / "interpolated_coordinates.txt", b"1.0: 10, 20, 30, 40, 1, DJI Mini 2\n2.0: 5, 6, 7, 8\n")
    seq = read_sequence(d, tmp_path)
    assert seq.annotation_file == "0/interpolated_coordinates.txt"
    np.testing.assert_array_equal(seq.boxes, np.array([[10, 20, 30, 40], [5, 6, 7, 8]], np.float32))


def test_read_sequence_rejects_non_id_folder(tmp_path: Path) -> None:
    (tmp_path / "abc").mkdir()
    with pytest.raises(FredError, match="integer id"):
        read_sequence(tmp_path / "abc", tmp_path)


def test_empty_annotation_file_is_background_with_a_note(tmp_path: Path) -> None:
    for ann in ("", "# only a comment\n\n  \n"):
        seq = read_sequence(make_seq(tmp_path / "0", ann=ann), tmp_path)
        assert seq.n_boxes == 0 and seq.boxes.shape == (0, 4)
        assert len(seq.problems) == 3  # the missing RGB and event folders, and the note
        path = tmp_path.absolute() / "0" / "coordinates.txt"
        assert seq.problems[2] == f"{path}: annotation file has no box lines; all frames are background"
        assert not any("no annotation file" in p for p in seq.problems)
        assert seq.annotation_file == "0/coordinates.txt"


def test_unreadable_annotation_file_is_reported(tmp_path: Path) -> None:
    d = make_seq(tmp_path / "0", ann=None)
    (d / "coordinates.txt").mkdir()  # a folder where the file should be: open() fails
    seq = read_sequence(d, tmp_path)
    assert seq.n_boxes == 0 and seq.annotation_file is None
    assert any(p.startswith(f"{d / 'coordinates.txt'}: cannot read") for p in seq.problems)
    assert any("no annotation file" in p for p in seq.problems)


def test_duplicate_frame_times_are_reported(tmp_path: Path) -> None:
    rgb = ["Video_3_10_00_00.100000.jpg", "10_00_00.100000.jpg", "Video_3_10_00_00.133000.jpg"]
    event = ["Video_3_frame_33333.png", "Video_3_33333.png", "Video_3_frame_66666.png"]
    seq = read_sequence(make_seq(tmp_path / "3", rgb_names=rgb, event_names=event), tmp_path)
    assert len(seq.rgb_files) == 3 and len(seq.event_files) == 3
    assert any("1 RGB frame(s) share a time stamp" in p for p in seq.problems)
    assert any("1 event frame(s) share a time stamp" in p for p in seq.problems)


def test_odd_names_are_not_sequences_or_frames(tmp_path: Path) -> None:
    make_seq(tmp_path / "\u0663")  # ARABIC-INDIC DIGIT THREE: int() would read it as 3
    make_seq(tmp_path / "7")
    touch(tmp_path / "\u0665.zip")
    assert list(scan_root(tmp_path).sequences) == [7] and scan_root(tmp_path).zipped == []
    names = ["Video_7_\u0661\u0660_00_00.000000.jpg", "Video_7_10_00_00.000000.jpg\n"]
    events = ["Video_7_frame_" + "9" * 19 + ".png", "Video_7_frame_\u0663\u0663.png"]
    seq = read_sequence(make_seq(tmp_path / "7", rgb_names=names, event_names=events), tmp_path)
    assert seq.rgb_files == [] and seq.event_files == []
    assert any("2 file name(s) not recognised as RGB" in p for p in seq.problems)
    assert any("2 file name(s) not recognised as event" in p for p in seq.problems)


# --------------------------------------------------------------------------------- parse_annotations


def test_parse_columns_optional_and_several_per_time() -> None:
    text = (
        "1.33332: 490.0, 413.0, 539.0, 448.0, 1, DJI Mini 2\n"
        "1.33332: 100, 100, 120, 110, 2, DJI Tello EDU\n"
        "0.033333: 10, 10, 20, 20\n"  # no id, no class
        "0.066666: 10, 10, 20, 20, 7\n"  # id only
        "0.099999: 10, 10, 20, 20, Betafpv air75\n"  # class only
        "\n"
    )
    a = parse_annotations(text.encode(), "c.txt")
    np.testing.assert_allclose(a.box_t, [0.033333, 0.066666, 0.099999, 1.33332, 1.33332])
    np.testing.assert_array_equal(a.track_ids, [-1, 7, -1, 1, 2])
    assert a.drone_models == ["", "", "Betafpv air75", "DJI Mini 2", "DJI Tello EDU"]
    np.testing.assert_array_equal(a.boxes[3], np.array([490, 413, 539, 448], np.float32))
    assert a.boxes.dtype == np.float32
    assert (a.n_clipped, a.n_dropped_empty, a.n_malformed, a.problems) == (0, 0, 0, [])


def test_parse_clip_and_drop_empty() -> None:
    text = (
        "1.0: -10, 5, 30, 40, 1\n"  # clipped x1 -> 0
        "1.0: 1270, 700, 1300, 730, 2\n"  # clipped x2, y2
        "2.0: 1290, 10, 1300, 20, 1\n"  # fully outside: empty after clipping
        "3.0: 50, 50, 50, 60, 1\n"  # zero width: empty
        "4.0: 0, 0, 1280, 720, 1\n"  # touches the border: not clipped
    )
    a = parse_annotations(text.encode(), "c.txt", width=1280, height=720)
    np.testing.assert_array_equal(
        a.boxes, np.array([[0, 5, 30, 40], [1270, 700, 1280, 720], [0, 0, 1280, 720]], np.float32)
    )
    assert (a.n_clipped, a.n_dropped_empty, a.n_malformed) == (2, 2, 0)


def test_parse_malformed_lines_reported_with_line_numbers() -> None:
    text = (
        "1.0: 1, 2, 3, 4\n"
        "garbage\n"  # line 2
        "2.0: 1, 2, 3\n"  # line 3: too few numbers
        "x: 1, 2, 3, 4\n"  # line 4: bad time
        "3.0: nan, 2, 3, 4\n"  # line 5
        "4.0: 5, 2, 3, 4\n"  # line 6: x2 < x1
        "5.0: 1, 2, 3, 4, one, DJI\n"  # line 7: bad id
        "6.0: 1, 2, 3, inf\n"  # line 8
    )
    a = parse_annotations(text.encode(), "/d/coordinates.txt")
    assert len(a.box_t) == 1
    assert a.n_malformed == 7
    lines = [p.split(":")[1] for p in a.problems]
    assert lines == ["2", "3", "4", "5", "6", "7", "8"]
    assert all(p.startswith("/d/coordinates.txt:") for p in a.problems)
    assert "NaN or infinite" in a.problems[3] and "x2 < x1" in a.problems[4]


def test_parse_non_utf8_replaced_and_reported() -> None:
    data = b"1.0: 1, 2, 3, 4, 1, DJI Mini \xff2\n2.0: 1, 2, 3, 4, 1, DJI\n"
    a = parse_annotations(data, "c.txt")
    assert len(a.box_t) == 2
    assert a.drone_models[0] == "DJI Mini \ufffd2"
    assert a.problems == ["c.txt:1: invalid UTF-8 bytes (replaced)"]
    assert a.n_malformed == 0


def test_parse_crlf_bom_and_comments() -> None:
    a = parse_annotations(b"\xef\xbb\xbf# header\r\n0.5: 1, 2, 3, 4, 3, X\r\n", "c.txt")
    np.testing.assert_allclose(a.box_t, [0.5])
    assert a.drone_models == ["X"] and a.problems == []


def test_rgb_times_across_midnight(tmp_path: Path) -> None:
    names = ["Video_6_00_00_00.023000.jpg", "Video_6_23_59_59.990000.jpg"]
    seq = read_sequence(make_seq(tmp_path / "6", rgb_names=names), tmp_path)
    assert seq.rgb_files == ["6/RGB/Video_6_23_59_59.990000.jpg", "6/RGB/Video_6_00_00_00.023000.jpg"]
    np.testing.assert_allclose(np.diff(seq.rgb_t), [0.033], atol=1e-9)


# ------------------------------------------------------------ each kind of bad annotation, by line


def _one(text: str, width: int = 1280, height: int = 720):  # type: ignore[no-untyped-def]
    return parse_annotations(text.encode(), "/d/c.txt", width, height)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("1.0 1, 2, 3, 4", "malformed line (expected"),
        ("1.0: 1; 2; 3; 4", "malformed line (expected"),
        ("1.0: 1, 2, 3, four", "not a number"),
        ("nan: 1, 2, 3, 4", "NaN or infinite value"),
        ("1.0: 1, NaN, 3, 4", "NaN or infinite value"),
        ("1.0: 1, 2, -inf, 4", "NaN or infinite value"),
        ("-0.5: 1, 2, 3, 4", "negative time -0.5"),
        ("1.0: 30, 2, 10, 4", "x2 < x1 or y2 < y1"),
        ("1.0: 1, 40, 3, 4", "x2 < x1 or y2 < y1"),
        ("1.0: -30, -20, -10, -5", "box outside the 1280x720 frame; dropped"),
        ("1.0: 1300, 10, 1400, 20", "box outside the 1280x720 frame; dropped"),
        ("1.0: 10, 730, 20, 740", "box outside the 1280x720 frame; dropped"),
        ("1.0: 10, 10, 10, 20", "box empty (zero width or height); dropped"),
        ("1.0: 1, 2, 3, 4, 99999999999999999999, DJI", "track id 99999999999999999999 out of range"),
        ("1.0: 1, 2, 3, 4, 1e30, DJI", "out of range"),
        ("1.0: 1, 2, 3, 4, x1, DJI", "track id 'x1' is not an integer"),
    ],
)
def test_each_bad_line_is_reported_and_skipped(line: str, reason: str) -> None:
    a = _one(f"0.5: 5, 5, 9, 9, 1\n{line}\n0.7: 5, 5, 9, 9, 1\n")
    np.testing.assert_allclose(a.box_t, [0.5, 0.7])
    assert len(a.problems) == 1 and a.problems[0].startswith("/d/c.txt:2: "), a.problems
    assert reason in a.problems[0], a.problems
    assert a.n_malformed + a.n_dropped_empty + a.n_duplicates == 1 and a.n_lines == 3


def test_negative_coordinates_are_clipped_not_dropped() -> None:
    a = _one("1.0: -5, -3, 10, 8, 1\n")
    np.testing.assert_array_equal(a.boxes, np.array([[0, 0, 10, 8]], np.float32))
    assert (a.n_clipped, a.n_dropped_empty, a.problems) == (1, 0, [])


def test_repeated_times_same_track_are_dropped_several_drones_kept() -> None:
    text = (
        "1.0: 10, 10, 20, 20, 1, DJI\n"
        "1.0: 50, 50, 60, 60, 2, DJI\n"  # another drone at the same time: fine
        "1.00: 11, 11, 21, 21, 1, DJI\n"  # line 3: track 1 again at 1.0
        "2.0: 10, 10, 20, 20\n"
        "2.0: 10, 10, 20, 20\n"  # line 5: no id, same box and time
        "2.0: 30, 30, 40, 40\n"  # no id, another box: kept
    )
    a = _one(text)
    assert len(a.box_t) == 4 and a.n_duplicates == 2
    assert a.problems == [
        "/d/c.txt:3: repeats line 1 (same time 1.0 and track id 1); dropped",
        "/d/c.txt:5: repeats line 4 (same time 2.0 and box); dropped",
    ]
    np.testing.assert_array_equal(a.track_ids, [1, 2, -1, -1])


def test_box_that_rounds_to_empty_in_float32_is_dropped() -> None:
    a = _one("1.0: 1279.99999999, 5, 1280.0000001, 9\n")
    assert len(a.box_t) == 0 and a.n_dropped_empty == 1


def test_line_numbers_follow_cr_lf_and_lone_cr() -> None:
    a = parse_annotations(b"0.1: 1, 2, 3, 4\r\nbad\rbad\n\x0c\x1cbad\n", "c.txt")
    assert [p.split(":")[1] for p in a.problems] == ["2", "3", "4"]
