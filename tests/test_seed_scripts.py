"""The seed workflow: python train_fred_fusion.py --modality ... prepares $FRED_ROOT and trains into logs/.

One working folder goes through the seed tool's sequence: an RGB run (a process of its own, which also
prepares the data), then dual runs that start from its ``logs/fred_rgb/fred_rgb_best.pth``, one stopped
after epoch 1 and continued with ``--resume``, one with ``--freeze_training``, and an event run. The later
runs execute the scripts in this process (``runpy``), so that what they compute can be counted.
``train_fred_fusion_optimized.py`` is an alias of ``train_fred_fusion.py``; the test checks that it is.
"""

from __future__ import annotations

import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fredfusion.eval.evaluator as evaluator
from fredfusion.data.synth import write_sample
from fredfusion.engine.step import TrainStep
from fredfusion.engine.trainer import Trainer
from fredfusion.model.weights import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT, ALIAS = REPO / "train_fred_fusion.py", REPO / "train_fred_fusion_optimized.py"
TINY = ["--phi", "n", "--input_shape", "64", "128", "--batch_size", "4", "--num_workers", "0"]
TINY += ["--precise_bn", "8", "--warmup_epochs", "0.5", "--log_interval", "1"]


class _Stopped(Exception):
    """Ends a run right after an epoch's checkpoints, as a kill between epochs would."""


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Training steps and mAP computations of the in-process runs."""
    seen = {"steps": 0, "map": 0}
    run, coco_map = TrainStep.run, evaluator.coco_map

    def step(self, *args, **kwargs):
        seen["steps"] += 1
        return run(self, *args, **kwargs)

    def mean_ap(*args, **kwargs):
        seen["map"] += 1
        return coco_map(*args, **kwargs)

    monkeypatch.setattr(TrainStep, "run", step)
    monkeypatch.setattr(evaluator, "coco_map", mean_ap)
    return seen


def _run_here(
    script: Path, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """Run ``script ARGS`` in this process (as ``python script ARGS`` would); returns what it printed."""
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", [str(script), *args])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr()
    assert info.value.code == 0, out.out[-3000:] + out.err[-3000:]
    return out.out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _backbones(model: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}


def test_seed_scripts_rgb_then_dual_resume_freeze_training_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], counts, one_thread
) -> None:
    write_sample(tmp_path / "fred", sequences=4, frames=8, width=320, height=180, seed=3)
    monkeypatch.setenv("FRED_ROOT", str(tmp_path / "fred"))
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"

    # 1. rgb, as its own process: prepares $FRED_ROOT once, evaluates mAP, best also as fred_rgb_best.pth
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--modality",
        "rgb",
        "--epochs",
        "1",
        "--freeze_train",
        "false",
        *TINY,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is not prepared yet" in proc.stdout and "epoch 1: mAP50" in proc.stdout
    assert (tmp_path / "datasets" / "fred_coco" / "annotations" / "instances_train.json").is_file()
    rgb_best = load_checkpoint(logs / "fred_rgb" / "fred_rgb_best.pth")
    assert rgb_best["meta"]["modality"] == "rgb" and rgb_best["metrics"]["mAP50"] is not None

    # 2. dual in the same folder, 2 epochs of which 1 frozen, mAP off; stopped after epoch 1
    dual = ["--modality", "dual", "--epochs", "2", "--freeze_train", "true", "--freeze_epoch", "1"]
    dual += ["--no_eval_map", "--eval_period", "1", *TINY]
    end_epoch = Trainer._end_epoch

    def stop_after_first(self, epoch, *args):
        summary = end_epoch(self, epoch, *args)
        if epoch == 0:
            raise _Stopped
        return summary

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_end_epoch", stop_after_first)
        m.setattr(sys, "argv", [str(SCRIPT), *dual])
        with pytest.raises(_Stopped):
            runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "is not prepared yet" not in out
    assert "logs/fred_rgb/fred_rgb_best.pth" in out and "phase: freeze" in out
    run = logs / "fred_fusion"
    epoch1 = load_checkpoint(run / "last.pth")
    assert epoch1["epoch"] == 1 and epoch1["meta"]["modality"] == "dual"
    # it started from the RGB run's best weights: both backbones hold them, untouched by the frozen epoch
    rgb_backbone = _backbones(rgb_best["model"], "backbone.")
    for prefix in ("backbone_rgb.", "backbone_event."):
        dual_backbone = _backbones(epoch1["model"], prefix)
        assert dual_backbone.keys() == rgb_backbone.keys()
        assert all(torch.equal(dual_backbone[k], v) for k, v in rgb_backbone.items()), prefix
    # --no_eval_map: no mAP computed, the validation loss still is
    assert counts["map"] == 0 and "mAP evaluation off" in out and "epoch 1: val_loss" in out
    rows = _csv(run / "results.csv")
    assert [r["epoch"] for r in rows] == ["1"] and rows[0]["mAP50"] == "" and float(rows[0]["val_loss"]) > 0
    steps_per_epoch = counts["steps"]
    assert steps_per_epoch >= 2

    # 3. the same command with --resume continues at epoch 2 (the unfreeze phase) and only trains that
    out = _run_here(SCRIPT, [*dual, "--resume"], monkeypatch, capsys)
    assert "continuing at epoch 2" in out and "phase: unfreeze from epoch 2" in out
    assert counts["steps"] == 2 * steps_per_epoch and counts["map"] == 0
    last = load_checkpoint(run / "last.pth")
    assert last["epoch"] == 2 and [r["epoch"] for r in _csv(run / "results.csv")] == ["1", "2"]
    assert not torch.equal(
        last["model"]["backbone_rgb.stem.conv.weight"], epoch1["model"]["backbone_rgb.stem.conv.weight"]
    )

    # 4. --freeze_training (through the alias script) trains the freeze phase only
    frozen = ["--modality", "dual", "--epochs", "3", "--freeze_epoch", "1", "--freeze_training"]
    out = _run_here(ALIAS, [*frozen, "--name", "fred_fusion_frozen", *TINY], monkeypatch, capsys)
    assert "phase: freeze" in out and "phase: unfreeze" not in out
    assert counts["steps"] == 3 * steps_per_epoch
    assert load_checkpoint(logs / "fred_fusion_frozen" / "last.pth")["epoch"] == 1

    # 5. event (through the alias script)
    event = ["--modality", "event", "--epochs", "1", "--freeze_train", "false", *TINY]
    before = dict(counts)
    out = _run_here(ALIAS, event, monkeypatch, capsys)
    event_best = load_checkpoint(logs / "fred_event" / "fred_event_best.pth")
    assert event_best["meta"]["modality"] == "event" and "epoch 1: mAP50" in out
    assert counts["map"] == before["map"] + 1 and counts["steps"] > before["steps"]


def test_the_optimized_script_is_an_alias(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same parser (same --help), and it runs train_fred_fusion.py rather than code of its own."""
    helps = []
    for script in (SCRIPT, ALIAS):
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", [str(script), "--help"])
            with pytest.raises(SystemExit) as info:
                runpy.run_path(str(script), run_name="__main__")
        assert info.value.code == 0
        helps.append(capsys.readouterr().out)
    assert helps[0] == helps[1] and "--freeze_training" in helps[0] and "--fred_root" in helps[0]
    ran = []
    with monkeypatch.context() as m:
        m.setattr(runpy, "run_path", lambda path, **kwargs: ran.append((Path(path), kwargs)))
        exec(compile(ALIAS.read_text(), str(ALIAS), "exec"), {"__name__": "__main__", "__file__": str(ALIAS)})
    assert ran == [(SCRIPT, {"run_name": "__main__"})]
