"""The command line as a whole: one vocabulary, help for every option, and every user mistake reported
as one line on stderr with exit status 2 (no traceback), in every command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fredfusion import __version__
from fredfusion.cli import build_parser, main
from fredfusion.commands import NAMES
from fredfusion.commands.train import config_from_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid dual checkpoint, a file that is not one, a FRED sample and paths that do not exist."""
    from fredfusion.data.synth import write_sample
    from fredfusion.engine.checkpoint import save_checkpoint
    from fredfusion.model import build_model
    from fredfusion.model.weights import model_meta

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = build_model("dual", "n")
    good = root / "dual.pth"
    save_checkpoint({"meta": model_meta(model), "model": model.state_dict(), "config": {}}, good)
    garbage = root / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    write_sample(root / "fred", sequences=1, frames=4, width=320, height=180, seed=0)
    (seq,) = [p for p in (root / "fred").iterdir() if p.is_dir()]
    return {"good": good, "garbage": garbage, "fred": root / "fred", "seq": seq, "missing": root / "nowhere"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _mistakes(f: dict[str, Path], data: Path, out: Path) -> dict[str, list[tuple[list[str], str]]]:
    """Per command: (arguments, what the one line must name)."""
    good, garbage, missing = str(f["good"]), str(f["garbage"]), str(f["missing"])
    d, o = str(data), str(out)
    return {
        "synth": [
            (["--out", o, "--sequences", "0"], "sequences"),
            (["--out", o, "--frames", "many"], "--frames"),
            (["--sequences", "2"], "--out"),
        ],
        "prepare": [
            (["--fred-root", missing, "--out", o], missing),
            (["--fred-root", str(f["fred"]), "--out", o, "--device", "cuda:7"], "--device"),
            (["--fred-root", str(f["fred"]), "--out", o, "--codec", "gif"], "--codec"),
            (["--fred-root", str(f["fred"]), "--out", o, "--workers", "-1"], "--workers"),
        ],
        "train": [
            (["--data", missing], missing),
            (["--data", d, "--device", "cuda:7"], "--device"),
            (["--data", d, "--device", "tpu"], "--device"),
            (["--data", d, "--batch", "0"], "batch_size"),
            (["--data", d, "--imgsz", "100"], "input_shape"),
            (["--data", d, "--optimizer", "rmsprop"], "optimizer"),
            (["--data", d, "--modality_dropout", "1.5"], "--modality_dropout"),
            (["--data", d, "--modality_dropout_ramp", "2"], "modality_dropout_ramp"),
            (["--data", d, "--resume", missing], missing),
            (["--data", d, "--resume", good], "last.pth"),
            (["--data", d, "--bacth", "8"], "--batch"),
            (["--data", d, "--model", "n", "--weights", garbage, "--out", o], garbage),
            (["--data", d, "--model", "n", "--weights", missing, "--out", o], missing),
        ],
        "eval": [
            (["--weights", missing, "--data", d], missing),
            (["--weights", garbage, "--data", d], garbage),
            (["--weights", good, "--data", missing], missing),
            (["--weights", good, "--data", d, "--device", "cuda:7"], "--device"),
            (["--weights", good, "--data", d, "--batch", "0"], "--batch"),
            (["--weights", good, "--data", d, "--conf", "1.5"], "--conf"),
            (["--weights", good, "--data", d, "--split", "nope"], "instances_nope.json"),
            (["--data", d], "--weights"),
        ],
        "predict": [
            (["--weights", missing, "--source", str(f["seq"])], missing),
            (["--weights", garbage, "--source", str(f["seq"])], garbage),
            (["--weights", good, "--source", missing], missing),
            (["--weights", good, "--source", str(f["seq"]), "--device", "cuda:7"], "--device"),
            (["--weights", good, "--source", str(f["seq"]), "--iou", "-1"], "--iou"),
            (["--weights", good], "--source"),
        ],
        "show": [
            (["--data", missing], missing),
            (["--data", d, "--n", "0"], "--n"),
            (["--data", d, "--split", "nope"], "instances_nope.json"),
            (["--data", d, "--augment", "--input-shape", "0", "128"], "--input-shape"),
        ],
        "export": [
            (["--weights", missing], missing),
            (["--weights", garbage], garbage),
            (["--weights", good, "--opset", "3"], "--opset"),
            (["--weights", good, "--input-shape", "60", "128"], "--input-shape"),
        ],
        "convert": [
            (["--weights", missing, "--out", o + ".pth"], missing),
            (["--weights", garbage, "--out", o + ".pth"], garbage),
            (["--weights", good, "--out", o + ".pth", "--anchors", missing], missing),
            (["--weights", good], "--out"),
        ],
        "demo": [
            (["--device", "cuda:7", "--out", o], "--device"),
            (["--sequences", "0", "--out", o], "sequences"),
            (["--modality", "thermal", "--out", o], "--modality"),
        ],
        "bench": [
            (["--data", missing], missing),
            (["--data", d, "--device", "cuda:7"], "--device"),
            (["--data", d, "--batch", "0"], "--batch"),
            (["--data", d, "--steps", "0"], "--steps"),
            (["--data", d, "--input-shape", "60", "128"], "--input-shape"),
        ],
        "ablate": [
            (["--data", missing, "--out", o, "--variants", "rgb"], missing),
            (["--data", d, "--out", o, "--variants", "rgb", "--device", "cuda:7"], "--device"),
            (["--data", d, "--out", o, "--variants", "rgb", "--epochs", "0"], "--epochs"),
            (["--data", d, "--out", o, "--variants", "rgb", "--seeds", "1", "1"], "--seeds"),
            (["--data", d, "--out", o, "--variants-file", missing], missing),
            (["--data", d, "--out", o], "--variants"),
        ],
    }


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        rc = exc.code
    return rc, capsys.readouterr().err


def test_every_command_reports_each_mistake_in_one_line(
    files: dict[str, Path], tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _mistakes(files, tiny_prepared, tmp_path / "out")
    assert set(NAMES) <= set(table), f"add the mistakes of {sorted(set(NAMES) - set(table))} to this test"
    wrong = []
    for command in NAMES:
        for args, named in table[command]:
            rc, err = _run([command, *args], capsys)
            lines = err.strip().splitlines()
            ok = rc == 2 and len(lines) == 1 and "Traceback" not in err and named in err
            ok = ok and lines[0].startswith(f"fredfusion {command}: error: ")
            if not ok:
                wrong.append(f"{command} {' '.join(args)}: rc {rc}, stderr {err!r}")
    assert not wrong, "\n".join(wrong)


def test_a_mistake_in_a_real_process_prints_no_traceback(files: dict[str, Path], tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "fredfusion", "eval", "--weights", str(files["missing"])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"fredfusion eval: error: --weights {files['missing']}: checkpoint not found"
    )


# ------------------------------------------------------------------------------------- vocabulary
SHARED = {
    "--batch": ("train", "eval", "predict", "bench"),
    "--imgsz": ("train", "eval", "predict", "export", "show", "bench", "prepare", "demo"),
    "--input-shape": ("train", "eval", "predict", "export", "show", "bench"),
    "--conf": ("train", "eval", "predict"),
    "--iou": ("train", "eval", "predict"),
    "--device": ("train", "eval", "predict", "bench", "demo", "prepare"),
    "--weights": ("train", "eval", "predict", "export"),
    "--data": ("train", "eval", "show", "bench"),
    "--out": ("synth", "prepare", "train", "eval", "predict", "show", "export", "demo", "bench"),
    "--workers": ("synth", "prepare", "train", "eval", "bench"),
    "--seed": ("synth", "prepare", "train", "show", "bench", "demo"),
}


def test_the_same_names_in_every_command() -> None:
    parsers = _subparsers()
    missing = [
        f"{command} {flag}"
        for flag, commands in SHARED.items()
        for command in commands
        if flag not in parsers[command]._option_string_actions
    ]
    assert not missing


def test_every_option_has_a_description() -> None:
    parsers = {"fredfusion": build_parser(), **_subparsers()}
    bare = []
    for name, parser in parsers.items():
        for action in parser._actions:
            text = (action.help or "").strip()
            if (
                action.help == argparse.SUPPRESS
                or not text
                or text.lower().startswith(("(default", "default"))
            ):
                bare.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not bare, bare


def test_every_help_page_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of every command renders (argparse formats each option's text with ``%``)."""
    for name in ["", *NAMES]:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"] if name else ["--help"])
        assert info.value.code == 0, name
        assert "usage: fredfusion" in capsys.readouterr().out, name


def test_no_abbreviations_and_both_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "--batch", "16", "--conf", "0.01", "--iou", "0.5", "--lr", "0.02"])
    cfg = config_from_args(args)
    assert (cfg.freeze_batch_size, cfg.unfreeze_batch_size) == (16, 16)
    assert (cfg.conf_thres, cfg.nms_iou, cfg.init_lr) == (0.01, 0.5, 0.02)
    cfg = config_from_args(parser.parse_args(["train", "--imgsz", "320", "--out", "runs/x/mine"]))
    assert cfg.input_shape == [192, 320] and cfg.run_dir() == Path("runs/x/mine")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--bat", "16"])  # an abbreviation is not an option
    assert "unrecognized arguments: --bat" in capsys.readouterr().err
    args = parser.parse_args(
        ["predict", "--weights", "w", "--source", "s", "--save_frames", "3", "--max_det", "5"]
    )
    assert (args.save_frames, args.max_det) == (3, 5)
    args = parser.parse_args(["eval", "--weights", "w", "--input_shape", "64", "128", "--batch_size", "4"])
    assert (args.input_shape, args.batch) == ([64, 128], 4)
    assert parser.parse_args(["eval", "--weights", "w", "--imgsz", "640"]).input_shape == [352, 640]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"fredfusion {__version__}"


def test_out_of_memory_outside_training_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fredfusion.commands.eval as eval_cmd

    def oom(_args: argparse.Namespace) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(details)")

    monkeypatch.setattr(eval_cmd, "run", oom)
    rc, err = _run(["eval", "--weights", "w.pth"], capsys)
    assert rc == 2
    expected = (
        "fredfusion eval: error: CUDA out of memory. Tried to allocate 2.00 GiB; lower --batch or --imgsz"
    )
    assert err == expected + "\n"
