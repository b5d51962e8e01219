"""The CUDA path: loader batches on the device, mixed-precision training, a step without host syncs,
kill -9 + --resume exact. Skipped without a GPU; ``benchmarks/gpu_run.sh`` runs it on one.

``FREDFUSION_TEST_DEVICE=cpu`` runs the parts that make sense on a CPU (to check the tests themselves).
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from fredfusion.cli import main
from fredfusion.config import load_config
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.loader import BatchLoader
from fredfusion.engine.trainer import Trainer
from fredfusion.model.weights import load_checkpoint
from shared import TINY_TRAIN

DEVICE = os.environ.get("FREDFUSION_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)
CUDA = DEVICE.startswith("cuda")

TINY = {**TINY_TRAIN, "log_interval": 1, "precise_bn": 8, "device": DEVICE, "seed": 0}


def _deterministic() -> None:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize("decode", ["workers", "auto"])
def test_loader_batches_on_the_device_equal_the_cpu_loader(small_sample: Any, decode: str) -> None:
    """Frames decoded by the workers arrive bit-identical; JPEG frames decoded on the GPU (nvJPEG) differ
    from libjpeg-turbo's by rounding only. Ids, targets and bad-image masks are the same."""
    ds = PreparedDataset(small_sample.prepared, "train", modality="dual", skip_bad=True)
    cpu = list(BatchLoader(ds, 4, drop_last=False, seed=3, device="cpu", decode="workers"))
    dev = list(BatchLoader(ds, 4, drop_last=False, seed=3, device=DEVICE, decode=decode))
    assert len(cpu) == len(dev)
    for a, b in zip(cpu, dev):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.bad, b.bad)
        assert torch.equal(a.targets, b.targets.cpu())
        assert torch.equal(a.event, b.event.cpu())
        diff = (a.rgb.int() - b.rgb.cpu().int()).abs()
        if decode == "workers":
            assert diff.max() == 0
        else:
            assert diff.float().mean() < 0.5 and diff.max() <= 16, (diff.float().mean(), diff.max())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fit_in_mixed_precision(
    small_sample: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """A short run trains in bf16 (no GradScaler) and in fp16 (GradScaler on) and ends with finite losses."""
    if not CUDA:
        pytest.skip("mixed precision runs on CUDA only")
    if precision == "fp16":
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = load_config(overrides={**TINY, "data": str(small_sample.prepared), "save_dir": str(tmp_path)})
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert trainer.amp_dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    assert trainer.step.scaler.is_enabled() == (precision == "fp16")
    assert torch.isfinite(torch.tensor(summary["train_loss"])) and summary["bad_steps"] == 0


def test_the_training_step_makes_no_host_sync(small_sample: Any) -> None:
    """Augmentation, forward, loss, backward, clipping, optimizer, EMA and the NaN guard of one step run
    under torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises; the last run blanks
    unpaired images' missing modality and drops modalities (pairs: any, modality_dropout)."""
    if not CUDA:
        pytest.skip("the sync debug mode is a CUDA feature")
    from fredfusion.engine.runtime import amp_dtype_for
    from fredfusion.engine.step import TrainStep
    from fredfusion.model import build_model

    device = torch.device(DEVICE)
    cfg = load_config(overrides={**TINY, "data": str(small_sample.prepared)})
    ds = PreparedDataset(small_sample.prepared, "train", modality="dual", pairs="any")
    batch = next(iter(BatchLoader(ds, 8, seed=0, device=device)))
    blanking = dataclasses.replace(cfg, pairs="any", modality_dropout=0.5)
    for arch, run_cfg in (("yolov5", cfg), ("yolov8", cfg), ("yolov5", blanking)):
        model = build_model("dual", "n", arch=arch).to(device).to(memory_format=torch.channels_last)
        amp, choice = amp_dtype_for(device), ("adamw", 2e-3)
        step = TrainStep(run_cfg, model, 8, device=device, amp_dtype=amp, optimizer_choice=choice)
        assert step.blanking is (run_cfg is blanking)
        generator = torch.Generator(device=device).manual_seed(0)
        step.run(model, batch, True, generator)  # first step: lazy state is created here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                values, ok = step.run(model, batch, True, generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(ok) and torch.isfinite(values).all(), arch


def _eval_pass(ds: PreparedDataset, dense: bool, in_flight: int) -> Any:
    """An evaluation pass of a fresh dual YOLO-n on ``ds`` as ``fredfusion eval`` runs it on the device
    (bf16, channels-last, the training loss for val_loss), and its loader's batches."""
    from fredfusion.engine.runtime import amp_dtype_for
    from fredfusion.eval.evaluator import _Pass
    from fredfusion.model import build_model
    from fredfusion.model.build import build_loss

    device = torch.device(DEVICE)
    torch.manual_seed(0)
    model = build_model("dual", "n").to(device).to(memory_format=torch.channels_last).eval()
    loss_fn = build_loss(model)
    orig_h, orig_w = ds.orig_hw
    run = _Pass(
        model,
        device,
        (96, 160),
        (0.001, 0.45, 300),
        amp_dtype_for(device),
        loss_fn,
        float(ds.scale),
        (int(orig_w), int(orig_h)),
        dense=dense,
        in_flight=in_flight,
        channels_last=CUDA,
    )
    return run, list(BatchLoader(ds, 4, shuffle=False, drop_last=False, device=device))


@torch.no_grad()
def test_evaluation_on_the_device_makes_no_host_sync(small_sample: Any) -> None:
    """The device stage of evaluation batches (letterbox, channels-last bf16 model, decode, dense NMS,
    packing, the copies into pinned memory, the loss) runs under torch.cuda.set_sync_debug_mode("error");
    the host stage then waits on each batch's event only."""
    if not CUDA:
        pytest.skip("the sync debug mode is a CUDA feature")
    ds = PreparedDataset(small_sample.prepared, "val", modality="dual", pairs="dual")
    run, batches = _eval_pass(ds, dense=True, in_flight=2)
    run.land(run.launch(batches[0], len(batches[0].ids)))  # first batch: lazy state, cuDNN plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flights = [run.launch(b, len(b.ids)) for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for flight in flights:
        run.land(flight)
    assert run.n_done == len(ds) + len(batches[0].ids) and len(run.detections) > 0
    assert run.infer_s > 0 and torch.isfinite(run.loss_sum)


@torch.no_grad()
def test_evaluation_on_the_device_pipelined_equals_straightforward(small_sample: Any) -> None:
    """On the device (bf16, channels-last, dense NMS: the eval command's settings) batches in flight
    give the detections, metrics and val_loss of landing each batch before the next starts."""
    from fredfusion.eval.evaluator import evaluate

    _deterministic()
    ds = PreparedDataset(small_sample.prepared, "val", modality="dual", pairs="dual")
    runs = []
    for in_flight in (0, 2):
        run, _ = _eval_pass(ds, dense=CUDA, in_flight=in_flight)
        res = evaluate(
            run.model,
            ds,
            batch_size=4,
            device=DEVICE,
            input_hw=(96, 160),
            amp_dtype=run.amp_dtype,
            loss_fn=run.loss_fn,
            in_flight=in_flight,
        )
        runs.append(res)
    times = ("pairs_per_s", "infer_s", "wait_s", "wall_s", "metrics_s")
    a, b = ({k: v for k, v in r.metrics.items() if k not in times} for r in runs)
    assert runs[0].detections == runs[1].detections and a == b
    assert len(runs[0].detections) > 0 and a["images"] == len(ds)


def test_dense_nms_on_the_device_equals_torchvision() -> None:
    """Dense NMS on the device keeps torchvision's rows in its order (tie-free scores, clustered boxes:
    4 images x 1000 candidates, class-aware and multi-label)."""
    from fredfusion.model.postprocess import dense_nms, non_max_suppression, settle

    g = torch.Generator().manual_seed(0)
    b, n, nc = 4, 1500, 3
    centres = torch.rand(b, 3, 2, generator=g) * torch.tensor([640.0, 384.0])
    near = centres.gather(1, torch.randint(0, 3, (b, n, 1), generator=g).expand(-1, -1, 2))
    xy = near + torch.randn(b, n, 2, generator=g) * 8
    wh = torch.rand(b, n, 2, generator=g) * 60 + 4
    ranks = torch.stack([torch.randperm(n * nc, generator=g) for _ in range(b)]).view(b, n, nc)
    decoded = torch.cat([xy, wh, torch.ones(b, n, 1), (ranks.float() + 1) / (n * nc + 1)], -1).to(DEVICE)
    for multi_label in (False, True):
        ref = non_max_suppression(decoded, 0.001, 0.45, 300, multi_label=multi_label)
        dense = settle(dense_nms(decoded, 0.001, 0.45, 300, multi_label=multi_label), 0.45, 300)
        rows = dense.rows()
        for i in range(b):
            assert torch.equal(rows[i][dense.keep[i]], ref[i]), (multi_label, i)


def _train_args(data: Path, save_dir: Path, resume: bool = False) -> list[str]:
    args = ["train", "--data", str(data), "--save_dir", str(save_dir), "--exist_ok", "true"]
    for key, value in TINY.items():
        args += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    args += ["--unfreeze_epoch", "3"]
    return [*args, "--resume"] if resume else args


@pytest.mark.reliability
def test_kill_and_resume_is_exact_on_the_device(
    small_sample: Any, tmp_path: Path, run_child: Any, one_thread: None
) -> None:
    """Killed mid-epoch 2 (SIGKILL) and resumed: the final model, EMA and optimizer state equal an
    uninterrupted run's bit for bit, CUDA RNG state included (cuDNN in deterministic mode)."""
    from reliability.test_kill_train import _assert_same_state, _steps_per_epoch

    _deterministic()
    data = small_sample.prepared
    assert main(_train_args(data, tmp_path / "straight")) == 0
    proc = run_child("train-step", _steps_per_epoch(data) + 2, _train_args(data, tmp_path / "killed"))
    assert proc.returncode == -signal.SIGKILL, proc.output[-3000:]
    assert main(_train_args(data, tmp_path / "killed", resume=True)) == 0
    got = load_checkpoint(tmp_path / "killed" / "dual" / "last.pth")
    want = load_checkpoint(tmp_path / "straight" / "dual" / "last.pth")
    _assert_same_state(got, want, "resumed on the device")
