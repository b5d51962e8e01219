"""The memory a CPU job will need: the estimate, the one line before training or evaluation, and the
one-line stop when it does not fit (instead of the kernel killing the run)."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from fredfusion.cli import main
from fredfusion.config import load_config
from fredfusion.engine import memory
from fredfusion.engine.trainer import Trainer
from fredfusion.model import build_model
from fredfusion.model.weights import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model": "n", "input_shape": [64, 128], "freeze_train": False, "unfreeze_batch_size": 8,
    "num_workers": 0, "persistent_workers": False, "eval_period": 1, "precise_bn": 8, "save_period": 0,
    "unfreeze_epoch": 1, "device": "cpu",
}  # fmt: skip


@pytest.fixture
def two_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every epoch has 2 batches."""
    original = Trainer._loader
    monkeypatch.setattr(Trainer, "_loader", lambda self, ds, batch, _max: original(self, ds, batch, 2))


def _direct(model: torch.nn.Module, hw: tuple[int, int]) -> int:
    """Bytes autograd keeps for one image at ``hw``, measured at that size."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.zeros((1, 3, *hw))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x, x)
    return sum(seen.values())


def test_saved_activations_scale_with_the_area_and_leave_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = build_model("dual", "n")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    estimate = memory.saved_bytes_per_image(model.eval(), (192, 320))
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn: training stays the same
    for key, value in model.state_dict().items():  # BatchNorm statistics put back
        assert torch.equal(value, state[key]), key
    direct = _direct(model, (192, 320))
    assert direct <= estimate <= 1.05 * direct  # per-channel tensors make the small probe a bit larger


def test_peak_memory_sees_what_a_block_allocates() -> None:
    # Fresh anonymous pages: a tensor could reuse pages the allocator already holds (no new RSS).
    with memory.PeakMemory(torch.device("cpu")) as peak:
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * len(block))
        block.close()
    assert peak.added is not None and peak.added >= 60 * 2**20


def test_training_says_what_it_needs_and_trains_as_without_the_check(
    tiny_prepared: Path, tmp_path: Path, two_batches: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    cfg = load_config(overrides={**TINY, "data": str(tiny_prepared), "save_dir": str(tmp_path / "a")})
    Trainer(cfg, log=lines.append).fit()
    (line,) = [x for x in lines if x.startswith("memory: ")]
    assert line.startswith("memory: training at batch 8 needs about ") and line.endswith(" GiB free")

    monkeypatch.setattr(Trainer, "_check_memory", lambda self, end: None)
    cfg = load_config(overrides={**TINY, "data": str(tiny_prepared), "save_dir": str(tmp_path / "b")})
    Trainer(cfg, log=lambda _m: None).fit()
    a, b = (load_checkpoint(tmp_path / r / "dual" / "last.pth") for r in "ab")
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name


def test_training_that_does_not_fit_stops_before_it_starts(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(memory, "free_bytes", lambda device=None: 50 * 2**20)
    argv = ["train", "--data", str(tiny_prepared), "--save_dir", str(tmp_path), "--model", "n"]
    argv += ["--imgsz", "320", "--batch", "64", "--freeze_train", "false", "--num_workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("fredfusion train: error: not enough memory for training: training at batch 64")
    assert "0.0 GiB free; lower --batch 64 (about 0 fits at 192x320) or --imgsz" in err[0]
    assert not list(tmp_path.rglob("*.pth"))


def test_evaluation_that_does_not_fit_is_refused(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fredfusion.engine.checkpoint import save_checkpoint
    from fredfusion.model.weights import model_meta

    model = build_model("dual", "n")
    weights = tmp_path / "w.pth"
    save_checkpoint({"meta": model_meta(model), "model": model.state_dict(), "config": {}}, weights)
    argv = ["eval", "--weights", str(weights), "--data", str(tiny_prepared), "--split", "val"]
    argv += ["--imgsz", "128", "--batch", "16", "--out", str(tmp_path / "report")]
    assert main(argv) == 0
    assert "  memory: evaluation at batch 16 needs about " in capsys.readouterr().out

    monkeypatch.setattr(memory, "free_bytes", lambda device=None: 2**20)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fredfusion eval: error: not enough memory: evaluation at batch 16 needs about ")
    assert "; lower --batch 16 (about 0 fits at 64x128) or free memory" in err
