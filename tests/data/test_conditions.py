"""A sequence's conditions: the side file, FRED's official test lists, table order."""

from __future__ import annotations

from pathlib import Path

import pytest

from fredfusion.data.conditions import (
    official_conditions,
    read_conditions,
    sequence_conditions,
    sort_conditions,
    write_conditions,
)


def test_official_lists_by_sequence_id() -> None:
    # FRED_FORMAT.md: 8 only canonical, 10 only challenging, 9 both, 0 neither
    assert official_conditions(8) == ["canonical"]
    assert official_conditions(10) == ["challenging"]
    assert official_conditions(9) == ["canonical", "challenging"]
    assert official_conditions(0) == [] and official_conditions(231) == []


def test_side_file_replaces_the_official_lists(tmp_path: Path) -> None:
    problems: list[str] = []
    assert read_conditions(tmp_path) is None
    assert sequence_conditions(tmp_path, 9, problems) == ["canonical", "challenging"]
    write_conditions(tmp_path, ["night", "small", "night"], scenario="night+small")
    assert read_conditions(tmp_path) == ["night", "small"]
    assert sequence_conditions(tmp_path, 9, problems) == ["night", "small"]
    write_conditions(tmp_path, [])
    assert sequence_conditions(tmp_path, 9, problems) == []  # an empty list is a list
    assert problems == []
    with pytest.raises(ValueError, match="bad condition name 'a b'"):
        write_conditions(tmp_path, ["a b"])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not a JSON file"),
        (b'["night"]', 'expected {"conditions": [names]}'),
        (b'{"conditions": "night"}', 'expected {"conditions": [names]}'),
        (b'{"conditions": ["night", 3]}', "bad condition name 3"),
        (b'{"conditions": ["../x"]}', "bad condition name '../x'"),
        (b"\xff\xfe", "not a JSON file"),
        (b" " * 70000, "larger than 65536 bytes"),
    ],
)
def test_unusable_side_file_is_a_problem(tmp_path: Path, content: bytes, fragment: str) -> None:
    (tmp_path / "conditions.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"conditions\.json: "):
        read_conditions(tmp_path)
    problems: list[str] = []
    assert sequence_conditions(tmp_path, 8, problems) == []
    assert len(problems) == 1 and fragment in problems[0] and "sequence 8 gets no condition" in problems[0]


def test_table_order() -> None:
    names = ["zeta", "challenging", "small", "night", "day", "alpha", "canonical", "night"]
    assert sort_conditions(names) == ["day", "night", "small", "canonical", "challenging", "alpha", "zeta"]
