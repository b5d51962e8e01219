"""engine.compiled: the persistent compile cache across processes, its folder, its errors, the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fredfusion.cli import main
from fredfusion.config import ConfigError
from fredfusion.engine.compiled import (
    CACHE_ENV,
    TORCH_CACHE_ENV,
    CompileReport,
    check_compile_mode,
    compile_cache_dir,
    use_compile_cache,
)

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from fredfusion.engine.compiled import CompileClock, compile_callable, use_compile_cache

folder = use_compile_cache(sys.argv[1])
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
step = compile_callable(net)
x = torch.randn(16, 4)
with CompileClock(torch.device("cpu"), "a tiny training step", folder) as clock:
    step(x).square().mean().backward()
compiled = [p.grad.clone() for p in net.parameters()]
net.zero_grad()
net(x).square().mean().backward()  # eager: the compiled step computed the same gradients
for a, b in zip(compiled, (p.grad for p in net.parameters())):
    torch.testing.assert_close(a, b)
print(json.dumps({**clock.report.to_dict(), "line": clock.report.line()}))
"""


def _compile_in_a_fresh_process(cache: Path) -> dict[str, object]:
    """Run CHILD in a new interpreter with ``cache`` as the compile cache setting; its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_") and k != CACHE_ENV}
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no pool of compile workers on a shared 2-core machine
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled_from_the_cache_folder(tmp_path: Path) -> None:
    compiler = os.environ.get("CXX") or "g++"  # what Inductor's CPU backend calls
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) for Inductor's CPU backend")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        pytest.skip(f"no Python headers ({headers}) for Inductor's CPU backend")
    cache = tmp_path / "compile-cache"
    first = _compile_in_a_fresh_process(cache)
    assert first["cache"] == "miss", first["line"]
    assert first["fx_miss"] >= 2 and first["fx_hit"] == 0, first  # forward and backward graphs
    assert first["cache_dir"] == str(cache)
    stored = [p for p in (cache / "fxgraph").rglob("*") if p.is_file()]
    assert len(stored) >= first["fx_miss"], sorted(p.name for p in cache.rglob("*"))
    assert [p for p in (cache / "aotautograd").rglob("*") if p.is_file()]

    second = _compile_in_a_fresh_process(cache)
    assert second["cache"] == "hit", second["line"]
    assert second["fx_hit"] == first["fx_miss"] and second["fx_miss"] == 0, second
    assert second["aot_miss"] == 0 and second["aot_hit"] >= 1, second
    assert f"cache hit: all {second['fx_hit']} graph(s) loaded" in str(second["line"])


def test_the_cache_folder_setting_then_fredfusion_then_torch_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv(TORCH_CACHE_ENV, raising=False)
    assert compile_cache_dir() == tmp_path / "home" / ".cache" / "fredfusion" / "compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "fredfusion" / "compile"
    monkeypatch.setenv(TORCH_CACHE_ENV, str(tmp_path / "inductor"))
    assert compile_cache_dir() == tmp_path / "inductor"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "ff"))
    assert compile_cache_dir() == tmp_path / "ff" / "compile"
    assert compile_cache_dir(str(tmp_path / "given")) == tmp_path / "given"
    assert compile_cache_dir("~/cc") == tmp_path / "home" / "cc"
    monkeypatch.chdir(tmp_path)
    assert compile_cache_dir("rel") == tmp_path / "rel"  # absolute: Inductor's folder must not move


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_an_unusable_cache_folder_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "cache"  # under a regular file: not creatable, whoever runs the test (root too)
    environ = dict(os.environ)
    with pytest.raises(ConfigError) as caught:
        use_compile_cache(str(bad))
    text = str(caught.value)
    assert "\n" not in text and f"compile cache {bad}: not writable" in text and "--compile_cache" in text
    assert dict(os.environ) == environ  # refused before anything was changed

    monkeypatch.setenv(CACHE_ENV, str(blocker))
    with pytest.raises(ConfigError, match=f"compile cache {blocker / 'compile'}: not writable"):
        use_compile_cache()
    monkeypatch.delenv(CACHE_ENV)
    spaced = tmp_path / "my cache"  # g++ got it as two words: the first compilation failed
    with pytest.raises(ConfigError, match="a path with white space breaks Inductor's compiler calls"):
        use_compile_cache(str(spaced))
    assert not spaced.exists() and dict(os.environ) == environ

    # through the commands: before any data is read or a run folder is made
    err = _one_line_error(
        [
            "bench",
            "--data",
            str(tmp_path / "no data"),
            "--device",
            "cpu",
            "--compile",
            "--compile-cache",
            str(bad),
        ],
        capsys,
    )
    assert err.startswith(f"fredfusion bench: error: compile cache {bad}: not writable"), err
    run = tmp_path / "run"
    err = _one_line_error(
        [
            "train",
            "--data",
            str(tmp_path / "no data"),
            "--device",
            "cpu",
            "--compile",
            "--compile_cache",
            str(bad),
            "--out",
            str(run),
        ],
        capsys,
    )
    assert err.startswith(f"fredfusion train: error: compile cache {bad}: not writable"), err
    assert not run.exists()


def test_the_report_says_what_the_cache_gave() -> None:
    def report(fx_hit: int, fx_miss: int) -> CompileReport:
        counts = {"fx_hit": fx_hit, "fx_miss": fx_miss, "aot_hit": fx_hit // 2, "aot_miss": fx_miss // 2}
        return CompileReport("the first step", 12.34, counts, "/c")

    assert [report(*c).state for c in ((4, 0), (0, 4), (1, 3), (0, 0))] == ["hit", "miss", "partial", "none"]
    assert report(4, 0).line() == (
        "compile: the first step took 12.3 s (compilation included); cache hit: all 4 graph(s) loaded "
        "(AOT autograd 2 hit / 0 miss) in /c"
    )
    assert "cache miss: 4 graph(s) compiled and stored" in report(0, 4).line()
    assert "cache partial: 1 of 4 graph(s) loaded" in report(1, 3).line()
    assert report(2, 0).to_dict() == {
        "seconds": 12.34,
        "cache": "hit",
        "fx_hit": 2,
        "fx_miss": 0,
        "aot_hit": 1,
        "aot_miss": 0,
        "cache_dir": "/c",
    }


def test_cuda_graph_modes_are_refused_under_several_processes() -> None:
    check_compile_mode("reduce-overhead", 1)
    check_compile_mode("max-autotune-no-cudagraphs", 4)
    check_compile_mode("default", 4)
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ConfigError, match=f"compile_mode {mode} records CUDA graphs"):
            check_compile_mode(mode, 2)


def test_the_compiled_loss_is_traced_once_for_a_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from torch._dynamo.testing import CompileCounter

    from fredfusion.config import load_config
    from fredfusion.engine.step import TrainStep
    from fredfusion.model import build_model

    real_compile = torch.compile
    counters: list[CompileCounter] = []

    def counting_compile(fn, **kwargs):  # dynamo's tracing, counted, without a backend's codegen
        counters.append(CompileCounter())
        return real_compile(fn, backend=counters[-1], **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    cfg = load_config(overrides={"modality": "rgb", "model": "n", "input_shape": [64, 128], "compile": True})
    net = build_model("rgb", "n", num_classes=1)
    step = TrainStep(cfg, net, 2, device=torch.device("cpu"), amp_dtype=None, optimizer_choice=("sgd", None))
    assert len(counters) == 1  # the loss (bench and train compile the model themselves)
    targets = torch.tensor([[0, 0, 10.0, 10.0, 30.0, 24.0], [1, 0, 50.0, 20.0, 70.0, 40.0]])
    for _ in range(3):
        preds = net(torch.rand(2, 3, 64, 128), None)
        step.compute_loss([p.float() for p in preds], targets)
    # a first call that filled a cache of the loss (its constants on the device) was traced again
    assert counters[0].frame_count == 1


def test_evaluation_compiles_without_cuda_graphs_in_every_mode() -> None:
    from fredfusion.engine.compiled import without_cuda_graphs

    modes = {m: without_cuda_graphs(m) for m in ("default", "reduce-overhead", "max-autotune")}
    assert modes == {
        "default": "default",
        "reduce-overhead": "default",
        "max-autotune": "max-autotune-no-cudagraphs",
    }
    assert without_cuda_graphs("max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
