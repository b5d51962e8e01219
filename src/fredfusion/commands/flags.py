"""Flag groups shared by the commands: one declaration per option, the same name in every command."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fredfusion.spec import NMS_IOU, input_hw_for_width

DEFAULT_DATA = Path("datasets/fred_coco")
DEFAULT_FRED_ROOT = "/mnt/data/datasets/fred"


class Parser(argparse.ArgumentParser):
    """The parser of every command: no abbreviated options (``--batch`` never means ``--batch_size``),
    ``--a_b`` and ``--a-b`` both accepted for an option declared with one of them, and a mistake is one
    line on stderr with exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _spelling(self, token: str) -> str:
        """``token`` with ``_`` / ``-`` swapped in its name when only the other spelling is declared."""
        name, eq, value = token.partition("=")
        if not name.startswith("--") or name in self._option_string_actions:
            return token
        for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
            if other in self._option_string_actions:
                return other + eq + value
        return token

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        """``argparse.ArgumentParser.parse_known_args`` with both spellings of dashed names accepted."""
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        args[:end] = [self._spelling(a) for a in args[:end]]
        return super().parse_known_args(args, namespace)

    def unknown(self, extra: Sequence[str]) -> NoReturn:
        """Exit on unrecognised arguments, suggesting the closest option of this command."""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        hints = []
        for token in extra:
            close = (
                difflib.get_close_matches(token.split("=")[0], known, n=1) if token.startswith("-") else []
            )
            hints.append(f"{token} (did you mean {close[0]}?)" if close else token)
        self.error(f"unrecognized arguments: {' '.join(hints)}")

    def error(self, message: str) -> NoReturn:
        """One line on stderr naming the command and the flag, then exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (the message names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def unit_float(text: str) -> float:
    """An argparse ``type``: a number in [0, 1] (thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value:g}")
    return value


def default_fred_root() -> str:
    """$FRED_ROOT or the conventional mount point."""
    return os.environ.get("FRED_ROOT", DEFAULT_FRED_ROOT)


def add_data(p: argparse.ArgumentParser, default: Path = DEFAULT_DATA) -> None:
    """``--data``: a prepared folder (the output of ``fredfusion prepare``)."""
    p.add_argument("--data", type=Path, default=default, help=f"prepared folder (default: {default})")


def add_weights(p: argparse.ArgumentParser, required: bool = True, **kwargs: Any) -> None:
    """``--weights``: a fredfusion checkpoint (``best.pth``)."""
    text = "fredfusion checkpoint (e.g. runs/train/dual/best.pth)"
    p.add_argument("--weights", type=Path, required=required, help=text, **kwargs)


class _Width(argparse.Action):
    """``--imgsz W``: the 16:9 input shape of width W (height rounded to 32), stored as ``input_shape``."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, value: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, list(input_hw_for_width(int(value))))


def add_input_shape(p: argparse.ArgumentParser, default: Any = None, help: str = "") -> None:
    """``--input-shape H W`` (positive multiples of 32) or ``--imgsz W`` (16:9, height rounded to 32):
    the network input."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--input-shape",
        dest="input_shape",
        type=int,
        nargs=2,
        default=default,
        metavar=("H", "W"),
        help=help or "network input height and width, multiples of 32 (default: the training shape)",
    )
    group.add_argument(
        "--imgsz",
        dest="input_shape",
        type=int,
        action=_Width,
        metavar="W",
        default=argparse.SUPPRESS,
        help="network input width; the height follows at 16:9, rounded to 32 (640 -> 352 640)",
    )


def input_hw(args: argparse.Namespace) -> tuple[int, int] | None:
    """``--input-shape`` as a tuple, or None when not given."""
    return tuple(args.input_shape) if args.input_shape else None


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device``: cpu, cuda, cuda:1; default cuda when available."""
    p.add_argument(
        "--device", default="", help="cpu, cuda, cuda:1 or 1 (default: cuda when available, else cpu)"
    )


def add_out(p: argparse.ArgumentParser, default: Path | None, help: str) -> None:
    """``--out``: where the command writes."""
    p.add_argument("--out", type=Path, default=default, help=help)


def add_batch(
    p: argparse.ArgumentParser, default: int | None, help: str = "images per batch", default_text: str = ""
) -> None:
    """``--batch``: images per batch (``--batch-size``, ``--batch_size`` as aliases)."""
    text = f"{help} (default: {default_text or default})"
    p.add_argument("--batch", "--batch-size", type=int_at_least(1), default=default, help=text)


def add_thresholds(p: argparse.ArgumentParser, conf: float) -> None:
    """``--conf`` and ``--iou``: score threshold and NMS IoU threshold."""
    p.add_argument(
        "--conf", "--conf-thres", type=unit_float, default=conf, help=f"score threshold (default: {conf})"
    )
    p.add_argument(
        "--iou", "--nms-iou", type=unit_float, default=NMS_IOU, help=f"NMS IoU threshold (default: {NMS_IOU})"
    )


def add_workers(p: argparse.ArgumentParser, default: int, help: str) -> None:
    """``--workers``: processes or threads a command may use."""
    p.add_argument("--workers", type=int_at_least(0), default=default, help=f"{help} (default: {default})")


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed``: the random seed."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
