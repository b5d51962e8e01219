"""torch.compile for training and `fredfusion bench`: the mode, a persistent cache, what compiling cost.

Inductor keeps what it compiled in local caches (the FX graph cache: generated kernels and their
compiled code; the AOT autograd cache: forward + backward graphs; Triton kernels; autotuning results),
all under one folder, which PyTorch places in the temporary directory by default. A run with
``compile`` points that folder at a persistent one (``compile_cache_dir``) before anything compiles, so
a later run of the same model, input shape, precision and PyTorch version loads the compiled graphs
instead of generating them: only Dynamo's tracing (seconds) is paid again. ``CompileClock`` times the
first call(s) of a compiled model and reads Inductor's own cache counters (hits and misses).

CUDA graphs (``reduce-overhead`` and ``max-autotune``) replay a recorded step with one launch; the
training step is free of host syncs and its batch shape is fixed (``drop_last``), which they need.
The step marks each iteration's start (``cudagraph_mark_step_begin``); several processes (torchrun)
refuse these modes (``check_compile_mode``), as DDP's gradient hooks are not recorded in a graph.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from fredfusion.config import ConfigError

CACHE_ENV = "FREDFUSION_CACHE"
"""Environment variable naming fredfusion's cache root (the compile cache is its ``compile`` folder)."""
TORCH_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
"""PyTorch's variable for Inductor's cache folder; respected when set and no fredfusion folder is."""
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that record CUDA graphs."""

F = TypeVar("F", bound=Callable[..., Any])


def compile_cache_dir(setting: str = "") -> Path:
    """The folder of the persistent compile cache: ``setting`` when given, else ``$FREDFUSION_CACHE/compile``,
    else ``$TORCHINDUCTOR_CACHE_DIR`` (a folder chosen for PyTorch), else
    ``$XDG_CACHE_HOME/fredfusion/compile`` (``~/.cache/fredfusion/compile``)."""
    if setting:
        return Path(setting).expanduser().absolute()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute() / "compile"
    if os.environ.get(TORCH_CACHE_ENV):
        return Path(os.environ[TORCH_CACHE_ENV]).expanduser().absolute()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base.expanduser().absolute() / "fredfusion" / "compile"


def use_compile_cache(setting: str = "") -> Path:
    """Point Inductor's local caches at ``compile_cache_dir(setting)`` (created) and keep them on; returns
    the folder. Call before the first compilation of the process; a cache turned off through PyTorch's
    own variables (``TORCHINDUCTOR_FX_GRAPH_CACHE=0``, ``TORCHINDUCTOR_AUTOGRAD_CACHE=0``) stays off.
    An unusable folder is a ConfigError naming it: one that cannot be written, or a path with white space
    (Inductor's C++ compiler command line splits it: the first compilation fails)."""
    folder = compile_cache_dir(setting)
    if any(char.isspace() for char in str(folder)):
        raise ConfigError(
            f"compile cache {folder}: a path with white space breaks Inductor's compiler calls; set "
            f"--compile_cache or ${CACHE_ENV} to a folder without spaces"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"compile cache {folder}: not writable ({exc.strerror or exc}); set --compile_cache or "
            f"${CACHE_ENV} to a writable folder"
        ) from None
    if os.environ.get(TORCH_CACHE_ENV) != str(folder):
        os.environ[TORCH_CACHE_ENV] = str(folder)
        _forget_cache_paths()
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ:
        functorch_config.enable_autograd_cache = True
    return folder


def _forget_cache_paths() -> None:
    """Drop the cache paths Inductor memoised in this process (a folder set after a compilation)."""
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # not in every version; a fresh process has nothing memoised
        return
    clear_caches()


def check_compile_mode(mode: str, world_size: int) -> None:
    """ConfigError when ``mode`` records CUDA graphs and several processes train (DDP)."""
    if mode in CUDA_GRAPH_MODES and world_size > 1:
        raise ConfigError(
            f"compile_mode {mode} records CUDA graphs, which this tool runs with one process only; "
            f"under torchrun use compile_mode default or max-autotune-no-cudagraphs"
        )


def compile_callable(fn: F, mode: str = "default") -> F:
    """``torch.compile(fn)`` in ``mode`` (``default`` passes no mode)."""
    if mode == "default":
        return torch.compile(fn)  # type: ignore[return-value]
    return torch.compile(fn, mode=mode)  # type: ignore[return-value]


def without_cuda_graphs(mode: str) -> str:
    """``mode`` less its CUDA graphs, for evaluation: it keeps several batches in flight, and a graph's
    replay would overwrite the outputs of the one before."""
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def mark_step_begin(mode: str) -> None:
    """Before a training iteration in a CUDA-graph mode: the previous iteration's graph outputs are dead."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def cache_counts() -> dict[str, int]:
    """Inductor's process-wide counters: FX graph cache hits / misses, AOT autograd cache hits / misses."""
    from torch._dynamo.utils import counters

    return {
        "fx_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fx_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "aot_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "aot_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


@dataclass(frozen=True)
class CompileReport:
    """Seconds of the first call(s) of a compiled model and what the cache gave (counter differences)."""

    what: str
    seconds: float
    counts: dict[str, int]
    cache_dir: str

    @property
    def state(self) -> str:
        """``hit`` (every graph from the cache), ``miss`` (none), ``partial``, or ``none`` (nothing compiled
        by Inductor, e.g. another backend)."""
        hits, misses = self.counts["fx_hit"], self.counts["fx_miss"]
        if hits + misses == 0:
            return "none"
        return "hit" if misses == 0 else "miss" if hits == 0 else "partial"

    def line(self) -> str:
        """One line for the log."""
        c = self.counts
        graphs = c["fx_hit"] + c["fx_miss"]
        text = {
            "hit": f"cache hit: all {graphs} graph(s) loaded",
            "miss": f"cache miss: {graphs} graph(s) compiled and stored",
            "partial": f"cache partial: {c['fx_hit']} of {graphs} graph(s) loaded",
            "none": "no Inductor graphs",
        }[self.state]
        return (
            f"compile: {self.what} took {self.seconds:.1f} s (compilation included); {text} "
            f"(AOT autograd {c['aot_hit']} hit / {c['aot_miss']} miss) in {self.cache_dir}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (bench.json)."""
        return {"seconds": self.seconds, "cache": self.state, **self.counts, "cache_dir": self.cache_dir}


class CompileClock:
    """``with CompileClock(device, what, cache_dir) as clock:`` around the first call(s) of a compiled model;
    ``clock.report`` then holds the wall time (the device synchronized) and the cache counters' change."""

    def __init__(self, device: torch.device, what: str, cache_dir: Path | str) -> None:
        self.device = device
        self.what = what
        self.cache_dir = str(cache_dir)
        self.report: CompileReport | None = None

    def __enter__(self) -> CompileClock:
        self._before = cache_counts()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        after = cache_counts()
        counts = {k: after[k] - self._before[k] for k in after}
        self.report = CompileReport(self.what, time.perf_counter() - self._t0, counts, self.cache_dir)
