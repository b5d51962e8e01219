"""results.csv: one row per epoch, including after a resume from an earlier checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

from fredfusion.engine.run_log import CSV_COLUMNS, RunLog


def _epochs(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(CSV_COLUMNS)
    return [r[0] for r in rows[1:]]


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    for epoch in (1, 2, 3):
        log.epoch_row({"epoch": epoch, "train_loss": 1.0 / epoch, "bad_frames": 0, "bad_steps": 0})
    log.close()
    assert _epochs(tmp_path / "results.csv") == ["1", "2", "3"]

    # the process died after writing epoch 3's row but before saving last.pth of epoch 3
    log = RunLog(tmp_path, resume_epoch=2)
    log.epoch_row({"epoch": 3, "train_loss": 0.25, "bad_frames": 4, "bad_steps": 1})
    log.close()
    assert _epochs(tmp_path / "results.csv") == ["1", "2", "3"]
    with (tmp_path / "results.csv").open(newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    assert (last["train_loss"], last["bad_frames"], last["bad_steps"]) == ("0.25", "4", "1")


def test_a_new_run_starts_a_new_file(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.epoch_row({"epoch": 1})
    log.close()
    RunLog(tmp_path).close()
    assert _epochs(tmp_path / "results.csv") == []
