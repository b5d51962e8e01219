from pathlib import Path

import pytest
import yaml

from fredfusion.cli import build_parser
from fredfusion.commands.train import config_from_args
from fredfusion.config import ConfigError, TrainConfig, apply_overrides, load_config, save_config


def test_seed_names_map_to_fields(tmp_path: Path) -> None:
    path = tmp_path / "seed.yaml"
    path.write_text(
        "phi: m\nFreeze_batch_size: 32\nUnfreeze_batch_size: 12\nFreeze_Epoch: 5\nUnFreeze_Epoch: 40\n"
        "mosaic_prob: 0.25\nfp16: false\ninput_shape: [384, 640]\nInit_lr: 0.02\nMin_lr: 0.0002\n"
        "eval_flag: false\noptimizer_type: adamw\n"
    )
    cfg = load_config(path)
    assert (cfg.model, cfg.freeze_batch_size, cfg.unfreeze_batch_size) == ("m", 32, 12)
    assert (cfg.freeze_epoch, cfg.unfreeze_epoch, cfg.mosaic_prob, cfg.fp16) == (5, 40, 0.25, False)
    assert cfg.min_lr_ratio == pytest.approx(0.01)
    assert cfg.no_eval_map is True and cfg.optimizer == "adamw"


def test_unknown_key_suggests_and_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("mosaic_prb: 0.5\n")
    with pytest.raises(ConfigError, match=r"mosaic_prb.*did you mean 'mosaic_prob'.*bad.yaml"):
        load_config(path)


def test_wrong_types_and_choices_name_the_key() -> None:
    with pytest.raises(ConfigError, match="freeze_batch_size"):
        apply_overrides(TrainConfig(), {"freeze_batch_size": "lots"})
    with pytest.raises(ConfigError, match="modality"):
        apply_overrides(TrainConfig(), {"modality": "thermal"})
    with pytest.raises(ConfigError, match="input_shape"):
        apply_overrides(TrainConfig(), {"input_shape": [360, 640]})


def test_yaml_is_parsed_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cli_flags_override_file_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("modality: rgb\nUnfreeze_batch_size: 4\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(path),
            "--Unfreeze_batch_size",
            "6",
            "--no_eval_map",
            "--fp16",
            "false",
            "--quick_test",
            "--input_shape",
            "192",
            "320",
            "--phi",
            "n",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.modality, cfg.unfreeze_batch_size, cfg.no_eval_map, cfg.fp16) == ("rgb", 6, True, False)
    assert cfg.quick_test and cfg.input_shape == [192, 320] and cfg.model == "n"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_freeze_training_means_freeze_phase_only() -> None:
    cfg = apply_overrides(TrainConfig(), {"freeze_training": True, "Freeze_Epoch": 3})
    from fredfusion.engine.trainer import Trainer

    trainer = Trainer(cfg)
    assert trainer._phase(0) == (True, cfg.freeze_batch_size)
    assert trainer._phase(3) == (False, cfg.unfreeze_batch_size)


def test_example_config_in_the_repo_loads() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "fred_dual_s.yaml")
    assert (cfg.modality, cfg.model, cfg.freeze_epoch, cfg.unfreeze_epoch) == ("dual", "s", 50, 300)
    assert cfg.input_shape == [384, 640] and cfg.min_lr_ratio == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"data": None}, "data"),
        ({"input_shape": [384, 640.5]}, "input_shape"),
        ({"input_shape": {"h": 384}}, "input_shape"),
        ({"batch_size": "many"}, "batch_size"),
        ({"imgsz": 640.5}, "imgsz"),
        ({"Min_lr": "low"}, "Min_lr"),
        ({"eval_flag": "maybe"}, "eval_flag"),
        ({"fp16": 3}, "fp16"),
        ({"init_lr": None}, "init_lr"),
        ({"init_lr": 0}, "init_lr"),
        ({"momentum": 1.5}, "momentum"),
        ({"num_workers": -1}, "num_workers"),
        ({"max_bad_steps": 0}, "max_bad_steps"),
        ({"max_bad_steps": 2.5}, "max_bad_steps"),
        ({"max_bad_frame_share": 1.5}, "max_bad_frame_share"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"modality_dropout": 1.5}, "modality_dropout"),
        ({"modality_dropout": "lots"}, "modality_dropout"),
        ({"modality_dropout_ramp": -0.1}, "modality_dropout_ramp"),
    ],
)
def test_wrong_types_and_values_name_the_key_and_file(tmp_path: Path, values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        apply_overrides(TrainConfig(), values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=rf"^{key}: .* in {path}$"):
        load_config(path)


def test_fault_settings_load_and_save_errors_name_the_file(tmp_path: Path) -> None:
    assert (TrainConfig().max_bad_steps, TrainConfig().max_bad_frame_share) == (10, 0.01)
    path = tmp_path / "c.yaml"
    path.write_text("max_bad_steps: 3\nmax_bad_frame_share: 0.2\n")
    cfg = load_config(path)
    assert (cfg.max_bad_steps, cfg.max_bad_frame_share) == (3, 0.2)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"file/run/config\.yaml: cannot write config"):
        save_config(cfg, blocker / "run" / "config.yaml")


def test_modality_dropout_takes_a_share_or_auto() -> None:
    from fredfusion.config import AUTO_SHARE, validate

    assert apply_overrides(TrainConfig(), {"modality_dropout": "auto"}).modality_dropout == AUTO_SHARE
    assert apply_overrides(TrainConfig(), {"modality_dropout": "0.25"}).modality_dropout == 0.25
    with pytest.raises(ConfigError, match=r"^modality_dropout: must be within \[0, 1\] or auto, got 2$"):
        validate(TrainConfig(modality_dropout=2.0))  # a config built in code is checked too
