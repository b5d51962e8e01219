"""``batch_size: auto``: the search (with fake "fits" functions standing in for CUDA trial steps), the
trial steps themselves on the CPU, the CPU rule through the trainer, the flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fredfusion.config import AUTO_BATCH, ConfigError, load_config
from fredfusion.engine import autobatch
from fredfusion.engine.autobatch import (
    CPU_MAX,
    AutoBatch,
    TrialSteps,
    cuda_batch,
    largest_fitting,
    measured_fits,
    resolve_auto_batches,
)
from fredfusion.engine.trainer import Trainer
from fredfusion.model import build_model
from fredfusion.model.weights import load_checkpoint
from shared import TINY_TRAIN


@pytest.mark.parametrize("start", [1, 8, 64, 512])
@pytest.mark.parametrize("limit", [1, 7, 100, 1024])
def test_search_finds_the_largest_fitting_batch_trying_each_once(start: int, limit: int) -> None:
    for threshold in [0, 1, 2, 3, 5, 8, 13, 15, 16, 17, 23, 24, 31, 64, 99, 100, 101, 187, 600, 5000]:
        tried: list[int] = []

        def fits(batch: int, threshold: int = threshold, tried: list[int] = tried) -> bool:
            tried.append(batch)
            return batch <= threshold

        batch, trials = largest_fitting(fits, start, limit)
        best = min(threshold, limit)
        assert [b for b, _ok in trials] == tried and len(set(tried)) == len(tried)
        assert all(1 <= b <= limit for b in tried) and len(tried) <= 24
        assert batch <= best and (batch == 0) == (best == 0)
        if batch == limit or best < 16:
            assert batch == best, (threshold, start, limit, trials)
        else:  # from 16 on the candidates are multiples of 8
            assert best - batch < 8 and batch % 8 == 0, (threshold, start, limit, trials)


def test_measured_fits_counts_out_of_memory_and_the_budget() -> None:
    cleaned: list[int] = []

    def trial(batch: int) -> int:
        if batch > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return batch * 1000

    fits = measured_fits(trial, budget=30_000, cleanup=lambda: cleaned.append(1))
    assert fits(30) and not fits(31) and not cleaned
    assert not fits(41) and cleaned == [1]
    batch, _ = largest_fitting(fits, 64, 1024)
    assert batch == 24  # 30 fits, rounded down to a multiple of 8


def _cfg(data: Path, run: Path, **extra: object):
    return load_config(overrides={**TINY_TRAIN, "data": str(data), "save_dir": str(run), **extra})


def test_trial_steps_and_the_measured_rule_run_on_the_cpu(
    tiny_prepared: Path, tmp_path: Path, one_thread: None
) -> None:
    """The code CUDA runs (trial steps on a model copy, the search, the line), on the CPU's memory."""
    cfg = _cfg(tiny_prepared, tmp_path, batch_size="auto", compile=True)
    model = build_model("dual", "n", num_classes=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trials = TrialSteps(
        cfg, model, device=torch.device("cpu"), amp_dtype=None, store_hw=(72, 128), frozen=True
    )
    assert trials.step.compute_loss is trials.step.loss_fn  # eager under compile: no compile per batch
    assert trials(2) >= 0
    assert all(not p.requires_grad for m in trials.model.backbone_modules() for p in m.parameters())
    trials.close()
    pick = cuda_batch(
        cfg, model, device=torch.device("cpu"), amp_dtype=None, store_hw=(72, 128), frozen=False, limit=4
    )
    assert pick.batch == 4 and "trial steps on cpu" in pick.detail and "the cap is 4" in pick.detail
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert all(p.requires_grad for p in model.parameters())


def test_phases_are_measured_as_they_train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[bool, int]] = []

    def fake_cuda_batch(cfg, model, *, device, amp_dtype, store_hw, frozen, limit):
        calls.append((frozen, limit))
        return AutoBatch(96 if frozen else 48, "fake")

    monkeypatch.setattr(autobatch, "cuda_batch", fake_cuda_batch)
    model = build_model("dual", "n", num_classes=1)
    cuda = torch.device("cuda")  # never touched: the measurement is the fake above
    cfg = load_config(overrides={"batch_size": "auto", "data": str(tmp_path)})
    assert (cfg.freeze_batch_size, cfg.unfreeze_batch_size) == (AUTO_BATCH, AUTO_BATCH)
    kwargs = {"device": cuda, "amp_dtype": None, "store_hw": (360, 640), "train_images": 1000}
    new, picks = resolve_auto_batches(cfg, model, phases={True, False}, **kwargs)
    assert (new.freeze_batch_size, new.unfreeze_batch_size) == (96, 48) and calls == [
        (False, 1000),
        (True, 1000),
    ]
    calls.clear()
    new, picks = resolve_auto_batches(cfg, model, phases={False}, world_size=4, **kwargs)  # no freeze phase
    assert (new.freeze_batch_size, new.unfreeze_batch_size) == (48, 48) and calls == [(False, 250)]
    fixed = load_config(
        overrides={"unfreeze_batch_size": "auto", "freeze_batch_size": 12, "data": str(tmp_path)}
    )
    new, picks = resolve_auto_batches(fixed, model, phases={True, False}, **kwargs)
    assert (new.freeze_batch_size, new.unfreeze_batch_size) == (12, 48) and set(picks) == {False}


def test_train_with_batch_auto_on_the_cpu_picks_prints_and_records_the_batch(
    tiny_prepared: Path, tmp_path: Path, one_thread: None
) -> None:
    lines: list[str] = []
    cfg = _cfg(
        tiny_prepared,
        tmp_path,
        batch_size="auto",
        unfreeze_epoch=1,
        no_eval_map=True,
        quick_test=True,
        quick_test_batches=1,
    )
    trainer = Trainer(cfg, log=lines.append)
    trainer.fit()
    images = len(trainer.data.train)
    want = min(CPU_MAX, images)
    (line,) = [x for x in lines if x.startswith("batch auto:")]
    lr = trainer.step.base_lr(want)
    assert line.startswith(
        f"batch auto: unfreeze phase batch {want}, base lr {lr:.2e} by the nominal-batch rule"
    )
    assert "on the CPU" in line and any(
        x.startswith(f"phase: unfreeze from epoch 1, batch {want}") for x in lines
    )
    saved = load_checkpoint(tmp_path / "dual" / "last.pth")["config"]
    assert (saved["freeze_batch_size"], saved["unfreeze_batch_size"]) == (want, want)  # resume keeps it


@pytest.mark.parametrize("value", ["auto", "AUTO", -1, "-1", 32, "32"])
def test_batch_values_accepted(value: object, tmp_path: Path) -> None:
    cfg = load_config(overrides={"batch_size": value, "data": str(tmp_path)})
    want = AUTO_BATCH if str(value).lower() in ("auto", "-1") else 32
    assert cfg.freeze_batch_size == cfg.unfreeze_batch_size == want


@pytest.mark.parametrize("value", ["foo", 0, -2, 2.5, "", True])
def test_bad_batch_values_name_the_key(value: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"batch_size: .*(>= 1 or auto|integer)"):
        load_config(overrides={"unfreeze_batch_size": value, "data": str(tmp_path)})
