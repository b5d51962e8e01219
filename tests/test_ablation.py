"""fredfusion ablate: variants from text and files, the table's mean and spread against hand numbers,
the FRED paper's rows, one-line mistakes, and a real run that a second invocation does not train again."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from tests.shared import TINY_TRAIN

from fredfusion import ablation
from fredfusion.cli import main
from fredfusion.config import ConfigError, TrainConfig, apply_overrides, resolved


def test_variants_from_text_and_from_a_file(tmp_path: Path) -> None:
    v = ablation.parse_variant("dual:attention+modality_dropout=0.3+pairs=any+weights_rgb=@rgb")
    assert (v.modality, v.fusion) == ("dual", "attention")
    assert v.options == (("modality_dropout", 0.3), ("pairs", "any"), ("weights_rgb", "@rgb"))
    assert ablation.parse_variant("event") == ablation.Variant("event", "event")
    plan = tmp_path / "variants.yaml"
    plan.write_text(
        "variants:\n  - rgb\n  - {name: md, modality: dual, fusion: concat, modality_dropout: 0.3}\n"
        "seeds: [0, 2]\nrecipe: {mosaic: false}\n"
    )
    variants, seeds, recipe = ablation.read_variants_file(plan)
    assert [x.name for x in variants] == ["rgb", "md"] and variants[1].options == (("modality_dropout", 0.3),)
    assert seeds == [0, 2] and recipe == {"mosaic": False}
    plan.write_text("variants: [rgb]\nepochs: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'epochs'"):
        ablation.read_variants_file(plan)


def _result(
    name: str, seed: int, map50: float, map5095: float, night: float | None, late: bool = False
) -> dict:
    """A result.json as run_plan writes it (fractions)."""
    return {
        "variant": "late" if late else name,
        "modality": "late" if late else name.split(":")[0],
        "fusion": None,
        "options": {},
        "seed": seed,
        "metrics": {"mAP50": map50, "mAP50_95": map5095, "images": 10},
        "conditions": {"night": {"images": 4, "boxes": 4, "AP50": night, "mAP50_95": None}},
    }


def test_mean_and_spread_against_hand_numbers(tmp_path: Path) -> None:
    results = {
        ("rgb", 0): _result("rgb", 0, 0.50, 0.20, 0.10),
        ("rgb", 1): _result("rgb", 1, 0.60, 0.25, None),  # night undefined for this seed: not averaged
        ("rgb", 2): _result("rgb", 2, 0.70, 0.30, 0.40),
        ("event", 0): _result("event", 0, 0.9, 0.5, 0.8),
        ("late", 0): _result("late", 0, 0.95, 0.55, 0.85, late=True),
    }
    columns, rows = ablation.summarize(["rgb", "event", "dual:concat", "late"], results, paper="canonical")
    assert columns == ["mAP50", "mAP50_95", "night/AP50", "night/mAP50_95"]
    assert [r.name for r in rows] == [
        "rgb",
        "event",
        "late",
        "FRED paper: Event (YOLO11, 640)",
        "FRED paper: RGB (YOLO11, 640)",
    ]
    rgb = rows[0]
    assert rgb.seeds == [0, 1, 2] and rows[2].kind == "late"
    # by hand: mAP50 (50 + 60 + 70) / 3 = 60, min 50, max 70; night (10 + 40) / 2 = 25 over 2 seeds
    assert rgb.cells["mAP50"] == pytest.approx((60.0, 50.0, 70.0, 3))
    assert rgb.cells["mAP50_95"] == pytest.approx((25.0, 20.0, 30.0, 3))
    assert rgb.cells["night/AP50"] == pytest.approx((25.0, 10.0, 40.0, 2))
    assert rgb.cells["night/mAP50_95"] is None
    assert rows[3].cells["mAP50"] == (87.68, 87.68, 87.68, 1) and rows[4].cells["mAP50_95"] is None

    files = ablation.write_tables(tmp_path, columns, rows, results, "Ablation on test data")
    md = files["md"].read_text().splitlines()
    assert md[0] == "# Ablation on test data"
    header = next(line for line in md if line.startswith("| variant"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "variant",
        "seeds",
        "mAP50",
        "mAP50:95",
        "night AP50",
    ]
    rgb_line = next(line for line in md if line.startswith("| rgb "))
    assert [c.strip() for c in rgb_line.strip("|").split("|")] == [
        "rgb",
        "3",
        "60.00 [50.00, 70.00]",
        "25.00 [20.00, 30.00]",
        "25.00 [10.00, 40.00]",
    ]
    table = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert [r["variant"] for r in table][:3] == ["rgb", "event", "late"]
    assert (table[0]["mAP50_mean"], table[0]["mAP50_min"], table[0]["mAP50_max"]) == (
        "60.0000",
        "50.0000",
        "70.0000",
    )
    assert table[0]["night/AP50_n"] == "2" and table[0]["seeds"] == "0 1 2"
    assert table[3]["kind"] == "paper" and table[3]["mAP50_95_mean"] == "49.2500"
    tex = files["tex"].read_text()
    assert "\\toprule" in tex and "60.00 {\\scriptsize [50.00, 70.00]}" in tex and "87.68" in tex
    runs = list(csv.reader(io.StringIO(files["runs"].read_text())))
    assert runs[0] == ["variant", "seed", *columns] and len(runs) == 6


def test_the_paper_rows_follow_the_data() -> None:
    synthetic = {
        "info": {"split_source": "fallback", "split_scheme": "canonical"},
        "images": [{"conditions": ["night"]}],
    }
    fred = {
        "info": {"split_source": "canonical", "split_scheme": "canonical"},
        "images": [{"conditions": ["canonical"]}],
    }
    old_fred = {"info": {"split_source": "challenging", "split_scheme": "challenging"}, "images": [{}]}
    assert ablation.paper_split(synthetic) is None and ablation.paper_split(synthetic, "on") == "canonical"
    assert ablation.paper_split(fred) == "canonical" and ablation.paper_split(fred, "off") is None
    assert ablation.paper_split(old_fred) == "challenging"


@pytest.mark.parametrize(
    ("variants", "named"),
    [
        (["thermal"], "'thermal'"),
        (["rgb:concat"], "dual variants only"),
        (["dual:gated"], "'gated'"),
        (["dual:concat+nope=1"], "'nope'"),
        (["dual:concat+modality_dropout"], "KEY=VALUE"),
        (["dual:concat+modality_dropout=2"], "modality_dropout"),
        (["dual+weights_rgb=@rgb"], "@rgb"),
        (["rgb", "rgb"], "listed twice"),
        (["dual", "dual:concat"], "the same model"),
        (["rgb+seed=3"], "--seeds"),
    ],
)
def test_a_bad_variant_is_one_line(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], variants: list[str], named: str
) -> None:
    rc = main(["ablate", "--data", str(tiny_prepared), "--out", str(tmp_path), "--variants", *variants])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fredfusion ablate: error: ") and named in err[0]
    assert not any(tmp_path.iterdir())  # nothing written before the checks passed


@pytest.mark.usefixtures("one_thread")
def test_ablate_runs_resumes_and_skips_finished_variants(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fredfusion.commands.ablate as command

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_TRAIN, "eval_period": 5}))
    out = tmp_path / "ablate"
    argv = [
        "ablate",
        "--data",
        str(tiny_prepared),
        "--config",
        str(recipe),
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    argv += ["--variants", "rgb", "event"]
    trained: list[tuple[str, bool]] = []
    real_train = command.train_run

    def counting(cfg):
        trained.append((cfg.modality, cfg.resume))
        return real_train(cfg)

    monkeypatch.setattr(command, "train_run", counting)
    assert main(argv) == 0
    assert trained == [("rgb", False), ("event", False)]
    table = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text())))
    assert [r["variant"] for r in table] == ["rgb", "event", "late fusion (rgb + event)"]
    conditions = json.loads((out / "rgb" / "seed0" / "eval" / "metrics.json").read_text())["conditions"]
    assert conditions and all(f"{c}/AP50_mean" in table[0] for c in conditions)  # the sample's scenarios
    late = json.loads((out / "late_rgb+event" / "seed0" / "result.json").read_text())
    assert (
        late["metrics"]["images"]
        == json.loads((out / "rgb" / "seed0" / "result.json").read_text())["metrics"]["images"]
    )
    first = (out / "ablation.md").read_text()

    # a second run trains nothing and writes the same table
    result = out / "rgb" / "seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    assert main(argv) == 0
    assert trained == [("rgb", False), ("event", False)] and result.stat().st_mtime_ns == stamp
    assert (out / "ablation.md").read_text() == first

    # a run interrupted after its last checkpoint resumes from it (no epoch left) and is evaluated again
    (out / "event" / "seed0" / "result.json").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert trained[2:] == [("event", True)]
    assert (
        "continuing at epoch 2" in capsys.readouterr().out
        or (out / "event" / "seed0" / "result.json").is_file()
    )

    # another recipe in the same folder is refused before any work
    assert main([*argv[:6], "2", *argv[7:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another recipe" in err[0] and "unfreeze_epoch 1 -> 2" in err[0]


def test_the_shipped_fusion_ablation_files_plan_every_scenario_in_test() -> None:
    from fredfusion.data.splits import read_split_file
    from fredfusion.data.synth import plan_scenarios, scenario_names

    root = Path(__file__).resolve().parents[1] / "configs"
    variants, seeds, recipe = ablation.read_variants_file(root / "ablation_fusion.yaml")
    assert seeds == [0, 1, 2] and variants[:2] == [
        ablation.Variant("rgb", "rgb"),
        ablation.Variant("event", "event"),
    ]
    # the recipe switches the fusion training options off; the last variant is what dual trains by default
    options = (
        "pairs",
        "modality_dropout",
        "modality_dropout_region",
        "modality_dropout_side",
        "modality_dropout_ramp",
    )
    off = resolved(apply_overrides(TrainConfig(modality="dual"), recipe).to_dict())
    assert (off["pairs"], off["modality_dropout"]) == ("required", 0.0)
    last = variants[-1]
    planned = apply_overrides(TrainConfig(), {**recipe, "modality": last.modality, **dict(last.options)})
    default = TrainConfig(modality="dual", fusion=last.fusion)
    assert {k: resolved(planned.to_dict())[k] for k in options} == {
        k: resolved(default.to_dict())[k] for k in options
    }
    split = read_split_file(root / "ablation_split.txt")
    scenarios = plan_scenarios(14, seed=15)  # the sample the split file names
    assert sorted(split) == list(range(14))
    in_test = {part for i, s in split.items() if s == "test" for part in scenarios[i].split("+")}
    in_train = {scenarios[i].split("+")[0] for i, s in split.items() if s == "train"}
    assert in_test == set(scenario_names()) and in_train == set(scenario_names()) - {"edge", "small"}


def test_a_saved_run_differs_only_in_what_changes_training() -> None:
    off = {"modality_dropout": 0.0, "modality_dropout_region": "image", "modality_dropout_side": "both"}
    planned = {**TrainConfig(modality="dual").to_dict(), **off}
    unused = {**planned, "modality_dropout_region": "box_parts", "modality_dropout_side": "event"}
    assert ablation._differences(unused, planned) == []  # no dropout: its region, side, ramp change nothing
    assert ablation._differences({**unused, "modality_dropout_ramp": 0.5}, planned) == []
    assert ablation._differences({**planned, "device": "cuda", "num_workers": 8}, planned) == []
    dropped = {**planned, "modality_dropout": 0.3}
    assert ablation._differences({**unused, "modality_dropout": 0.3}, dropped) == [
        "modality_dropout_region 'box_parts' -> 'image'",
        "modality_dropout_side 'event' -> 'both'",
    ]
    # auto resolves by modality: a dual run's auto share is 0.3, its auto pairs any
    default = TrainConfig(modality="dual").to_dict()
    explicit = {**default, "pairs": "any", "modality_dropout": 0.3}
    assert ablation._differences(default, explicit) == []
    # a run saved before the ramp existed dropped from the first step
    old = {k: v for k, v in default.items() if k != "modality_dropout_ramp"}
    assert ablation._differences(old, default) == ["modality_dropout_ramp 0.0 -> 0.5"]
