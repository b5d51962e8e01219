"""Training-time faults: unreadable images, NaN/inf steps, out of memory, unwritable checkpoints."""

from __future__ import annotations

import copy
import errno
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fredfusion.config import load_config, train_pairs
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import rank_indices
from fredfusion.engine import step as step_mod
from fredfusion.engine import trainer as trainer_mod
from fredfusion.engine.ema import ModelEMA, blend_weights
from fredfusion.engine.optim import build_optimizer, prepare_state, scaled_lr
from fredfusion.engine.step import TrainStep
from fredfusion.engine.step_guard import StepGuard, restore_where_
from fredfusion.engine.trainer import Trainer, TrainingStopped
from fredfusion.model.detector import FusionYOLO, build_model
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


def test_restore_where_puts_back_bits_only_where_flagged() -> None:
    live = [torch.tensor([NAN, -float("inf"), -0.0]), torch.tensor([7, -3], dtype=torch.int64)]
    saved = [torch.tensor([0.25, 7.0, 0.0]), torch.tensor([1, 2], dtype=torch.int64)]
    restore_where_(live, saved, torch.tensor(False))
    assert (
        torch.isnan(live[0][0]) and live[0][1] == -float("inf") and _same(live[0][2:], torch.tensor([-0.0]))
    )
    assert live[1].tolist() == [7, -3]
    restore_where_(live, saved, torch.tensor(True))
    assert _same(live[0], saved[0]) and live[1].tolist() == [1, 2]


def test_step_guard_counts_runs_and_restores_buffers_and_saved_tensors() -> None:
    bn = torch.nn.BatchNorm2d(2)
    guard = StepGuard(bn, torch.device("cpu"))
    weight = torch.tensor([1.0, 2.0])
    # (bad step?, running mean and weight after the step): a bad step puts back the values from before it
    for bad, after in ((True, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)):
        guard.begin()
        bn.running_mean.fill_(NAN if bad else 0.5)  # what the forward pass left
        bn.num_batches_tracked += 1
        guard.save([weight])
        weight.fill_(NAN if bad else 0.5)  # what the update wrote
        guard.end(torch.tensor(bad))
        assert torch.equal(bn.running_mean, torch.full((2,), after))
        assert torch.equal(weight, torch.full((2,), after) if after else torch.tensor([1.0, 2.0]))
    assert int(bn.num_batches_tracked) == 1  # counted by the good step only
    # current run 1, longest run 2, 3 bad steps
    assert guard.counts.tolist() == [1, 2, 3]
    guard.reset_longest()
    guard.reset_epoch()
    assert guard.counts.tolist() == [1, 1, 0]
    # a step that saved nothing does not put back an earlier step's copy
    guard.begin()
    weight.fill_(3.0)
    guard.end(torch.tensor(True))
    assert torch.equal(weight, torch.full((2,), 3.0))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _step_state(step: TrainStep) -> dict[str, torch.Tensor]:
    """Everything a training step may change: model parameters and buffers, EMA and its update count,
    optimizer state (momentum buffers, AdamW moments and step counts), GradScaler state."""
    state = {f"model.{k}": v.clone() for k, v in step.model.state_dict().items()}
    state.update({f"ema.{k}": v.clone() for k, v in step.ema.state_dict().items()})
    state["ema.updates"] = torch.tensor(step.ema.updates)
    for pid, values in step.optimizer.state_dict()["state"].items():
        for k, v in values.items():
            state[f"optimizer.{pid}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    for k, v in step.scaler.state_dict().items():
        state[f"scaler.{k}"] = torch.tensor(v)
    return state


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    changed = [k for k in want if not _same(got[k], want[k])]
    assert not changed, f"{len(changed)} of {len(want)} tensors changed, e.g. {changed[:5]}"


def _tiny_step(optimizer: str, scaler: bool = False) -> TrainStep:
    """A TrainStep on a dual YOLO-n at 32x64 (batch 2), same initial weights every time."""
    torch.manual_seed(0)
    cfg = load_config(overrides={**FAST, "data": "unused", "optimizer": optimizer, "channels_last": False})
    model = build_model("dual", "n", "concat", num_classes=1)
    step = TrainStep(
        cfg, model, 2, device=torch.device("cpu"), amp_dtype=None, optimizer_choice=(optimizer, None)
    )
    if scaler:  # the fp16 path: loss scaled, gradients unscaled, the scale halved after an overflow
        step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model.train()
    return step


def _optimize(step: TrainStep, seed: int, nan: bool = False) -> bool:
    """One step on random images with one box each; NaN pixels when ``nan``. Returns whether it was good."""
    g = torch.Generator().manual_seed(seed)
    rgb, event = torch.rand(2, 3, 32, 64, generator=g), torch.rand(2, 3, 32, 64, generator=g)
    if nan:
        rgb[0, 0, 0, 0] = NAN
    targets = torch.tensor([[0, 0, 10.0, 8.0, 20.0, 16.0], [1, 0, 30.0, 4.0, 44.0, 12.0]])
    _, ok = step.optimize(step.model, rgb, event, targets, 2)
    return bool(ok)


@pytest.mark.parametrize(("optimizer", "scaler"), [("sgd", False), ("adamw", False), ("sgd", True)])
def test_a_nan_step_is_a_bit_exact_no_op(optimizer: str, scaler: bool) -> None:
    step = _tiny_step(optimizer, scaler)
    assert _optimize(step, 1) and _optimize(step, 2)
    before, untouched = _step_state(step), copy.deepcopy(step)
    assert not _optimize(step, 3, nan=True)
    _assert_same_state(_step_state(step), before)
    assert step.guard.counts.tolist() == [1, 1, 1]
    # and it leaves no trace: the next step is the one the run without the NaN step takes
    assert _optimize(step, 4) and _optimize(untouched, 4)
    _assert_same_state(_step_state(step), _step_state(untouched))
    assert step.ema.updates == 3 and step.guard.counts.tolist() == [0, 1, 1]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_nan_first_step_leaves_the_state_of_a_fresh_run(optimizer: str) -> None:
    skipped, fresh = _tiny_step(optimizer), _tiny_step(optimizer)
    assert not _optimize(skipped, 1, nan=True)
    for seed in (2, 3):
        assert _optimize(skipped, seed) and _optimize(fresh, seed)
    _assert_same_state(_step_state(skipped), _step_state(fresh))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_state_made_before_the_first_step_updates_like_torch_lazy_state(optimizer: str) -> None:
    """prepare_state's state gives the bits torch's own first step gives (signed zeros included)."""
    torch.manual_seed(0)
    grads = [torch.randn(4, 3), torch.tensor([0.0, -0.0, 1.5]), torch.tensor([-0.0, 2.0])]
    runs = []
    for prepare in (False, True):
        model = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.linspace(-1, 1, g.numel()).view_as(g)) for g in grads]
        )
        with torch.no_grad():
            model[1][0] = -0.0
        opt = build_optimizer(model, optimizer, 0.1, 0.9, 5e-4)
        for k in range(2):
            for p, g in zip(model, grads):
                p.grad = g * (k + 1)
            if prepare:
                stepped = prepare_state(opt)
                assert len(stepped) == 3 and all(a is b for a, b in zip(stepped, model))
            opt.step()
        runs.append([*model, *(v for p in model for v in opt.state[p].values())])
    assert len(runs[0]) == len(runs[1]) and all(_same(a.detach(), b.detach()) for a, b in zip(*runs))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_update_needs_no_values_on_the_host(optimizer: str) -> None:
    """Forward, loss and the whole update (clip, guard copies, optimizer step, EMA, restore) run on fake
    CUDA tensors (shapes only), where ``.item()`` or a branch on a device value raises: nothing waits for
    the device. Backward needs a real CUDA device, so the gradients are set instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = load_config(overrides={**FAST, "data": "unused", "optimizer": optimizer})
    model = build_model("dual", "n", "concat", num_classes=1)
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deep-copying fake tensors (the EMA) warns about data pointers
        device = torch.device("cuda", 0)
        model = model.to(device)
        step = TrainStep(
            cfg, model, 2, device=device, amp_dtype=torch.bfloat16, optimizer_choice=(optimizer, None)
        )
        for _ in range(2):
            step.guard.begin()
            preds = model(torch.rand(2, 3, 32, 64, device=device), torch.rand(2, 3, 32, 64, device=device))
            loss, _parts = step.loss_fn([p.float() for p in preds], torch.zeros(3, 6, device=device))
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            bad = step.update(loss.detach())
        assert bad.device == device and step.ema.count.device == device
        assert all(v.device == device for s in step.optimizer.state.values() for v in s.values())


def test_ema_weights_looked_up_on_the_device_are_the_host_formula() -> None:
    """The blend weight of every update count equals 1 - current_decay() as the host computes it, and
    an update equals the host-side lerp with that weight, bit for bit."""
    ema = ModelEMA(torch.nn.Linear(3, 2))
    table = blend_weights(ema.decay, ema.tau)
    assert float(table[-1]) == 1.0 - ema.decay and float(table[-2]) != 1.0 - ema.decay
    for n in [*range(50), *range(50, table.numel(), 997), table.numel() - 1, table.numel() + 5]:
        ema.updates = n
        assert float(table[min(n, table.numel() - 1)]) == 1.0 - ema.current_decay(), n
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), ModelEMA(torch.nn.Linear(3, 2), updates=40)
    reference = [t.clone() for t in ema.module.parameters()]
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        weight = 1.0 - (ema.decay * (1.0 - math.exp(-(40 + k + 1) / ema.tau)))
        torch._foreach_lerp_(reference, [p.detach() for p in model.parameters()], weight)
        ema.update(model)
    assert ema.updates == 43
    assert all(_same(a, b) for a, b in zip(ema.module.parameters(), reference))


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
    good_losses: list[float] = []
    optimize = TrainStep.optimize

    def recorded(self, *args, **kwargs):
        values, ok = optimize(self, *args, **kwargs)
        if bool(ok):
            good_losses.append(float(values[0]))
        return values, ok

    monkeypatch.setattr(TrainStep, "optimize", recorded)
    logs: list[str] = []
    summary = _trainer(prepared, tmp_path, logs, max_bad_steps=3).fit()
    assert summary["bad_steps"] == 2 and summary["bad_frames"] == 0
    assert any("step 2: 1 step(s) with a non-finite loss" in m and "1 in this epoch" in m for m in logs)
    assert any("step 3: 1 step(s) with a non-finite loss" in m and "2 in this epoch" in m for m in logs)
    assert len(good_losses) == 2 and summary["train_loss"] == pytest.approx(sum(good_losses) / 2, rel=1e-6)
    last = load_checkpoint(tmp_path / "dual" / "last.pth")
    assert last["epoch"] == 1
    for key in ("model", "ema", "optimizer"):
        assert _all_finite(last[key]), key
    assert any(k.endswith("running_var") for k in last["ema"])
    assert last["ema_updates"] == 2  # the two good steps only


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
    """FusionYOLO.forward inside a training step raises torch.OutOfMemoryError for batches above limit
    (after some calls); forward passes outside a step (FLOP count, memory probes) run as usual."""
    original, optimize = FusionYOLO.forward, TrainStep.optimize
    sizes: list[int] = []
    in_step = [False]

    def step(self, *args, **kwargs):
        in_step[0] = True
        try:
            return optimize(self, *args, **kwargs)
        finally:
            in_step[0] = False

    def forward(self, rgb, event=None):
        if not in_step[0]:
            return original(self, rgb, event)
        sizes.append(rgb.shape[0])
        if len(sizes) > after_calls and rgb.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, rgb, event)

    monkeypatch.setattr(TrainStep, "optimize", step)
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
    """Sequence of each train image the first epoch visits (the loader's order) in a default run."""
    ds = PreparedDataset(data, "train", pairs=train_pairs(load_config(overrides=FAST)))
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
    # a dual run trains the unpaired frames too (pairs auto): 62 images, 22 of them in sequence 1
    with pytest.raises(
        TrainingStopped, match=r"22 of 62 train images \(35\.48%\) are in damaged frame store"
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
