"""DDP launched by torchrun: 2 CPU processes with the gloo backend.

2 processes at batch B against 1 process at batch 2B over the same images, and a 2-process run stopped
after epoch 1 and continued with --resume against the uninterrupted 2-process run. The runs go through
ddp_child.py, which makes BatchNorm and the loss independent of the per-process batch (see there) and
records the image ids of every step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from fredfusion.model.weights import load_checkpoint
from shared import same_bits

CHILD = Path(__file__).with_name("ddp_child.py")
BATCH = 4  # per process
EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(
    data: Path, save_dir: Path, ids: Path, batch: int, procs: int, *extra: str, stop_after: int = 0
) -> subprocess.CompletedProcess:
    """ddp_child.py train ... alone (procs 1) or under torchrun with ``procs`` processes."""
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    args = ["train", "--data", str(data), "--save_dir", str(save_dir), "--model", "n", "--device", "cpu"]
    args += ["--input_shape", "64", "128", "--epochs", str(EPOCHS), "--freeze_train", "false"]
    args += ["--batch_size", str(batch), "--num_workers", "0", "--optimizer", "sgd", "--seed", "0"]
    args += ["--warmup_epochs", "0.5", "--precise_bn", "0", "--no_eval_map", "--log_interval", "1"]
    args += ["--save_period", "1"]
    for flag in ("mosaic", "mixup"):  # no augmentation: the images of a step do not depend on the process
        args += [f"--{flag}", "false"]
    for flag in ("translate", "scale", "fliplr", "hsv_h", "hsv_s", "hsv_v"):
        args += [f"--{flag}", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FREDFUSION_TEST_IDS": str(ids)}
    env["FREDFUSION_TEST_STOP_AFTER"] = str(stop_after)
    proc = subprocess.run(
        [*launch, str(CHILD), *args, *extra], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _steps(ids: Path, rank: int) -> list[tuple[int, list[int]]]:
    lines = (ids / f"rank{rank}.jsonl").read_text().splitlines()
    return [(r["epoch"], r["ids"]) for r in map(json.loads, lines)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    last = load_checkpoint(run / "last.pth")
    assert last["epoch"] == EPOCHS
    return {
        **{f"model.{k}": v for k, v in last["model"].items()},
        **{f"ema.{k}": v for k, v in last["ema"].items()},
    }


def _state(run: Path) -> dict[str, object]:
    """Model, EMA, its update count and the optimizer state of ``run``'s last.pth, by path."""
    last = load_checkpoint(run / "last.pth")
    assert last["epoch"] == EPOCHS
    flat: dict[str, object] = {"ema_updates": last["ema_updates"]}
    for key in ("model", "ema"):
        flat.update({f"{key}.{k}": v for k, v in last[key].items()})
    for pid, values in last["optimizer"]["state"].items():
        flat.update({f"optimizer.{pid}.{k}": v for k, v in values.items()})
    for i, group in enumerate(last["optimizer"]["param_groups"]):
        flat.update({f"group.{i}.{k}": v for k, v in group.items()})
    return flat


def test_two_processes_equal_one_at_twice_the_batch_and_resume_exactly(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    # 1 process at batch 2B: the reference
    _train(tiny_prepared, tmp_path / "one", tmp_path / "ids_one", 2 * BATCH, 1)
    one = _weights(tmp_path / "one" / "dual")

    # 2 processes at batch B, uninterrupted
    proc = _train(tiny_prepared, tmp_path / "two", tmp_path / "ids_two", BATCH, 2)
    assert proc.stdout.count("phase: unfreeze") == 1  # only rank 0 logs
    run = tmp_path / "two" / "dual"
    two = _weights(run)
    assert not any(k.startswith("module.") for k in load_checkpoint(run / "last.pth")["model"])
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + EPOCHS  # header + one row per epoch, written once

    # the ranks read disjoint images; together, step by step, the images of the 1-process run
    rank0, rank1, single = (
        _steps(tmp_path / "ids_two", 0),
        _steps(tmp_path / "ids_two", 1),
        _steps(tmp_path / "ids_one", 0),
    )
    assert len(rank0) == len(rank1) == len(single) >= 2 * EPOCHS
    for (e0, a), (e1, b), (e, both) in zip(rank0, rank1, single):
        assert e0 == e1 == e and len(a) == len(b) == BATCH
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(both)
    for epoch in range(EPOCHS):
        seen = [i for e, ids in rank0 + rank1 if e == epoch for i in ids]
        assert len(seen) == len(set(seen))  # no image twice in an epoch

    # same weights within float tolerance (the sums run in another order), far below what training moved
    epoch1 = load_checkpoint(tmp_path / "one" / "dual" / "ep001.pth")["model"]
    moved = max(
        (one[f"model.{k}"] - v).abs().max().item() for k, v in epoch1.items() if v.is_floating_point()
    )
    apart = max((two[k] - v).abs().max().item() for k, v in one.items() if v.is_floating_point())
    # measured: the last epoch moved the weights by up to 3.4e-3, the two runs ended 2.3e-10 apart
    assert moved > 1e-3 and apart < 1e-5 * moved, (moved, apart)

    # stopped after epoch 1, continued with --resume under torchrun: the uninterrupted run, bit for bit
    _train(tiny_prepared, tmp_path / "resumed", tmp_path / "ids_stop", BATCH, 2, stop_after=1)
    first = load_checkpoint(tmp_path / "resumed" / "dual" / "last.pth")
    assert first["epoch"] == 1
    proc = _train(tiny_prepared, tmp_path / "resumed", tmp_path / "ids_resume", BATCH, 2, "--resume")
    assert "continuing at epoch 2" in proc.stdout
    resumed, straight = (_state(tmp_path / name / "dual") for name in ("resumed", "two"))
    assert resumed.keys() == straight.keys()
    differ = [k for k, v in straight.items() if not same_bits(resumed[k], v)]
    assert not differ, f"{len(differ)} of {len(straight)} values differ after --resume, e.g. {differ[:5]}"
    for rank in (0, 1):  # the resumed processes read the second epoch's images of the uninterrupted run
        assert _steps(tmp_path / "ids_resume", rank) == [
            s for s in _steps(tmp_path / "ids_two", rank) if s[0] == 1
        ]
