"""Experiment loggers beside TensorBoard, off unless asked for: Weights & Biases (``wandb``) and MLflow
(``mlflow``). Both work offline: W&B writes an offline run under ``RUN/wandb`` (``wandb sync`` uploads
it later) unless ``WANDB_MODE`` says otherwise; MLflow writes a file store in ``RUN/mlruns`` unless
``MLFLOW_TRACKING_URI`` names another store. Each gets the run's config once and one row of metrics per
epoch (the columns of results.csv, step = epoch); a resumed run continues the same logged run (its id is
kept in ``RUN/loggers.json``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from fredfusion.config import ConfigError, TrainConfig

EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
"""Config field -> (module, pip extra)."""


class ExperimentLogger(Protocol):
    """What RunLog calls: one row per epoch, then close."""

    def epoch(self, row: dict[str, Any], epoch: int) -> None: ...

    def close(self) -> None: ...


def check_loggers(cfg: TrainConfig) -> None:
    """ConfigError naming the flag and the extra when a logger is asked for and not installed."""
    for field, (module, extra) in EXTRAS.items():
        if getattr(cfg, field) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f'--{field}: the {module} package is not installed; pip install -e ".[{extra}]"'
            )


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class _Ids:
    """The logged runs' ids in ``RUN/loggers.json``, so that a resumed run continues them."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.path = run_dir / "loggers.json"
        self.ids: dict[str, str] = {}
        if resume and self.path.is_file():
            self.ids = json.loads(self.path.read_text())

    def save(self, name: str, run_id: str) -> None:
        from fredfusion.files import write_json_atomic

        self.ids[name] = run_id
        write_json_atomic(self.path, self.ids, indent=1)


class WandbLogger:
    """Weights & Biases: offline unless ``WANDB_MODE`` is set; project ``WANDB_PROJECT`` or fredfusion."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, ids: _Ids) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fredfusion"),
            name=run_dir.name,
            dir=str(run_dir),
            id=ids.ids.get("wandb"),
            resume="allow",
            config=cfg.to_dict(),
            mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(console="off", silent=True),
        )
        ids.save("wandb", self.run.id)

    def epoch(self, row: dict[str, Any], epoch: int) -> None:
        """Log the epoch's metrics at step ``epoch``."""
        self.run.log(_metrics(row), step=epoch)

    def close(self) -> None:
        """Finish the run (offline: its files are complete)."""
        self.run.finish()


class MlflowLogger:
    """MLflow: a file store in RUN/mlruns unless ``MLFLOW_TRACKING_URI``; experiment
    ``MLFLOW_EXPERIMENT_NAME`` or fredfusion; the config as parameters of a new run."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, ids: _Ids) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = ids.ids.get("mlflow")
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fredfusion")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in cfg.to_dict().items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            ids.save("mlflow", self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def epoch(self, row: dict[str, Any], epoch: int) -> None:
        """Log the epoch's metrics at step ``epoch``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, epoch) for k, v in _metrics(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id)


def open_loggers(cfg: TrainConfig, run_dir: Path, resume: bool) -> list[ExperimentLogger]:
    """The loggers ``cfg`` asks for (``wandb``, ``mlflow``), continuing the logged runs when ``resume``."""
    check_loggers(cfg)
    ids = _Ids(run_dir, resume)
    loggers: list[ExperimentLogger] = []
    if cfg.wandb:
        loggers.append(WandbLogger(cfg, run_dir, ids))
    if cfg.mlflow:
        loggers.append(MlflowLogger(cfg, run_dir, ids))
    return loggers
