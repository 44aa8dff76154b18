"""Settings: YAML keys = flags, unknown keys and wrong types named, output dirs never silently overwritten."""
import pytest

from turbotune.errors import ConfigError
from turbotune.run_config import TrainConfig, build_config


def test_yaml_and_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("max-steps: 7\nlr: 1\nlora_r: 8\ntarget_modules: [q_proj, v_proj]\n")
    cfg = build_config(str(f), {"lora_r": 4})
    assert cfg.max_steps == 7 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.lora_r == 4  # the flag wins
    assert cfg.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("learning_rate: 0.001\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        build_config(str(f))


def test_wrong_type_is_named(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("batch_size: two\n")
    with pytest.raises(ConfigError, match="'batch_size' must be int"):
        build_config(str(f))
    f.write_text("load_in_4bit: 1\n")
    with pytest.raises(ConfigError, match="'load_in_4bit' must be bool"):
        build_config(str(f))


def test_bad_values():
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(None, {"batch_size": 0})
    with pytest.raises(ConfigError, match="lr_scheduler"):
        build_config(None, {"lr_scheduler": "step"})


def test_not_a_mapping(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(str(f))


def test_identity_fields_exist():
    assert set(TrainConfig.IDENTITY) <= set(TrainConfig.__dataclass_fields__)
