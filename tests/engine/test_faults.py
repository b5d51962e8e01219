"""Training-time faults: unreadable images, NaN/inf steps, out of memory, unwritable checkpoints."""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from fredfusion.config import load_config
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import rank_indices
from fredfusion.engine import step as step_mod
from fredfusion.engine import trainer as trainer_mod
from fredfusion.engine.optim import scaled_lr
from fredfusion.engine.step_guard import StepGuard, restore_where_, zero_where_
from fredfusion.engine.trainer import Trainer, TrainingStopped
from fredfusion.model.detector import FusionYOLO
from fredfusion.model.loss import YoloLoss
from fredfusion.model.weights import load_checkpoint

FAST = {
    "model": "n",
    "input_shape": [32, 64],
    "freeze_train": False,
    "unfreeze_batch_size": 4,
    "freeze_batch_size": 4,
    "num_workers": 0,
    "persistent_workers": False,
    "eval_period": 1,
    "warmup_epochs": 0.5,
    "log_interval": 1,
    "save_period": 0,
    "precise_bn": 0,
    "no_eval_map": True,
    "unfreeze_epoch": 1,
}
NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def prepared(tiny_prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny prepared folder without its val split (no evaluation: faster)."""
    root = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, root)
    (root / "annotations" / "instances_val.json").unlink()
    return root


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch):
    """Call with n: every epoch has n batches."""

    def limit(n: int) -> None:
        original = Trainer._loader
        monkeypatch.setattr(Trainer, "_loader", lambda self, ds, batch, _max: original(self, ds, batch, n))

    return limit


def _trainer(data: Path, run: Path, logs: list[str], **extra) -> Trainer:
    cfg = load_config(overrides={**FAST, "data": str(data), "save_dir": str(run), **extra})
    return Trainer(cfg, log=logs.append)


def _all_finite(tree: object) -> bool:
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_all_finite(v) for v in tree)
    return True


def _snapshots(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, bytes]]:
    """Bytes of best.pth / last.pth right after each epoch's save, by epoch."""
    saved: dict[int, dict[str, bytes]] = {}
    original = Trainer._save

    def save(self, epoch, state, row):
        original(self, epoch, state, row)
        saved[epoch + 1] = {n: (self.run_dir / n).read_bytes() for n in ("best.pth", "last.pth")}

    monkeypatch.setattr(Trainer, "_save", save)
    return saved


# ------------------------------------------------------------------------- NaN / inf on the device


def test_zero_and_restore_where_clear_nan_without_touching_good_steps() -> None:
    a = torch.tensor([NAN, 1.5, float("inf")])
    b = torch.tensor([[2.0, -3.0]], dtype=torch.float64)
    zero_where_([a, b], torch.tensor(False))
    assert torch.equal(a[1:], torch.tensor([1.5, float("inf")])) and torch.isnan(a[0])
    zero_where_([a, b], torch.tensor(True))
    assert torch.equal(a, torch.zeros(3)) and torch.equal(b, torch.zeros(1, 2, dtype=torch.float64))

    live, saved = [torch.tensor([NAN, -float("inf")])], [torch.tensor([0.25, 7.0])]
    restore_where_(live, saved, torch.tensor(False))
    assert torch.isnan(live[0][0]) and live[0][1] == -float("inf")
    restore_where_(live, saved, torch.tensor(True))
    assert torch.equal(live[0], torch.tensor([0.25, 7.0]))


def test_step_guard_counts_runs_and_restores_buffers() -> None:
    bn = torch.nn.BatchNorm2d(2)
    guard = StepGuard(bn, torch.device("cpu"))
    grads = [torch.zeros(2)]
    # (bad step?, running mean after the step): a bad step puts back the value from before it
    for bad, mean_after in ((True, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)):
        guard.begin()
        bn.running_mean.fill_(NAN if bad else 0.5)  # what the forward pass left
        grads[0].copy_(torch.tensor([NAN, 2.0]) if bad else torch.tensor([1.0, 2.0]))
        guard.end(torch.tensor(bad), grads)
        assert torch.equal(bn.running_mean, torch.full((2,), mean_after))
        assert torch.equal(grads[0], torch.zeros(2) if bad else torch.tensor([1.0, 2.0]))
    # current run 1, longest run 2, 3 bad steps
    assert guard.counts.tolist() == [1, 2, 3]
    guard.reset_longest()
    guard.reset_epoch()
    assert guard.counts.tolist() == [1, 1, 0]


def test_nan_steps_are_skipped_counted_and_never_reach_the_weights(
    prepared: Path, tmp_path: Path, batches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches(4)
    original = step_mod.augment_batch
    calls = []

    def poisoned(rgb, event, targets, *args, **kwargs):
        rgb, event, targets = original(rgb, event, targets, *args, **kwargs)
        calls.append(1)
        if len(calls) in (2, 3):  # NaN pixels: NaN activations, BN statistics, loss and gradients
            rgb = torch.full_like(rgb, NAN)
        return rgb, event, targets

    monkeypatch.setattr(step_mod, "augment_batch", poisoned)
    logs: list[str] = []
    summary = _trainer(prepared, tmp_path, logs, max_bad_steps=3).fit()
    assert summary["bad_steps"] == 2 and summary["bad_frames"] == 0
    assert any("step 2: 1 step(s) with a non-finite loss" in m and "1 in this epoch" in m for m in logs)
    assert any("step 3: 1 step(s) with a non-finite loss" in m and "2 in this epoch" in m for m in logs)
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0  # mean of the good steps
    last = load_checkpoint(tmp_path / "dual" / "last.pth")
    assert last["epoch"] == 1
    for key in ("model", "ema", "optimizer"):
        assert _all_finite(last[key]), key
    assert any(k.endswith("running_var") for k in last["ema"])


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoints(
    prepared: Path, tmp_path: Path, batches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches(2)
    original = YoloLoss.__call__
    calls = []

    def nan_from_epoch_2(self, preds, targets):
        loss, parts = original(self, preds, targets)
        calls.append(1)
        return (loss * NAN, parts) if len(calls) > 2 else (loss, parts)

    monkeypatch.setattr(YoloLoss, "__call__", nan_from_epoch_2)
    saved = _snapshots(monkeypatch)
    logs: list[str] = []
    with pytest.raises(TrainingStopped) as info:
        _trainer(prepared, tmp_path, logs, unfreeze_epoch=3, max_bad_steps=2).fit()
    message = str(info.value)
    assert "stopping at epoch 2 step 2: 2 consecutive steps had a non-finite loss" in message
    assert "max_bad_steps is 2" in message and "kept as saved after epoch 1" in message
    assert list(saved) == [1]
    run = tmp_path / "dual"
    for name, data in saved[1].items():
        assert (run / name).read_bytes() == data, name
    assert load_checkpoint(run / "last.pth")["epoch"] == 1
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # header + epoch 1


# ---------------------------------------------------------------------------------- out of memory


def _oom_above(monkeypatch: pytest.MonkeyPatch, limit: int, after_calls: int = 0) -> list[int]:
    """FusionYOLO.forward raises torch.OutOfMemoryError for batches above limit (after some calls)."""
    original = FusionYOLO.forward
    sizes: list[int] = []

    def forward(self, rgb, event=None):
        if not torch.is_grad_enabled():  # model_info's FLOP count at build time
            return original(self, rgb, event)
        sizes.append(rgb.shape[0])
        if len(sizes) > after_calls and rgb.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, rgb, event)

    monkeypatch.setattr(FusionYOLO, "forward", forward)
    return sizes


def test_oom_in_the_first_steps_halves_the_batch_and_rescales_lr(
    prepared: Path, tmp_path: Path, batches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches(1)
    sizes = _oom_above(monkeypatch, limit=2)
    logs: list[str] = []
    trainer = _trainer(prepared, tmp_path, logs, unfreeze_batch_size=8)
    summary = trainer.fit()
    assert sizes == [8, 4, 2]
    lr4, lr2 = (scaled_lr(0.01, b, "sgd") for b in (4, 2))
    assert f"out of memory at batch 8: retrying with batch 4, lr {lr4:.2e}" in logs
    assert f"out of memory at batch 4: retrying with batch 2, lr {lr2:.2e}" in logs
    assert any(m.startswith("phase: unfreeze from epoch 1, batch 2, base lr") for m in logs)
    assert trainer._phase(0) == (False, 2) and summary["seen"] == 2
    assert load_checkpoint(tmp_path / "dual" / "last.pth")["epoch"] == 1


def test_oom_at_batch_one_or_after_the_first_steps_is_a_clear_error(
    prepared: Path, tmp_path: Path, batches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches(3)
    sizes = _oom_above(monkeypatch, limit=0)
    with pytest.raises(
        TrainingStopped, match=r"out of memory on cpu at batch 1 .*does not fit even at batch 1"
    ):
        _trainer(prepared, tmp_path / "a", [], unfreeze_batch_size=2).fit()
    assert sizes == [2, 1]

    monkeypatch.undo()
    batches(3)
    monkeypatch.setattr(trainer_mod, "OOM_RETRY_STEPS", 1)
    _oom_above(monkeypatch, limit=1, after_calls=1)
    with pytest.raises(
        TrainingStopped, match=r"at batch 2 .* at step 2 of the phase, after the first 1 steps"
    ):
        _trainer(prepared, tmp_path / "b", [], unfreeze_batch_size=2).fit()


# ------------------------------------------------------------------------------ disk / run folder


def test_disk_full_while_saving_stops_with_the_previous_checkpoint_intact(
    prepared: Path, tmp_path: Path, batches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches(1)
    saved = _snapshots(monkeypatch)
    original = torch.save
    writes = []

    def save(obj, handle, *args, **kwargs):
        writes.append(1)
        if len(writes) > 2:  # epoch 1 writes best.pth and last.pth, then the disk is full
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TrainingStopped) as info:
        _trainer(prepared, tmp_path, [], unfreeze_epoch=2).fit()
    run = tmp_path / "dual"
    assert "No space left on device; the previous checkpoint is intact" in str(info.value)
    assert f"cannot write checkpoint {run}" in str(info.value) and "--resume" in str(info.value)
    for name, data in saved[1].items():
        assert (run / name).read_bytes() == data, name
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_run_folder_fails_before_training(prepared: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    logs: list[str] = []
    with pytest.raises(TrainingStopped, match=r"run folder .*not_a_folder/dual is not writable"):
        _trainer(prepared, blocker, logs).fit()
    assert logs == []  # nothing was loaded or built


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")
def test_read_only_run_folder_fails_before_training(prepared: Path, tmp_path: Path) -> None:
    (tmp_path / "dual").mkdir()
    (tmp_path / "dual").chmod(0o500)
    try:
        with pytest.raises(TrainingStopped, match=r"is not writable .*Permission denied"):
            _trainer(prepared, tmp_path, []).fit()
    finally:
        (tmp_path / "dual").chmod(0o700)


# ---------------------------------------------------------------------------------- bad frames


def _data_file(store: Path, seq: int, kind: str) -> Path:
    """The data file of one sequence and frame kind, whatever the codec (not its json)."""
    return next(p for p in store.glob(f"seq_{seq}.{kind}.*") if p.suffix != ".json")


def _epoch_sequences(data: Path, batch: int, n_batches: int) -> list[int]:
    """Sequence of each train image the first epoch visits (the loader's order)."""
    ds = PreparedDataset(data, "train")
    pos = rank_indices(len(ds), seed=0, epoch=0, batch_size=batch)[: batch * n_batches]
    return [ds.sequence_of(i) for i in ds.ids[pos]]


def _truncate_after_start(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Damage a frame store file once the trainer has opened the data (during training)."""
    original = Trainer._build_model

    def build(self):
        with open(path, "r+b") as handle:
            handle.truncate(100)
        return original(self)

    monkeypatch.setattr(Trainer, "_build_model", build)


def test_images_damaged_during_training_are_skipped_counted_and_reported(
    prepared: Path, tmp_path: Path, batches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches(2)
    seqs = _epoch_sequences(prepared, 4, 2)
    shard = _data_file(prepared / "store", 1, "rgb")
    _truncate_after_start(monkeypatch, shard)
    logs: list[str] = []
    summary = _trainer(prepared, tmp_path, logs, max_bad_frame_share=0.5, num_workers=1).fit()
    expected = seqs.count(1)
    assert expected > 0 and summary["bad_frames"] == expected and summary["seen"] == 8
    line = f"epoch 1: {expected} of 8 train images ({expected / 8:.2%}) could not be read and were skipped"
    assert any(m.startswith(line) and str(shard) in m for m in logs), logs


def test_too_many_unreadable_images_stop_the_run(
    prepared: Path, tmp_path: Path, batches, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches(2)
    seqs = _epoch_sequences(prepared, 4, 2)
    first_bad_batch = next(k // 4 for k, s in enumerate(seqs) if s == 1)
    at_least = seqs[: 4 * (first_bad_batch + 1)].count(1)
    shard = _data_file(prepared / "store", 1, "rgb")
    _truncate_after_start(monkeypatch, shard)
    with pytest.raises(TrainingStopped) as info:
        _trainer(prepared, tmp_path / "a", []).fit()
    message = str(info.value)
    assert f"stopping in epoch 1: at least {at_least} of the epoch's 8 train images" in message
    assert "more than max_bad_frame_share 1.00%" in message and str(shard) in message
    assert "no checkpoint was saved yet" in message

    # damaged before the start: found by the start check (one size check per file), nothing trained
    monkeypatch.undo()
    logs: list[str] = []
    with pytest.raises(
        TrainingStopped, match=r"16 of 48 train images \(33\.33%\) are in damaged frame store"
    ):
        _trainer(prepared, tmp_path / "b", logs).fit()
    assert not any(m.startswith("model:") for m in logs)


def test_damaged_val_images_stop_before_training(tiny_prepared: Path, tmp_path: Path) -> None:
    root = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, root)
    val = PreparedDataset(root, "val")
    seq = val.sequence_of(int(val.ids[0]))
    event_file = _data_file(root / "store", seq, "event")
    event_file.unlink()
    with pytest.raises(TrainingStopped, match=rf"of {len(val)} val images .*{event_file.name}: missing file"):
        _trainer(root, tmp_path, []).fit()
