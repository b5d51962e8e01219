"""File names read from COCO JSON cannot leave the dataset root."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fredfusion.data.coco import load_coco
from fredfusion.data.dataset import PreparedDataset
from fredfusion.data.fred import FredError
from fredfusion.data.paths import UnsafePathError, check_relative_name, resolve_under

ROOT = Path("/data/fred")
SOURCE = Path("/prep/annotations/instances_val.json")


@pytest.mark.parametrize(
    "name",
    ["0/RGB/Video_0_10_00_00.000000.jpg", "train/3/Event/Frames/x.png", "a..b/c", "..foo/x", "a/./b", "x"],
)
def test_plain_relative_names_are_joined(name: str) -> None:
    assert resolve_under(ROOT, name, SOURCE) == ROOT / name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../x.jpg", "'..' component"),
        ("../../etc/passwd", "'..' component"),
        ("0/RGB/../../../etc/passwd", "'..' component"),
        ("0/RGB/..", "'..' component"),
        ("0\\..\\..\\x.jpg", "'..' component"),
        ("/etc/passwd", "absolute path"),
        ("//server/share/x", "absolute path"),
        ("\\\\server\\share\\x", "absolute path"),
        ("C:\\Windows\\x.jpg", "absolute path"),
        ("c:x.jpg", "absolute path"),
        ("", "empty file name"),
        ("0/RGB/x.jpg\x00.png", "NUL byte"),
    ],
)
def test_escaping_names_are_refused_naming_file_and_name(name: str, reason: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        resolve_under(ROOT, name, SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: refused file name {name!r}")
    assert reason in message and str(ROOT) in message
    assert isinstance(info.value, ValueError)  # the CLI reports ValueError as a clean error


def test_check_relative_name_message_and_value() -> None:
    assert check_relative_name("0/RGB/a.jpg", SOURCE) == "0/RGB/a.jpg"
    with pytest.raises(
        UnsafePathError, match=r"^/prep/annotations/instances_val\.json: refused file name '/x'"
    ):
        check_relative_name("/x", SOURCE)


@pytest.mark.parametrize("name", [None, 3, ["a"], {"x": 1}])
def test_non_string_names_are_refused(name: Any) -> None:
    with pytest.raises(UnsafePathError, match=r"instances_val\.json: file name .* is not a string"):
        resolve_under(ROOT, name, SOURCE)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", ".", "/", "\\", ":", "C", "\x00", "é"]), max_size=14))
def test_any_accepted_name_stays_under_the_root(name: str) -> None:
    try:
        joined = resolve_under(ROOT, name, SOURCE)
    except UnsafePathError:
        return
    normal = os.path.normpath(str(joined))
    assert normal == str(ROOT) or normal.startswith(str(ROOT) + os.sep), (name, normal)
    assert normal.replace("\\", "/").split("/").count("..") == 0


def _tampered_copy(prepared: Path, tmp_path: Path, name: str, key: str = "rgb_file_name") -> tuple[Path, int]:
    """A copy of ``prepared`` without its frame store (so frames are decoded from the FRED tree),
    whose first val image has ``key`` set to ``name``. Returns (folder, image id)."""
    out = tmp_path / "tampered"
    shutil.copytree(prepared / "annotations", out / "annotations")
    path = out / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    first = next(im for im in coco["images"] if im["pair_status"] == "dual")
    first[key] = name
    path.write_text(json.dumps(coco))
    return out, int(first["id"])


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd"])
def test_tampered_coco_file_name_fails_clearly_on_read(small_sample: Any, tmp_path: Path, name: str) -> None:
    out, image_id = _tampered_copy(small_sample.prepared, tmp_path, name)
    ds = PreparedDataset(out, "val", modality="dual", pairs="dual")
    assert ds.store is None
    with pytest.warns(RuntimeWarning, match="decoding frames"), pytest.raises(UnsafePathError) as info:
        ds.load([image_id])
    assert str(info.value).startswith(
        f"{out / 'annotations' / 'instances_val.json'}: refused file name {name!r}"
    )


def test_tampered_coco_file_name_fails_eval_command_cleanly(
    small_sample: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fredfusion.cli import main
    from fredfusion.engine.checkpoint import save_checkpoint
    from fredfusion.model import build_model
    from fredfusion.model.weights import model_meta

    out, _ = _tampered_copy(small_sample.prepared, tmp_path, "../../etc/passwd", key="event_file_name")
    model = build_model("dual", "n", "concat", num_classes=1)
    weights = tmp_path / "w.pth"
    save_checkpoint({"meta": model_meta(model), "model": model.state_dict(), "config": {}}, weights)
    args = ["eval", "--weights", str(weights), "--data", str(out), "--split", "val"]
    args += ["--input-shape", "64", "128", "--batch", "4", "--out", str(tmp_path / "report")]
    with pytest.warns(RuntimeWarning, match="decoding frames"):
        rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert "fredfusion eval: error: " in err
    assert "instances_val.json: refused file name '../../etc/passwd' ('..' component)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("key", ["file_name", "rgb_file_name", "event_file_name"])
def test_load_coco_refuses_escaping_names(small_sample: Any, tmp_path: Path, key: str) -> None:
    out, image_id = _tampered_copy(small_sample.prepared, tmp_path, "../../etc/passwd", key=key)
    path = out / "annotations" / "instances_val.json"
    index = next(i for i, im in enumerate(json.loads(path.read_text())["images"]) if im["id"] == image_id)
    with pytest.raises(FredError) as info:
        load_coco(path)
    assert (
        str(info.value)
        == f"{path}: images[{index}].{key}: refused file name '../../etc/passwd' ('..' component)"
    )
    assert load_coco(small_sample.prepared / "annotations" / "instances_val.json")["images"]
