"""Runs never overwrite each other (dual, dual2, dual3 unless exist_ok), and `--resume RUN_DIR` alone
continues with the config saved in the checkpoint, flags given alongside overriding it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fredfusion.cli import main
from fredfusion.config import load_config
from fredfusion.engine.checkpoint import claim_run_dir
from fredfusion.engine.trainer import Trainer
from fredfusion.model.weights import load_checkpoint

TINY = [
    "--model", "n", "--input_shape", "64", "128", "--freeze_train", "false", "--batch", "8",
    "--num_workers", "0", "--persistent_workers", "false", "--eval_period", "1", "--warmup_epochs", "0.5",
    "--save_period", "0", "--precise_bn", "8", "--eval_batch_size", "16", "--device", "cpu",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def two_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every epoch has 2 batches."""
    original = Trainer._loader
    monkeypatch.setattr(Trainer, "_loader", lambda self, ds, batch, _max: original(self, ds, batch, 2))


def test_claim_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "dual"
    assert claim_run_dir(run) == run and run.is_dir()  # free: created
    assert claim_run_dir(run) == run  # still empty: nothing to overwrite
    (run / "last.pth").write_bytes(b"x")
    assert claim_run_dir(run) == tmp_path / "runs" / "dual2"
    (tmp_path / "runs" / "dual2" / "results.csv").write_text("epoch\n")
    assert claim_run_dir(run) == tmp_path / "runs" / "dual3"
    assert (tmp_path / "runs" / "dual3").is_dir()


def test_a_second_run_gets_the_next_free_name_and_resume_takes_the_saved_config(
    tiny_prepared: Path, tmp_path: Path, two_batches: None, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    argv = ["train", "--data", str(tiny_prepared), "--save_dir", str(runs), *TINY, "--epochs", "1"]
    assert main(argv) == 0
    first = {p.name: p.read_bytes() for p in (runs / "dual").iterdir() if p.is_file()}
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"run folder {runs / 'dual'} is taken: this run writes {runs / 'dual2'}" in printed
    for name in ("best.pth", "last.pth", "results.csv", "config.yaml"):  # the first run is untouched
        assert (runs / "dual" / name).read_bytes() == first[name], name
    assert load_checkpoint(runs / "dual2" / "last.pth")["config"]["name"] == "dual2"

    # --resume RUN_DIR alone: the saved config, with the flags given printed as overrides
    assert main(["train", "--resume", str(runs / "dual2"), "--epochs", "2", "--precise_bn", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"resume: {runs / 'dual2' / 'last.pth'} with its saved config" in printed
    assert "resume: unfreeze_epoch 1 -> 2 (given on the command line)" in printed
    assert "resume: precise_bn 8 -> 4 (given on the command line)" in printed
    assert "continuing at epoch 2" in printed
    last = load_checkpoint(runs / "dual2" / "last.pth")
    assert (
        last["epoch"] == 2 and last["config"]["model"] == "n" and last["config"]["input_shape"] == [64, 128]
    )
    rows = (runs / "dual2" / "results.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert not (runs / "dual3").exists()


class _Stop(Exception):
    pass


def test_exist_ok_writes_the_taken_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(run_dir: Path) -> None:
        raise _Stop(run_dir)

    monkeypatch.setattr("fredfusion.engine.trainer.prepare_run_dir", stop)
    (tmp_path / "dual").mkdir()
    (tmp_path / "dual" / "last.pth").write_bytes(b"x")
    for exist_ok, expected in ((True, "dual"), (False, "dual2")):
        trainer = Trainer(load_config(overrides={"save_dir": str(tmp_path), "exist_ok": exist_ok}))
        with pytest.raises(_Stop):
            trainer.fit()
        assert trainer.run_dir == tmp_path / expected and trainer.cfg.run_dir() == trainer.run_dir
