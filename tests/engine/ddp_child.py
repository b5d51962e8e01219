"""``python ddp_child.py <fredfusion arguments>``, alone or under torchrun: ``fredfusion`` with the two
parts of a training step that depend on the batch each process sees made independent of it, so that 2
processes at batch B compute what 1 process at batch 2B computes (up to the order of float sums):

- BatchNorm normalises with its running statistics (in train mode it uses each process's own batch:
  there is no SyncBatchNorm on the CPU);
- the loss keeps only objectness, a mean over every cell of the batch (box and class terms are means
  over each process's matched targets, whose counts differ between processes).

The image ids of every training step of this process go to ``$FREDFUSION_TEST_IDS/rank<RANK>.jsonl``
(one ``{"epoch", "ids"}`` line per step). With ``$FREDFUSION_TEST_STOP_AFTER=N`` the process ends right
after the checkpoints of epoch N (every rank, after the trainer's barrier), as a run stopped between
epochs does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any


def install() -> None:
    """Patch the trainer and the loss as described in the module docstring."""
    from torch import nn

    from fredfusion.engine.trainer import Trainer
    from fredfusion.model.loss import YoloLoss

    loss_init = YoloLoss.__init__

    def objectness_only(self: YoloLoss, *args: Any, **kwargs: Any) -> None:
        loss_init(self, *args, **kwargs)
        self.cfg = dataclasses.replace(self.cfg, box=0.0, cls=0.0)

    YoloLoss.__init__ = objectness_only

    train_mode = Trainer._train_mode

    def fixed_bn(self: Trainer, model: nn.Module, frozen: bool) -> None:
        train_mode(self, model, frozen)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    Trainer._train_mode = fixed_bn

    ids_dir = Path(os.environ["FREDFUSION_TEST_IDS"])
    ids_dir.mkdir(parents=True, exist_ok=True)
    record = ids_dir / f"rank{os.environ.get('RANK', '0')}.jsonl"
    epoch_of, step_of = Trainer._train_epoch, Trainer._guarded_step

    def train_epoch(self: Trainer, epoch: int, *args: Any) -> Any:
        self.test_epoch = epoch
        return epoch_of(self, epoch, *args)

    def step(self: Trainer, wrapped: Any, batch: Any, *args: Any) -> Any:
        with open(record, "a") as handle:
            handle.write(json.dumps({"epoch": self.test_epoch, "ids": batch.ids.tolist()}) + "\n")
        return step_of(self, wrapped, batch, *args)

    Trainer._train_epoch, Trainer._guarded_step = train_epoch, step

    stop_after = int(os.environ.get("FREDFUSION_TEST_STOP_AFTER", "0"))
    if stop_after:
        end_epoch = Trainer._end_epoch

        def end(self: Trainer, epoch: int, *args: Any) -> Any:
            summary = end_epoch(self, epoch, *args)
            if epoch + 1 == stop_after:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            return summary

        Trainer._end_epoch = end


if __name__ == "__main__":
    install()
    from fredfusion.cli import main

    raise SystemExit(main(sys.argv[1:]))
