"""`fredfusion bench` and benchmarks/ultralytics_side_by_side.py: CPU smoke tests, verdict, YOLO export."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from fredfusion.bench import DATA_WAIT_LIMIT, LABELS, PARTS, _fmt, compile_line, run_bench, verdict
from fredfusion.cli import main
from fredfusion.config import load_config
from fredfusion.data.dataset import PreparedDataset
from fredfusion.eval.evaluator import evaluate
from fredfusion.model import build_model, model_info
from fredfusion.model.anchors import default_anchors
from fredfusion.model.weights import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ultralytics_side_by_side.py"
SMALL = ["--model", "n", "--batch", "4", "--steps", "2", "--warmup", "1", "--input-shape", "64", "128"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sbs() -> ModuleType:
    """The side-by-side script, imported as a module (it does nothing at import)."""
    spec = importlib.util.spec_from_file_location("ultralytics_side_by_side", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- bench CLI
def test_bench_cli_smoke(tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--data", str(tiny_prepared), *SMALL, "--workers", "0", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]  # atomic write left no temp file
    report = json.loads((out / "bench.json").read_text())
    results = report["results"]
    assert list(results) == list(PARTS)
    for part in PARTS:
        rate = results[part]["pairs_per_s"]
        assert rate > 0, part
        rows = [line for line in printed if line.startswith(LABELS[part] + " ")]
        assert len(rows) == 1, (part, printed)
        assert float(rows[0][len(LABELS[part]) :].split()[0]) == pytest.approx(rate, rel=0.01, abs=0.01)

    # the verdict line names the slowest of read / augment / step and reports the data wait
    assert printed.count(report["verdict"]) == 1
    bounds = {p: results[p]["pairs_per_s"] for p in ("read", "augment", "step")}
    slowest = min(bounds, key=bounds.get)
    assert report["bottleneck"] == slowest
    kind = {"read": "data", "augment": "augmentation", "step": "model"}[slowest]
    assert report["verdict"].startswith(f"bottleneck: {kind} ({LABELS[slowest]} ")
    assert f"data wait {100 * results['train']['data_wait']:.1f}%" in report["verdict"]
    assert 0 <= results["train"]["data_wait"] < 1

    # effective TFLOP/s = GFLOPs per pair (model_info at the input size) x 3 x pairs/s
    net = build_model("dual", "n", anchors=default_anchors() * (128 / 640))
    gflops = model_info(net, (64, 128))["gflops"]
    step = results["step"]
    assert report["model"]["gflops_per_pair"] == pytest.approx(gflops)
    assert step["tflops"] == pytest.approx(gflops * 3 * step["pairs_per_s"] / 1000)
    assert step["ms_per_step"] == pytest.approx(1000 * 4 / step["pairs_per_s"])
    assert results["eval"]["split"] == "val"
    assert results["eval"]["images"] >= 2 * 4
    # the whole loop (loading, host rows) takes longer than the device stage alone
    assert 0 < results["eval"]["wall_pairs_per_s"] <= results["eval"]["pairs_per_s"]
    assert results["read"]["bytes_per_pair"] == pytest.approx(
        _stored_per_image(tiny_prepared, "rgb", "event")
    )
    assert results["read"]["codecs"] == {"rgb": "jpeg:90", "event": "zstd:3"}
    assert report["config"]["input_hw"] == [64, 128]
    assert report["config"]["store_hw"] == [72, 128]
    assert report["environment"]["device"] == "cpu"
    assert report["environment"]["torch_threads"] == 1


def _stored_per_image(prepared: Path, *kinds: str) -> float:
    """Bytes the frame store holds per image for ``kinds``: the data files' sizes over the image count."""
    store = prepared / "store"
    manifest = json.loads((store / "manifest.json").read_text())
    images = sum(s["n"] for s in manifest["shards"])
    files = [p for kind in kinds for p in store.glob(f"seq_*.{kind}.*") if p.suffix != ".json"]
    return sum(p.stat().st_size for p in files) / images


def test_bench_skip_parts_and_no_file(tiny_prepared: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = load_config(
        overrides={
            "data": str(tiny_prepared),
            "modality": "rgb",
            "model": "n",
            "unfreeze_batch_size": 4,
            "input_shape": [64, 128],
            "num_workers": 0,
        }
    )
    report = run_bench(
        cfg, steps=1, warmup=0, out=None, skip=["augment", "step", "train", "eval"], log=lines.append
    )
    assert list(report["results"]) == ["read"]
    assert report["results"]["read"]["bytes_per_pair"] == pytest.approx(
        _stored_per_image(tiny_prepared, "rgb")
    )
    assert report["bottleneck"] == "read"
    assert "path" not in report
    table = lines[-1].splitlines()
    assert table[-2] == "skipped: augment, step, train, eval"
    assert table[-1] == report["verdict"]


def _bench_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        rc = main(["bench", *argv])
    except SystemExit as exc:  # argparse refuses the value itself
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    return err


def test_bench_errors(tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    err = _bench_error(["--data", str(missing)], capsys)
    assert f"prepared folder {missing} does not exist" in err and "fredfusion prepare" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = _bench_error(["--data", str(empty)], capsys)
    assert str(empty / "annotations" / "instances_train.json") in err

    no_store = tmp_path / "no_store"
    shutil.copytree(tiny_prepared / "annotations", no_store / "annotations")
    err = _bench_error(["--data", str(no_store)], capsys)
    assert "no frame store" in err and str(no_store / "store" / "manifest.json") in err

    err = _bench_error(["--data", str(tiny_prepared), "--skip", "read", "decode"], capsys)
    assert "unknown part(s) in --skip: decode" in err
    err = _bench_error(["--data", str(tiny_prepared), "--input-shape", "60", "128"], capsys)
    assert "multiples of 32" in err
    err = _bench_error(["--data", str(tiny_prepared), "--skip", *PARTS], capsys)
    assert "every part is skipped" in err
    err = _bench_error(["--data", str(tiny_prepared), "--steps", "0"], capsys)
    assert "argument --steps: must be >= 1, got 0" in err
    err = _bench_error(["--data", str(tiny_prepared), "--batch", "0"], capsys)
    assert err.strip() == (
        "fredfusion bench: error: argument --batch/--batch-size: must be >= 1, got 0 "
        "(see fredfusion bench --help)"
    )
    err = _bench_error(["--data", str(tiny_prepared), "--workers", "-1"], capsys)
    assert (
        err.strip()
        == "fredfusion bench: error: argument --workers: must be >= 0, got -1 (see fredfusion bench --help)"
    )
    # the config checks its fields; the message names the flag
    err = _bench_error(
        ["--data", str(tiny_prepared), "--fusion", "early", "--modality", "rgb", "--seed", "-1"], capsys
    )
    assert err.strip() == "fredfusion bench: error: bench: --seed must be >= 0, got -1"


def _rates(read: float, augment: float, step: float, train: float, wait: float) -> dict[str, Any]:
    return {
        "read": {"pairs_per_s": read},
        "augment": {"pairs_per_s": augment},
        "step": {"pairs_per_s": step},
        "train": {"pairs_per_s": train, "data_wait": wait},
    }


def test_verdict_names_the_slowest_bound_and_flags_data_wait() -> None:
    text, part = verdict(_rates(900.0, 2000.0, 1400.0, 850.0, 0.12))
    assert part == "read"
    assert text == (
        "bottleneck: data (store read 900 pairs/s < model step 1400 pairs/s < augment 2000 pairs/s); "
        "end to end 850 pairs/s, data wait 12.0% > 5%: the loader does not keep up (more --workers?)"
    )
    text, part = verdict(_rates(5000.0, 3000.0, 12.3456, 12.04, 0.01))
    assert part == "step"
    assert text == (
        "bottleneck: model (model step 12.3 pairs/s < augment 3000 pairs/s < store read 5000 pairs/s); "
        "end to end 12.0 pairs/s, data wait 1.0%"
    )
    text, part = verdict(_rates(800.0, 95.5, 400.0, 90.0, DATA_WAIT_LIMIT))  # exactly 5%: not flagged
    assert part == "augment"
    assert text.startswith("bottleneck: augmentation (augment 95.5 pairs/s < model step 400 pairs/s")
    assert text.endswith("data wait 5.0%")
    assert verdict({"step": {"pairs_per_s": 7.5}}) == ("bottleneck: model (model step 7.50 pairs/s)", "step")
    assert verdict({"eval": {"pairs_per_s": 10.0}}) == (
        "bottleneck: not determined (read, augment and step were skipped)",
        None,
    )


# ------------------------------------------------------------------------------------ side by side
def test_yolo_label_lines(sbs: ModuleType) -> None:
    anns = [
        {"bbox": [10, 20, 30, 40]},  # inside
        {"bbox": [-10, 170, 30, 20]},  # clipped to x 0..20, y 170..180
        {"bbox": [5, 5, 0, 3]},  # empty: dropped
        {"bbox": [400, 10, 5, 5]},  # outside the 320x180 image: dropped
    ]
    assert sbs.yolo_label_lines(anns, 320, 180) == [
        "0 0.078125 0.222222 0.093750 0.222222",
        "0 0.031250 0.972222 0.062500 0.055556",
    ]


def test_export_yolo(sbs: ModuleType, tiny_prepared: Path, tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "yolo"
    counts = sbs.export_yolo(tiny_prepared, out)
    spec = yaml.safe_load((out / "data.yaml").read_text())
    assert spec == {
        "path": str(out.resolve()),
        "names": {0: "drone"},
        "train": "images/train",
        "val": "images/val",
    }
    for split in ("train", "val"):
        coco = json.loads((tiny_prepared / "annotations" / f"instances_{split}.json").read_text())
        dual = [im for im in coco["images"] if im["rgb_file_name"] and im["event_file_name"]]
        assert counts[split] == len(dual) > 0
        images = sorted((out / "images" / split).iterdir())
        labels = sorted((out / "labels" / split).iterdir())
        assert [p.stem for p in images] == [p.stem for p in labels] == sorted(str(im["id"]) for im in dual)
        boxes: dict[int, list[list[float]]] = {}
        for ann in coco["annotations"]:
            boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
        n_boxes = 0
        for im in dual:
            rows = [
                line.split() for line in (out / "labels" / split / f"{im['id']}.txt").read_text().splitlines()
            ]
            want = []
            for x, y, w, h in boxes.get(im["id"], []):
                assert x >= 0 and x + w <= im["width"] and y >= 0 and y + h <= im["height"]  # prepare clips
                want.append(
                    [
                        0,
                        (x + w / 2) / im["width"],
                        (y + h / 2) / im["height"],
                        w / im["width"],
                        h / im["height"],
                    ]
                )
            assert np.allclose(
                np.asarray(rows, dtype=float).reshape(-1, 5), np.asarray(want).reshape(-1, 5), atol=1e-6
            )
            n_boxes += len(rows)
        assert n_boxes > 0
    # the pictures are the store's RGB frames (JPEG, so nearly equal), channels in BGR file order
    ds = PreparedDataset(tiny_prepared, "val", modality="rgb", pairs="dual")
    image_id = int(ds.ids[3])
    picture = cv2.imread(str(out / "images" / "val" / f"{image_id}.jpg"))
    frame = ds.load([image_id], ("rgb",)).rgb[0]
    assert picture.shape == frame.shape == (72, 128, 3)
    assert np.abs(picture[..., ::-1].astype(int) - frame.astype(int)).mean() < 4


def test_side_by_side_ci_fredfusion(sbs: ModuleType, tiny_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "sbs"
    report = sbs.main(["--data", str(tiny_prepared), "--ci", "--skip-ultralytics", "--out", str(out)])
    assert json.loads((out / "side_by_side.json").read_text())["runs"] == report["runs"]
    run = report["runs"]["fredfusion dual n"]
    assert run["input_hw"] == [32, 64] and run["model"] == "dual YOLO-n (yolov8)"
    assert run["train_images_per_epoch"] == 48  # 48 true pairs in train, batch 4
    assert len(run["epoch_images_per_s"]) == 1 and run["images_per_s"] > 0
    # its mAP50 is the val mAP50 of the model it trained (best.pth of its one epoch), evaluated again
    model, _ = load_model(out / "fredfusion" / "dual" / "best.pth")
    val = PreparedDataset(tiny_prepared, "val", modality="dual", pairs="dual")
    again = evaluate(model.to(memory_format=torch.channels_last), val, input_hw=(32, 64)).metrics
    assert run["mAP50"] == pytest.approx(again["mAP50"], abs=1e-6)
    assert run["mAP50_95"] == pytest.approx(again["mAP50_95"], abs=1e-6)
    assert report["export"]["train"] == 48
    assert report["ratios"] == {}
    assert (out / "yolo" / "data.yaml").is_file()


def test_side_by_side_ratio(sbs: ModuleType) -> None:
    runs = {
        "fredfusion dual s": {"images_per_s": 100.0, "images_per_s_steady": 120.0},
        "fredfusion rgb s": {"images_per_s": 150.0, "images_per_s_steady": None},
        "ultralytics": {"images_per_s": 50.0, "images_per_s_steady": 60.0},
    }
    assert sbs.ratios(runs) == {
        "fredfusion dual s/ultralytics": pytest.approx(2.0),
        "fredfusion rgb s/ultralytics": pytest.approx(2.5),
    }
    assert sbs._harmonic([10.0, 30.0]) == pytest.approx(15.0)  # 2 equal epochs: 2 / (1/10 + 1/30)


def test_side_by_side_ultralytics_offline(
    sbs: ModuleType, tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "config"))  # before ultralytics is imported
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics")
    from ultralytics.utils import torch_utils

    # as on a machine with more cores: Ultralytics then sets 3 threads whenever it picks the CPU
    monkeypatch.setattr(torch_utils, "NUM_THREADS", 3)
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args[:2])
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    counts = sbs.export_yolo(tiny_prepared, tmp_path / "yolo")
    run = sbs.train_ultralytics(
        Path(counts["data_yaml"]), "n", 1, 4, 64, torch.device("cpu"), 0, tmp_path / "ul", threads=1
    )
    assert attempts == []
    assert run["train_images_per_epoch"] == counts["train"] == 48
    assert len(run["epoch_images_per_s"]) == 1 and run["images_per_s"] > 0
    assert 0.0 <= run["mAP50"] <= 1.0
    assert run["augmentation"]["mosaic"] == 0.5 and run["augmentation"]["close_mosaic"] == 0
    assert torch.get_num_threads() == 1


# -------------------------------------------------------------------- defaults, memory, workers
def test_defaults_fit_the_device() -> None:
    from fredfusion.bench import device_defaults

    cpu = device_defaults(torch.device("cpu"))
    assert (cpu["model"], cpu["batch"], cpu["input_hw"], cpu["workers"]) == ("n", 16, (192, 320), 0)
    gpu = device_defaults(torch.device("cuda", 0))  # the sizes of the targets
    assert (gpu["model"], gpu["batch"], gpu["input_hw"]) == ("s", 128, (384, 640))


def _small_cfg(data: Path, batch: int, **extra: Any) -> Any:
    overrides = {"data": str(data), "model": "n", "unfreeze_batch_size": batch, "input_shape": [64, 128]}
    return load_config(overrides={**overrides, "num_workers": 0, **extra})


def test_a_default_batch_is_lowered_to_fit_and_a_given_one_is_refused(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fredfusion.config import ConfigError
    from fredfusion.engine import memory

    net = build_model("dual", "n")
    need4, _ = memory.training_need(net, (64, 128), 4, store_hw=(72, 128))
    monkeypatch.setattr(memory, "free_bytes", lambda device=None: int(need4.need * 1.01))
    lines: list[str] = []
    cfg = _small_cfg(tiny_prepared, 16)
    report = run_bench(cfg, steps=1, warmup=0, out=None, skip=["read", "augment", "train", "eval"],
                       fit_batch=True, log=lines.append)  # fmt: skip
    assert report["config"]["batch"] == 4 and report["memory"]["batch"] == 4
    assert "bench: batch 4: the default 16 does not fit the free memory" in lines
    assert any(line.startswith("memory: training at batch 4 needs about ") for line in lines)
    with pytest.raises(
        ConfigError, match=r"bench: --batch 16 at 64x128 needs about .* lower --batch \(about 4 fits\)"
    ):
        run_bench(cfg, steps=1, warmup=0, out=None, skip=["read", "augment", "train", "eval"], log=None)


def test_loader_workers_start_before_any_part_and_each_part_shows_progress(
    tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.utils.data import dataloader

    import fredfusion.bench as bench_mod

    events: list[str] = []
    forking = dataloader._MultiProcessingDataLoaderIter.__init__

    def spy_fork(self: Any, *args: Any, **kwargs: Any) -> None:
        events.append("workers forked")
        forking(self, *args, **kwargs)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", spy_fork)
    for part in ("_bench_read", "_bench_augment", "_bench_step", "_bench_train", "_bench_eval"):
        original = getattr(bench_mod, part)

        def spy(*args: Any, _name: str = part, _original: Any = original, **kwargs: Any) -> Any:
            events.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(bench_mod, part, spy)
    cfg = _small_cfg(tiny_prepared, 4, num_workers=1, persistent_workers=True)
    run_bench(cfg, steps=2, warmup=1, out=None, log=None)
    # one loader serves the read and end-to-end parts; its worker is forked before any part grows the heap
    assert events == [
        "workers forked", "_bench_read", "_bench_augment", "_bench_step", "_bench_train", "_bench_eval"
    ]  # fmt: skip
    err = capsys.readouterr().err
    for label in ("store read", "augment", "model step", "end to end", "eval"):
        assert f"bench {label}" in err


def test_bench_compile_times_the_first_calls_apart_and_reports_them(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    real_compile = torch.compile
    modes: list[str | None] = []

    def eager_compile(fn, **kwargs):  # dynamo tracing without inductor's codegen: seconds, not minutes
        modes.append(kwargs.get("mode"))
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    # what use_compile_cache sets for the process, put back after the test
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", inductor_config.fx_graph_cache)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", functorch_config.enable_autograd_cache)
    out, cache = tmp_path / "bench", tmp_path / "cache"
    argv = ["bench", "--data", str(tiny_prepared), "--modality", "rgb", *SMALL, "--workers", "0"]
    argv += ["--out", str(out), "--skip", "read", "augment", "--compile", "--compile-cache", str(cache)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert modes == [None, None]  # the model and the loss, mode default
    assert cache.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)  # Inductor pointed there

    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["compile"] is True and report["config"]["compile_mode"] == "default"
    comp = report["compile"]
    assert comp["mode"] == "default" and comp["cache_dir"] == str(cache)
    assert comp["cache"] == "none" and comp["fx_hit"] + comp["fx_miss"] == 0  # the eager backend
    assert list(comp["first_calls"]) == ["step", "train", "eval"]
    firsts = comp["first_calls"].values()
    assert comp["seconds"] == pytest.approx(sum(c["seconds"] for c in firsts)) and comp["seconds"] > 0
    assert comp["compiled_pairs_per_s"] == report["results"]["step"]["pairs_per_s"]
    # each first call logged, untimed; the table's heading and compile line
    assert [line.split(" took ")[0] for line in printed if line.startswith("bench: compile: ")] == [
        "bench: compile: the first training step at batch 4",
        "bench: compile: the first end-to-end step",
        "bench: compile: the first evaluation batch of 4",
    ]
    assert any(
        line.endswith(", compiled (default)") for line in printed if line.startswith("fredfusion bench:")
    )
    assert printed.count(compile_line(comp)) == 1
    assert compile_line(comp).startswith(f"compile: mode default, no Inductor graphs in {cache}; first calls")
    assert compile_line(comp).endswith(f"; compiled model step {_fmt(comp['compiled_pairs_per_s'])} pairs/s")


def test_bench_evaluates_a_cuda_graph_mode_compiled_without_cuda_graphs(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluation keeps batches in flight, which CUDA graphs' replays would overwrite: bench compiles
    its eval forward apart, in the mode less its graphs, as training does."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    real_compile = torch.compile
    modes: list[str | None] = []

    def eager_compile(fn, **kwargs):  # records the mode asked for; the eager backend takes none
        modes.append(kwargs.pop("mode", None))
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", inductor_config.fx_graph_cache)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", functorch_config.enable_autograd_cache)
    argv = ["bench", "--data", str(tiny_prepared), "--modality", "rgb", *SMALL, "--workers", "0"]
    argv += ["--out", str(tmp_path / "bench"), "--skip", "read", "augment", "step", "train"]
    argv += ["--compile", "--compile-mode", "reduce-overhead", "--compile-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    assert modes[0] == "reduce-overhead" and modes[-1] is None  # the model; its eval forward apart
