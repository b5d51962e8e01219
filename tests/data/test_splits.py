"""Tests for sequence-level splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from fredfusion.data.fred import FredError
from fredfusion.data.splits import (
    CANONICAL_TEST_IDS,
    CHALLENGING_TEST_IDS,
    assign_splits,
    plan_splits,
)

ALL_IDS = list(range(231))


def test_official_lists_exact() -> None:
    assert len(CANONICAL_TEST_IDS) == 47 and len(CHALLENGING_TEST_IDS) == 59
    assert min(CANONICAL_TEST_IDS) == 8 and max(CANONICAL_TEST_IDS) == 230
    assert {8, 9, 12, 110, 142, 230} <= CANONICAL_TEST_IDS and 10 not in CANONICAL_TEST_IDS
    assert {9, 10, 17, 100, 176, 195} <= CHALLENGING_TEST_IDS and 8 not in CHALLENGING_TEST_IDS
    assert sorted(CANONICAL_TEST_IDS & CHALLENGING_TEST_IDS) == [
        9, 21, 29, 34, 83, 90, 110, 111, 114, 142, 178, 179, 194, 195
    ]  # fmt: skip
    assert sum(CANONICAL_TEST_IDS) == 5542 and sum(CHALLENGING_TEST_IDS) == 5769


@pytest.mark.parametrize(
    "name,test_ids", [("canonical", CANONICAL_TEST_IDS), ("challenging", CHALLENGING_TEST_IDS)]
)
def test_official_membership_and_val_carve(name: str, test_ids: frozenset[int]) -> None:
    a = assign_splits(ALL_IDS, name, val_fraction=0.1, seed=0)
    assert sorted(a) == ALL_IDS
    assert {i for i, s in a.items() if s == "test"} == set(test_ids)
    val = {i for i, s in a.items() if s == "val"}
    n_train_pool = 231 - len(test_ids)
    assert len(val) == round(0.1 * n_train_pool)
    assert not val & test_ids
    # deterministic for a seed, different for another seed
    assert assign_splits(ALL_IDS, name, 0.1, seed=0) == a
    assert assign_splits(ALL_IDS, name, 0.1, seed=1) != a


def test_val_at_least_one_and_zero_fraction() -> None:
    a = assign_splits([0, 1, 8], "canonical", val_fraction=0.01)
    assert sorted(a.values()) == ["test", "train", "val"] and a[8] == "test"
    a = assign_splits([0, 1, 8], "canonical", val_fraction=0.0)
    assert a == {0: "train", 1: "train", 8: "test"}
    a = assign_splits([0, 8], "canonical", val_fraction=0.5)  # one train sequence: no val
    assert a == {0: "train", 8: "test"}


def test_fallback_for_non_fred_ids() -> None:
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 1000, 1001]  # the canonical list selects none of these
    plan = plan_splits(ids, "canonical", val_fraction=0.1, seed=3)
    assert plan.fallback and plan.source == "fallback"
    assert "deterministic sequence-level split" in plan.warnings[0]
    assert len(plan.ids("test")) == 2 and len(plan.ids("val")) == 1 and len(plan.ids("train")) == 7
    assert plan_splits(ids, "canonical", 0.1, seed=3).assignment == plan.assignment
    # only official test ids: no train left -> fallback too
    plan = plan_splits([8, 9, 12], "canonical")
    assert plan.fallback and "every" in plan.warnings[0]
    assert len(plan.ids("test")) == 1 and len(plan.ids("train")) + len(plan.ids("val")) == 2


def test_no_fallback_when_official_list_applies() -> None:
    plan = plan_splits([0, 1, 2, 9, 10], "challenging", val_fraction=0.0)
    assert not plan.fallback and plan.warnings == []
    assert plan.ids("test") == [9, 10] and plan.ids("train") == [0, 1, 2]


def test_user_split_file(tmp_path: Path) -> None:
    f = tmp_path / "split.txt"
    f.write_text("# my split\n0 train\n1 val  # comment\n\n2 test\n3 TRAIN\n99 test\n")
    plan = plan_splits([0, 1, 2, 3, 4], str(f))
    assert plan.assignment == {0: "train", 1: "val", 2: "test", 3: "train", 4: "train"}
    assert any("not listed" in w and "[4]" in w for w in plan.warnings)
    assert any("not found" in w and "[99]" in w for w in plan.warnings)


def test_user_split_file_without_val_gets_carve(tmp_path: Path) -> None:
    f = tmp_path / "split.txt"
    f.write_text("0 train\n1 train\n2 train\n3 test\n")
    a = assign_splits([0, 1, 2, 3], str(f), val_fraction=0.3)
    assert a[3] == "test" and sorted(a.values()).count("val") == 1


@pytest.mark.parametrize(
    "text,line,msg",
    [
        ("0 train\n1 holdout\n", 2, "unknown split"),
        ("0 train\nx1 test\n", 2, "bad sequence id"),
        ("# c\n0\n", 2, "expected"),
        ("0 train\n0 test\n", 2, "already assigned"),
        ("-3 train\n", 1, "bad sequence id"),
    ],
)
def test_user_split_file_errors_name_file_and_line(tmp_path: Path, text: str, line: int, msg: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(FredError, match=msg) as info:
        assign_splits([0, 1], str(f))
    assert str(info.value).startswith(f"{f}:{line}:")


def test_unknown_split_name() -> None:
    with pytest.raises(FredError, match="canonical"):
        assign_splits([0, 1], "nonexistent-split")
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits([0, 1], "canonical", val_fraction=1.5)
