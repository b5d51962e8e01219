"""Fixtures of the reliability tests: a very small prepared sample and subprocess helpers."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("fault_child.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "reliability: starts and kills `fredfusion` subprocesses (tens of seconds); "
        "deselect with -m 'not reliability'",
    )


@dataclass(frozen=True)
class Sample:
    """A synthetic FRED tree, its split file and the folder prepared from it."""

    fred: Path
    split_file: Path
    prepared: Path


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """3 synthetic sequences of 10 frames at 320x180, store 128x72: 2 train, 1 val sequence.

    About 20 train and 10 val RGB/Event pairs: an epoch of batch 8 is 2 steps.
    """
    from fredfusion.data.prepare import prepare
    from fredfusion.data.synth import write_sample

    root = tmp_path_factory.mktemp("reliability")
    write_sample(root / "fred", sequences=3, frames=10, width=320, height=180, seed=1)
    split_file = root / "split.txt"
    split_file.write_text("0 train\n1 train\n2 val\n")
    prepare(
        root / "fred",
        root / "prepared",
        split=str(split_file),
        imgsz=128,
        workers=0,
        progress=False,
        log=lambda _m: None,
    )
    return Sample(root / "fred", split_file, root / "prepared")


@dataclass
class ChildResult:
    """Outcome of one ``fredfusion`` child process: exit code (negative: killed by that signal)
    and everything it printed (stdout and stderr together)."""

    returncode: int
    output: str


class ForkServer:
    """``fault_child.py --serve`` in a subprocess: runs ``fredfusion`` requests in forked children.

    Children use one torch thread (numbers match this process under the ``one_thread`` fixture)
    and do not redraw curves.png (see fault_child.py).
    """

    def __init__(self, log_dir: Path) -> None:
        env = dict(os.environ)
        env["FREDFUSION_TEST_THREADS"] = "1"
        env["FREDFUSION_TEST_NO_CURVES"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
        self.log_dir = log_dir
        self.count = 0
        self.server_log = log_dir / "server.log"
        with open(self.server_log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), "--serve"],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,  # its own process group: a hung child can be killed with it
            )

    def run(self, fault: str, n: int, args: list[str], timeout: float = 300.0) -> ChildResult:
        """Run ``fredfusion ARGS`` in a fresh child with ``fault`` installed; wait for it to end."""
        self.count += 1
        log = self.log_dir / f"child{self.count}.log"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"fault": fault, "n": n, "args": args, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.kill()
            raise TimeoutError(
                f"fredfusion {' '.join(args[:1])} did not end within {timeout:.0f} s:\n{log.read_text()}"
            )
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"fork server exited with {self.proc.wait()}:\n{self.server_log.read_text()}")
        return ChildResult(int(json.loads(answer)["returncode"]), log.read_text(errors="replace"))

    def kill(self) -> None:
        """SIGKILL the server and any child it is running (they share its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture(scope="session")
def run_child(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str, int, list[str]], ChildResult]]:
    """``run_child(fault, n, args)``: ``fredfusion ARGS`` in a child process killed by ``fault``."""
    server = ForkServer(tmp_path_factory.mktemp("children"))
    try:
        yield server.run
    finally:
        server.close()


@pytest.fixture()
def one_thread(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The suite's one-thread fixture (reproducible numbers across processes with the same count),
    plus no curves.png redraw per epoch."""
    import fredfusion.eval.plots as plots

    monkeypatch.setattr(plots, "plot_curves", lambda *args, **kwargs: None)
    yield
