"""DDP launched by torchrun: 2 CPU processes with the gloo backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from fredfusion.model.weights import load_checkpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes(tiny_prepared: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "fredfusion",
        "train",
        "--data",
        str(tiny_prepared),
        "--save_dir",
        str(tmp_path),
        "--model",
        "n",
        "--input_shape",
        "64",
        "128",
        "--epochs",
        "1",
        "--freeze_train",
        "false",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--precise_bn",
        "32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("phase: unfreeze") == 1  # only rank 0 logs
    run = tmp_path / "dual"
    payload = load_checkpoint(run / "last.pth")
    assert payload["epoch"] == 1
    assert not any(k.startswith("module.") for k in payload["model"])
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # header + one epoch, written once
