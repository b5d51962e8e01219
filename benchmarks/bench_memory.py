"""The memory estimate of `fredfusion.engine.memory` against measured peaks (CPU, float32).

    python benchmarks/bench_memory.py [--configs n:dual:192x320:16 s:dual:384x640:8 ...]

Each configuration runs in a fresh process: the model and its TrainStep (optimizer, EMA) are built,
the resident set size is read, the kernel's peak counter is reset (``/proc/self/clear_refs``), two
training steps (augmentation on store-sized uint8 frames, forward, backward, optimizer, EMA) run, and
the peak (``VmHWM``) minus the size before is what a step added. The same for two evaluation batches
(letterbox, inference, NMS). Printed: measured, the estimate before its margin, and their ratio, which
``MARGIN`` (training) and ``EVAL_SHARE`` (evaluation) must cover.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT = [
    "n:dual:192x320:16",
    "n:rgb:384x640:8",
    "s:dual:192x320:16",
    "s:dual:384x640:4",
    "s:dual:384x640:8",
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(spec: str, mode: str) -> dict:
    """Measure one ``size:modality:HxW:batch`` configuration in this process: ``train`` or ``eval``."""
    import gc

    import numpy as np
    import torch

    from fredfusion.config import load_config
    from fredfusion.data.loader import DeviceBatch
    from fredfusion.engine import memory
    from fredfusion.engine.optim import resolve_optimizer
    from fredfusion.engine.step import TrainStep
    from fredfusion.eval.evaluator import predict_frames
    from fredfusion.model import build_model
    from fredfusion.spec import frames_for

    torch.set_num_threads(2)
    size, modality, hw, batch = spec.split(":")
    h, w = (int(v) for v in hw.split("x"))
    batch = int(batch)
    store = (h * 360 // 384, w)
    cfg = load_config(overrides={"model": size, "modality": modality, "input_shape": [h, w]})
    model = build_model(modality, size).to(memory_format=torch.channels_last)
    step = TrainStep(cfg, model, batch, device=torch.device("cpu"), amp_dtype=None,
                     optimizer_choice=resolve_optimizer("sgd", 0))  # fmt: skip
    saved = memory.saved_bytes_per_image(model, (h, w))
    params = sum(p.numel() * 4 for p in model.parameters())
    kinds = frames_for(modality)
    aug = memory.AUGMENT_FLOATS * 3 * h * w * 4 * len(kinds)
    gen = torch.Generator().manual_seed(0)

    def frames() -> torch.Tensor:
        x = torch.randint(0, 255, (batch, store[0], store[1], 3), dtype=torch.uint8, generator=gen)
        return x.permute(0, 3, 1, 2)

    targets = torch.tensor([[i, 0, 50.0, 40.0, 70.0, 55.0] for i in range(batch)])
    item = DeviceBatch(torch.arange(batch), frames() if "rgb" in kinds else None,
                       frames() if "event" in kinds else None, targets, 0.0)  # fmt: skip
    train_raw = params * 2 + batch * (saved + aug)  # gradients + SGD momentum, activations, canvases
    if mode == "train":
        gc.collect()
        before = _status("VmRSS")
        _reset_peak()
        for _ in range(2):
            step.run(model, item, special=True, generator=gen)
        added = _status("VmHWM") - before
        return {"spec": spec, "saved": saved, "added": added, "estimate": train_raw}
    hwc = np.random.default_rng(0).integers(0, 255, (batch, store[0], store[1], 3), dtype=np.uint8)
    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    for _ in range(2):
        predict_frames(
            model, hwc if "rgb" in kinds else None, hwc if "event" in kinds else None, (h, w), conf=0.001
        )
    added = _status("VmHWM") - before
    return {"spec": spec, "saved": saved, "added": added, "estimate": batch * saved}


def main() -> int:
    """Run each configuration in its own process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT, help="size:modality:HxW:batch")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child.split("@"))))
        return 0
    head = ("config", "saved/img", "train", "estimate", "ratio", "eval", "eval share")
    print(f"{head[0]:<20} {head[1]:>10} {head[2]:>9} {head[3]:>9} {head[4]:>6} {head[5]:>8} {head[6]:>10}")
    for spec in args.configs:
        r = {}
        for mode in ("train", "eval"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", f"{spec}@{mode}"], capture_output=True, text=True
            )
            if out.returncode:
                print(f"{spec:<20} {mode} failed: {out.stderr.strip().splitlines()[-1:]}")
                break
            r[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            t, e, mib = r["train"], r["eval"], 2**20
            ratio, share = t["added"] / t["estimate"], e["added"] / e["estimate"]
            print(
                f"{spec:<20} {t['saved'] / mib:8.1f}MB {t['added'] / mib:7.0f}MB "
                f"{t['estimate'] / mib:7.0f}MB {ratio:6.2f} {e['added'] / mib:6.0f}MB {share:10.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
