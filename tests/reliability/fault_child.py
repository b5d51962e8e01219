"""Run the ``fredfusion`` command in this process and SIGKILL it at a chosen moment.

Usage: ``python fault_child.py FAULT N -- <fredfusion arguments>``, or ``python fault_child.py
--serve`` for a fork server that runs many such requests (see :func:`serve`). The fault is installed by
monkeypatching, in this child process only, a function the command is about to call; nothing in
the package knows about it. Faults:

- ``train-step N``: die before the N-th training step of this process (1-based).
- ``eval N``: die inside the N-th evaluation of this process, after inference, while the metrics
  are computed.
- ``save-last N``: die while ``last.pth`` of epoch N is written: half of the bytes are in the
  temporary file, the rename has not happened.
- ``copy-last N``: die halfway through the N-th copy of ``last.pth`` (to ``epNNN.pth``): half of
  the bytes are written, the copy is not finished.
- ``store-frame N``: die before the N-th frame of the frame store build is decoded.
- ``none 0``: no fault.

``FREDFUSION_TEST_THREADS`` (env) sets torch's thread count, so that results can be compared
bit for bit with a run in another process; ``FREDFUSION_TEST_NO_CURVES`` (env) skips redrawing
``curves.png`` after each epoch (matplotlib costs seconds per epoch on a slow CPU, and the picture
plays no part in what these tests check).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from typing import Any


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(target: int, wrapped: Any) -> Any:
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == target:
            _die()
        return wrapped(*args, **kwargs)

    return patched


def _write_half(data: bytes, target: Any) -> None:
    half = data[: len(data) // 2]
    if hasattr(target, "write"):
        target.write(half)
        target.flush()
        if hasattr(target, "fileno"):
            os.fsync(target.fileno())
    else:
        with open(target, "wb") as fh:
            fh.write(half)
            fh.flush()
            os.fsync(fh.fileno())


def install(fault: str, n: int) -> None:
    """Install fault ``fault`` with argument ``n`` (see the module docstring)."""
    if fault == "none":
        return
    if fault == "train-step":
        import fredfusion.engine.step as step

        step.augment_batch = _counter(n, step.augment_batch)
    elif fault == "eval":
        import fredfusion.eval.evaluator as evaluator

        evaluator.coco_map = _counter(n, evaluator.coco_map)
    elif fault == "save-last":
        import torch

        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(obj, dict) and "optimizer" in obj and obj.get("epoch") == n:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                _write_half(buf.getvalue(), f)
                _die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif fault == "copy-last":
        real_copyfile, real_copyfileobj = shutil.copyfile, shutil.copyfileobj
        copies = [0]

        def is_target(src_name: Any) -> bool:
            if os.path.basename(os.fspath(src_name)) != "last.pth":
                return False
            copies[0] += 1
            return copies[0] == n

        def copyfile(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if is_target(src):
                with open(src, "rb") as fh:
                    _write_half(fh.read(), dst)
                _die()
            return real_copyfile(src, dst, *args, **kwargs)

        def copyfileobj(fsrc: Any, fdst: Any, *args: Any, **kwargs: Any) -> Any:
            if is_target(getattr(fsrc, "name", "")):
                _write_half(fsrc.read(), fdst)
                _die()
            return real_copyfileobj(fsrc, fdst, *args, **kwargs)

        shutil.copyfile, shutil.copyfileobj = copyfile, copyfileobj
    elif fault == "store-frame":
        import fredfusion.data.store.build as store_build

        store_build.read_frame = _counter(n, store_build.read_frame)
    else:
        raise SystemExit(f"fault_child: unknown fault {fault!r}")


def _threads_and_curves() -> None:
    import torch

    torch.backends.cudnn.deterministic = True  # the CUDA resume test compares runs bit for bit
    torch.backends.cudnn.benchmark = False
    threads = os.environ.get("FREDFUSION_TEST_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if os.environ.get("FREDFUSION_TEST_NO_CURVES"):
        import fredfusion.eval.plots as plots

        plots.plot_curves = lambda *args, **kwargs: None  # matplotlib: seconds per epoch on a slow CPU


def run_one(fault: str, n: int, args: list[str]) -> int:
    """Install the fault, then run ``fredfusion ARGS`` in this process; returns its exit code."""
    install(fault, n)
    from fredfusion.cli import main as cli_main

    return cli_main(args)


def serve() -> int:
    """Fork server: import everything once, then run each request in a forked child.

    Reads one JSON request per line on stdin, ``{"fault", "n", "args", "log"}``; the child's stdout
    and stderr go to the file ``log``. Answers one JSON line per request on stdout:
    ``{"returncode": rc}``, negative for a signal (as subprocess does). Saves the seconds of
    importing torch, the CLI and torch._dynamo (first optimizer) in every child.
    """
    import json

    import torch._dynamo  # noqa: F401  (imported by the first optimizer anyway)

    import fredfusion.cli
    import fredfusion.engine.trainer
    import fredfusion.eval.evaluator

    fredfusion.cli.build_parser()  # imports the subcommands' modules
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            rc = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                rc = run_one(request["fault"], int(request["n"]), list(request["args"]))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": rc}), flush=True)
    return 0


def main(argv: list[str]) -> int:
    """``FAULT N -- ARGS``: install the fault, then run ``fredfusion ARGS``; ``--serve``: fork server."""
    _threads_and_curves()
    if argv == ["--serve"]:
        return serve()
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit("usage: fault_child.py FAULT N -- <fredfusion arguments> | fault_child.py --serve")
    return run_one(argv[0], int(argv[1]), argv[3:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
