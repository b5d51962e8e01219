"""`fredfusion train` killed with SIGKILL at the worst moments, then continued with --resume.

One run folder goes through four kills in a row, each in a fresh ``fredfusion train`` process
(fault_child.py installs the kill): mid-epoch, during evaluation, halfway through writing
``last.pth`` and halfway through copying it to ``epNNN.pth``. After every kill each ``*.pth`` in
the folder must load and equal the same file of an uninterrupted run; the last ``--resume``
finishes the run, whose final state must equal the uninterrupted run's. "Equal" is bit for bit: model
parameters and buffers, EMA and its update count, optimizer state (momentum buffers, step counts) and
its hyper-parameters, on this CPU with the same thread count.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from fredfusion.cli import main
from fredfusion.model.weights import load_checkpoint
from shared import same_bits

EPOCHS = 3
BATCH = 8


def _train_args(data: Path, save_dir: Path, resume: bool = False) -> list[str]:
    args = ["train", "--data", str(data), "--save_dir", str(save_dir), "--model", "n"]
    args += ["--input_shape", "64", "128", "--freeze_train", "false", "--batch_size", str(BATCH)]
    args += ["--num_workers", "0", "--persistent_workers", "false", "--eval_period", "1"]
    args += ["--warmup_epochs", "0.5", "--log_interval", "1", "--save_period", "1", "--precise_bn", "8"]
    args += ["--eval_batch_size", "16", "--unfreeze_epoch", str(EPOCHS), "--seed", "0", "--device", "cpu"]
    return [*args, "--resume"] if resume else args


def _steps_per_epoch(data: Path) -> int:
    """Steps of an epoch of the default dual run (its images: ``pairs: auto`` resolved)."""
    from fredfusion.config import TrainConfig, train_pairs
    from fredfusion.data.dataset import PreparedDataset

    pairs = train_pairs(TrainConfig(modality="dual"))
    return len(PreparedDataset(data, "train", modality="dual", pairs=pairs, skip_bad=True)) // BATCH


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts / lists by path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}/{i}").items()}
    return {prefix: tree}


def _assert_same_state(got: dict[str, Any], want: dict[str, Any], what: str) -> int:
    """model, ema, ema_updates, optimizer and RNG state of two checkpoints are equal bit for bit; returns the
    number of values compared."""
    keys = ("model", "ema", "ema_updates", "optimizer", "rng")
    a, b = _flat({k: got[k] for k in keys}), _flat({k: want[k] for k in keys})
    assert a.keys() == b.keys(), f"{what}: {sorted(a.keys() ^ b.keys())[:5]}"
    differ = [k for k in b if not same_bits(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(b)} values differ, e.g. {differ[:5]}"
    return len(b)


def _check_run_folder(run: Path, reference: Path, stage: str, last_epoch: int) -> list[str]:
    """Every *.pth loads (none is half-written) and holds exactly the uninterrupted run's state of
    the epoch it claims (none is loadable but wrong). Returns the names of temp files present."""
    names = sorted(p.name for p in run.glob("*.pth"))
    assert "last.pth" in names, stage
    for name in names:
        got = load_checkpoint(run / name)  # raises CheckpointError on a half-written file
        want = load_checkpoint(reference / f"ep{got['epoch']:03d}.pth")
        if name == "best.pth":  # the evaluated weights: EMA of that epoch
            assert got["model"].keys() == want["ema"].keys(), f"{stage}: {name}"
            differ = [k for k, v in want["ema"].items() if not same_bits(got["model"][k], v)]
            assert not differ, f"{stage}: {name}: {differ[:5]}"
        else:
            _assert_same_state(got, want, f"{stage}: {name}")
    assert load_checkpoint(run / "last.pth")["epoch"] == last_epoch, stage
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def _kill(run_child: Any, fault: str, n: int, args: list[str]) -> str:
    proc = run_child(fault, n, args)
    assert proc.returncode == -signal.SIGKILL, f"{fault} {n}: rc {proc.returncode}\n{proc.output[-3000:]}"
    return proc.output


@pytest.mark.reliability
def test_sigkill_at_four_moments_then_resume_equals_uninterrupted(
    small_sample: Any, tmp_path: Path, run_child: Any, one_thread: None, capsys: pytest.CaptureFixture
) -> None:
    data = small_sample.prepared
    steps = _steps_per_epoch(data)
    assert steps >= 2  # so that "mid-epoch" is inside an epoch

    # the uninterrupted run (this process, same thread count as the children)
    assert main(_train_args(data, tmp_path / "straight")) == 0
    reference = tmp_path / "straight" / "dual"
    assert load_checkpoint(reference / "last.pth")["epoch"] == EPOCHS

    save_dir = tmp_path / "killed"
    run = save_dir / "dual"
    temps: dict[str, list[str]] = {}

    # 1. mid-epoch: before the second step of epoch 2
    out = _kill(run_child, "train-step", steps + 2, _train_args(data, save_dir))
    assert "epoch 1: mAP50" in out and "epoch 2: mAP50" not in out
    temps["mid-epoch"] = _check_run_folder(run, reference, "killed mid-epoch", 1)

    # 2. during the evaluation after epoch 2 (inference done, metrics being computed)
    out = _kill(run_child, "eval", 1, _train_args(data, save_dir, resume=True))
    assert "continuing at epoch 2" in out and "epoch 2: mAP50" not in out
    temps["evaluation"] = _check_run_folder(run, reference, "killed during evaluation", 1)

    # 3. while last.pth of epoch 2 is written: half of it is in the temp file
    _kill(run_child, "save-last", 2, _train_args(data, save_dir, resume=True))
    temps["last.pth write"] = _check_run_folder(run, reference, "killed writing last.pth", 1)
    assert any(t.startswith(".last.pth.") for t in temps["last.pth write"])

    # 4. halfway through copying last.pth of epoch 2 to ep002.pth
    _kill(run_child, "copy-last", 1, _train_args(data, save_dir, resume=True))
    temps["ep002.pth copy"] = _check_run_folder(run, reference, "killed copying to ep002.pth", 2)

    # --resume finishes the run
    assert main(_train_args(data, save_dir, resume=True)) == 0
    _check_run_folder(run, reference, "resumed to the end", EPOCHS)
    got, want = load_checkpoint(run / "last.pth"), load_checkpoint(reference / "last.pth")
    compared = _assert_same_state(got, want, "final last.pth")
    for key in ("epoch", "best", "best_epoch"):
        assert got[key] == want[key], key
    left = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
    report = {
        "values_equal_bit_for_bit": compared,
        "temp_files_after_each_kill": temps,
        "temp_files_left_at_the_end": left,
        "results_csv_epochs": [r.split(",")[0] for r in (run / "results.csv").read_text().splitlines()[1:]],
    }
    (tmp_path / "kill_report.json").write_text(json.dumps(report, indent=1))
    with capsys.disabled():
        print(
            f"\nkill -9 + resume: {compared} values of model, EMA and optimizer equal the uninterrupted run's"
        )
        print(f"temp files of killed writes left in the run folder at the end: {left or 'none'}")
        print(f"results.csv epochs: {report['results_csv_epochs']}")
    # temp files of killed writes are removed by the next run; results.csv has each epoch once
    assert left == []
    assert report["results_csv_epochs"] == [str(e) for e in range(1, EPOCHS + 1)]
    reference_csv = (reference / "results.csv").read_text().splitlines()
    assert (run / "results.csv").read_text().splitlines()[0] == reference_csv[0]
