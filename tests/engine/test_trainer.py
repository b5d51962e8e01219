"""Training workflow end to end on a tiny prepared sample (CPU, YOLO-n, 64x128 input)."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch

from fredfusion.cli import main
from fredfusion.config import load_config
from fredfusion.engine.trainer import Trainer
from fredfusion.model.anchors import default_anchors
from fredfusion.model.weights import load_checkpoint, load_model
from shared import TINY_TRAIN

TINY = TINY_TRAIN


def _cfg(data: Path, run: Path, **extra) -> object:
    return load_config(overrides={**TINY, "data": str(data), "save_dir": str(run), **extra})


def _weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[key]


def test_resume_continues_exactly(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _cfg(tiny_prepared, tmp_path / "a", unfreeze_epoch=2)
    Trainer(straight).fit()

    interrupted = _cfg(tiny_prepared, tmp_path / "b", unfreeze_epoch=2)
    original = Trainer._end_epoch
    calls = []

    def stop_after_first(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        calls.append(epoch)
        raise KeyboardInterrupt  # the process dies right after epoch 1's checkpoint

    monkeypatch.setattr(Trainer, "_end_epoch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted).fit()
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    assert calls == [0] and load_checkpoint(tmp_path / "b" / "dual" / "last.pth")["epoch"] == 1

    Trainer(_cfg(tiny_prepared, tmp_path / "b", unfreeze_epoch=2, resume=True)).fit()
    a, b = (load_checkpoint(p / "dual" / "last.pth") for p in (tmp_path / "a", tmp_path / "b"))
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    rows = (tmp_path / "b" / "dual" / "results.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


def test_resume_without_checkpoint_is_a_clear_error(tiny_prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="nothing to resume"):
        Trainer(_cfg(tiny_prepared, tmp_path, resume=True)).fit()


def test_quick_test_prints_check_list(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "train",
        "--data",
        str(tiny_prepared),
        "--save_dir",
        str(tmp_path),
        "--quick_test",
        "--phi",
        "n",
        "--input_shape",
        "64",
        "128",
        "--Unfreeze_batch_size",
        "4",
        "--Freeze_batch_size",
        "4",
        "--num_workers",
        "0",
        "--quick_test_batches",
        "3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for item in ("data found", "dual rate", "weights", "throughput", "data-wait share", "GPU memory"):
        assert f"[x] {item}" in out, item
    printed = re.search(r"\[x\] mini evaluation +mAP50 (\d\.\d{4})", out)
    run = tmp_path / "dual"
    with open(run / "results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert printed is not None and printed.group(1) == f"{float(row['mAP50']):.4f}"
    for name in ("best.pth", "last.pth", "config.yaml", "results.csv", "curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    assert load_checkpoint(run / "last.pth")["epoch"] == 1


def test_rgb_weights_initialise_dual_and_freeze_phase_keeps_backbones(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    Trainer(
        _cfg(
            tiny_prepared,
            tmp_path,
            modality="rgb",
            unfreeze_epoch=1,
            no_eval_map=True,
            best_alias=str(tmp_path / "fred_rgb" / "fred_rgb_best.pth"),
        )
    ).fit()
    rgb_weights = tmp_path / "fred_rgb" / "fred_rgb_best.pth"
    assert rgb_weights.is_file()
    rgb = _weights(rgb_weights)

    Trainer(
        _cfg(
            tiny_prepared,
            tmp_path,
            weights=str(rgb_weights),
            freeze_training=True,
            freeze_epoch=1,
            unfreeze_epoch=3,
            ema=False,
        )
    ).fit()
    out = capsys.readouterr().out
    assert "weights: loaded" in out and "phase: freeze" in out
    dual = load_checkpoint(tmp_path / "dual" / "last.pth")
    assert dual["epoch"] == 1  # --freeze_training: the freeze phase only
    backbone = [k for k in rgb if k.startswith("backbone.")]
    assert backbone
    for key in backbone:
        suffix = key[len("backbone.") :]
        for branch in ("backbone_rgb.", "backbone_event."):
            torch.testing.assert_close(dual["model"][branch + suffix], rgb[key], msg=branch + suffix)
    head = [k for k in rgb if k.startswith("head.") and k.endswith("weight")]
    assert any(not torch.equal(dual["model"][k], rgb[k]) for k in head)  # the head did train


def test_missing_or_unreadable_weights_file_is_an_error_before_training(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "broken.pth").write_text("not a checkpoint")
    for name in ("nope.pth", "broken.pth"):
        args = ["train", "--data", str(tiny_prepared), "--save_dir", str(tmp_path / "runs"), "--phi", "n"]
        args += ["--input_shape", "64", "128", "--num_workers", "0", "--weights", str(tmp_path / name)]
        assert main(args) == 2
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and name in err and "Traceback" not in err, err
        assert "epoch 1" not in out + err and not list((tmp_path / "runs").rglob("*.pth"))


def test_compile_flag_trains_through_torch_compile_and_saves_plain_keys(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fredfusion.model.detector import build_model

    real_compile = torch.compile
    compiled: list[torch.nn.Module] = []

    def eager_compile(model: torch.nn.Module, **kwargs):  # dynamo tracing without inductor's codegen
        compiled.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    # the compile cache in the test's folder; the variable use_compile_cache sets is put back afterwards
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    cache = tmp_path / "compile"
    cfg = _cfg(tiny_prepared, tmp_path, unfreeze_epoch=1, compile=True, compile_cache=str(cache))
    lines: list[str] = []
    summary = Trainer(cfg, log=lines.append).fit()
    # the model, the loss and, once for the run, the evaluation forward (of the EMA model)
    assert len(compiled) == 3 and summary["best"] is not None
    assert cache.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    step_line, eval_line = [x for x in lines if x.startswith("compile: ")]  # first step, first evaluation
    assert step_line.startswith("compile: the first unfreeze step at batch 8 took ")
    assert str(cache) in step_line
    assert eval_line.startswith("compile: the first evaluation took ") and str(cache) in eval_line
    eager = Trainer(_cfg(tiny_prepared, tmp_path / "eager", unfreeze_epoch=1)).fit()
    assert summary["mAP50"] == eager["mAP50"] and summary["val_loss"] == eager["val_loss"]  # same metrics
    for name in ("last.pth", "best.pth"):
        ckpt = load_checkpoint(tmp_path / "dual" / name)
        assert not any("_orig_mod" in k for k in ckpt["model"]), name
        build_model("dual", "n", num_classes=1).load_state_dict(ckpt["model"])  # strict: every key matches


@pytest.mark.parametrize("max_steps", [10_000, 1])
def test_optimizer_auto_picks_adamw_for_a_short_run_and_sgd_for_a_long_one(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_steps: int
) -> None:
    monkeypatch.setattr("fredfusion.engine.optim.AUTO_MAX_STEPS", max_steps)
    lines: list[str] = []
    trainer = Trainer(
        _cfg(tiny_prepared, tmp_path, unfreeze_epoch=1, optimizer="auto", no_eval_map=True), log=lines.append
    )
    trainer.fit()
    short = max_steps > 1
    assert isinstance(trainer.step.optimizer, torch.optim.AdamW if short else torch.optim.SGD)
    assert any(f"optimizer auto: {'AdamW' if short else 'SGD'} for " in line for line in lines)
    base = next(line for line in lines if line.startswith("phase:"))
    assert base.endswith("base lr 2.00e-03" if short else f"base lr {trainer.step.base_lr(8):.2e}")
    assert load_checkpoint(tmp_path / "dual" / "last.pth")["config"]["optimizer"] == "auto"


@pytest.mark.parametrize("default_scale", [1.0, 16.0])
def test_autoanchor_replaces_defaults_only_when_kmeans_recalls_more(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_scale: float
) -> None:
    # x16: defaults far too large for the tiny sample's 2-10 px drones, so k-means must win
    defaults = default_anchors() * default_scale
    monkeypatch.setattr("fredfusion.model.anchors.default_anchors", lambda: defaults.clone())
    lines: list[str] = []
    cfg = _cfg(tiny_prepared, tmp_path, unfreeze_epoch=1, autoanchor=True, no_eval_map=True)
    Trainer(cfg, log=lines.append).fit()
    line = next(line for line in lines if line.startswith("autoanchor:"))
    found = re.fullmatch(r"autoanchor: k-means recall ([\d.]+) vs default ([\d.]+) on (\d+) boxes", line)
    assert found, line
    kmeans_recall, default_recall = float(found[1]), float(found[2])
    model, _payload = load_model(tmp_path / "dual" / "last.pth")  # the anchors travel in the checkpoint
    scaled = defaults * (128 / 640)
    if default_scale == 1.0:  # every tiny-sample box already matches a default anchor: kept
        assert kmeans_recall == default_recall == 1.0
        torch.testing.assert_close(model.anchors, scaled)
    else:
        assert default_recall < 0.5 and kmeans_recall > 0.95
        assert not torch.allclose(model.anchors, scaled)
        area = model.anchors.prod(-1).flatten()
        assert torch.all(area[1:] >= area[:-1])  # smallest anchors on the finest level (P3)


def test_no_freeze_phase_for_backbones_from_random_weights_unless_forced(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    phases = {"freeze_train": True, "freeze_epoch": 1, "unfreeze_epoch": 1, "no_eval_map": True, "ema": False}
    trainer = Trainer(_cfg(tiny_prepared, tmp_path / "a", **phases))
    trainer.fit()
    out = capsys.readouterr().out
    assert "freeze phase skipped: the backbones do not start from loaded weights" in out
    assert "phase: unfreeze from epoch 1" in out and "phase: freeze" not in out
    assert trainer._phase(0)[0] is False

    forced = Trainer(_cfg(tiny_prepared, tmp_path / "b", freeze_untrained=True, **phases))
    forced.fit()
    out = capsys.readouterr().out
    assert "freeze phase skipped" not in out and "phase: freeze (backbones frozen) from epoch 1" in out
    assert forced._phase(0)[0] is True
