"""Experiment loggers beside TensorBoard: off unless asked for, offline files, resumed runs continued;
the tests with a library run when it is installed (the wandb / mlflow extras) and skip otherwise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fredfusion.cli import main
from fredfusion.config import load_config
from fredfusion.engine.run_log import RunLog
from fredfusion.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "mAP50": 0.1, "mAP50_95": None, "lr": 1e-3},
    {"epoch": 2, "train_loss": 0.3, "val_loss": 0.2, "mAP50": 0.6, "mAP50_95": 0.2, "lr": float("nan")},
]


def _log_two_epochs(run: Path, **asked: bool) -> dict:
    """Epoch 1, then a resumed RunLog for epoch 2 (a new process in real life); the ids it kept."""
    cfg = load_config(overrides={"save_dir": str(run.parent), "name": run.name, **asked})
    log = RunLog(run, cfg=cfg)
    log.epoch_row(ROWS[0])
    log.close()
    first = json.loads((run / "loggers.json").read_text())
    log = RunLog(run, resume_epoch=1, cfg=cfg)
    log.epoch_row(ROWS[1])
    log.close()
    assert json.loads((run / "loggers.json").read_text()) == first  # the same logged run continues
    return first


def test_off_unless_asked_for(tmp_path: Path) -> None:
    cfg = load_config()
    assert (cfg.wandb, cfg.mlflow) == (False, False)
    log = RunLog(tmp_path, cfg=cfg)
    log.epoch_row(ROWS[0])
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "results.csv", "tensorboard"]


@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_a_logger_that_is_not_installed_is_a_one_line_error(
    logger: str, tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == logger else find_spec(n, *a))
    argv = ["train", "--data", str(tiny_prepared), "--save_dir", str(tmp_path), f"--{logger}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"fredfusion train: error: --{logger}: the {logger} package is not installed; "
        f'pip install -e ".[{logger}]"'
    )
    assert not any(tmp_path.iterdir())


def test_wandb_writes_an_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    run = tmp_path / "dual"
    ids = _log_two_epochs(run, wandb=True)
    files = sorted((run / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert files  # one offline run per process start (named by the second), one id: `wandb sync` merges them
    data = b"".join(f.read_bytes() for f in files)  # records hold keys and JSON values as plain bytes
    for text in (b"unfreeze_epoch", b"train_loss", b"val_loss", b"mAP50", b"0.6", ids["wandb"].encode()):
        assert text in data, text


def test_mlflow_writes_a_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    run = tmp_path / "dual"
    ids = _log_two_epochs(run, mlflow=True)
    client = MlflowClient((run / "mlruns").resolve().as_uri())
    logged = client.get_run(ids["mlflow"])
    assert logged.info.run_name == "dual" and logged.info.status == "FINISHED"
    assert logged.data.params["model"] == "s" and logged.data.params["mlflow"] == "True"
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "mAP50")] == [
        (1, 0.1),
        (2, 0.6),
    ]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "lr")] == [1]  # NaN not logged


def test_training_logs_each_epoch(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    original = Trainer._loader
    monkeypatch.setattr(Trainer, "_loader", lambda self, ds, batch, _max: original(self, ds, batch, 2))
    cfg = load_config(
        overrides={
            "data": str(tiny_prepared), "save_dir": str(tmp_path), "model": "n", "input_shape": [64, 128],
            "freeze_train": False, "unfreeze_epoch": 2, "unfreeze_batch_size": 8, "num_workers": 0,
            "eval_period": 1, "precise_bn": 8, "save_period": 0, "mlflow": True,
        }
    )  # fmt: skip
    Trainer(cfg, log=lambda _m: None).fit()
    run_id = json.loads((tmp_path / "dual" / "loggers.json").read_text())["mlflow"]
    client = MlflowClient((tmp_path / "dual" / "mlruns").resolve().as_uri())
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "mAP50")] == [1, 2]
