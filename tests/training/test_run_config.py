"""Settings: YAML keys = flags, unknown keys and wrong types named, output dirs never silently overwritten."""
import pytest

from turbotune.errors import ConfigError
from turbotune.training.config import TrainConfig, build_config


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


def test_yaml_numbers_in_any_notation(tmp_path):
    """PyYAML (YAML 1.1) leaves `1e-4` and `1e3` as strings; they are numbers all the same."""
    f = tmp_path / "run.yaml"
    f.write_text("lr: 1e-4\nweight_decay: 1.0e-2\nmax_steps: 1e3\nbatch_size: '8'\nepochs: 2\n")
    cfg = build_config(str(f))
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 0.01
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.batch_size == 8 and cfg.epochs == 2.0 and isinstance(cfg.epochs, float)


@pytest.mark.parametrize("text,message", [
    ("lr: two\n", "config key 'lr' must be float, got str ('two')"),
    ("batch_size: 2.5\n", "config key 'batch_size' must be int, got float (2.5)"),
    ("max_steps: '1e-3'\n", "config key 'max_steps' must be int or null, got str ('1e-3')"),
    ("packing: '1'\n", "config key 'packing' must be bool or null, got str ('1')"),  # bools stay strict
    ("overwrite: 0\n", "config key 'overwrite' must be bool, got int (0)"),
])
def test_non_numbers_still_rejected(tmp_path, text, message):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        build_config(str(f))
    assert str(err.value) == f"{f}: {message}"


def test_every_unknown_key_and_wrong_type_reported_at_once(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("learning_rate: 0.001\nepocs: 2\nbatch_size: two\nfoo: 1\nload_in_4bit: yes please\n")
    with pytest.raises(ConfigError) as err:
        build_config(str(f))
    assert str(err.value) == (
        f"{f}: unknown keys 'learning_rate' (did you mean lr?), 'epocs' (did you mean epochs?), 'foo'; "
        "config key 'batch_size' must be int, got str ('two'); "
        "config key 'load_in_4bit' must be bool, got str ('yes please')")


@pytest.mark.parametrize("key,field", [
    ("learning_rate", "lr"), ("num_train_epochs", "epochs"), ("per_device_train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum"), ("r", "lora_r"), ("lr_scheduler_type", "lr_scheduler"),
    ("max_length", "max_seq_length"), ("use_gradient_checkpointing", "gradient_checkpointing"),
    ("model_name", "model"), ("max-seq-len", "max_seq_length"), ("lora_alfa", "lora_alpha"),
])
def test_unknown_key_suggests_our_spelling(key, field):
    from turbotune.training.config import ALIASES, field_names, suggest_field
    assert suggest_field(key) == field
    assert set(ALIASES.values()) <= set(field_names())


def test_max_steps_must_be_positive(tmp_path):
    """0 and -1 used to mean "train by epochs" silently; leaving max_steps out (None) is how to say that now."""
    from turbotune.training.config import check_values

    assert TrainConfig().max_steps is None
    message = "'max_steps' must be positive, got 0; to train by epochs leave it out and pass --epochs"
    f = tmp_path / "run.yaml"
    f.write_text("max_steps: 0\n")
    with pytest.raises(ConfigError) as err:
        build_config(str(f))
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="'max_steps' must be positive, got -1"):
        build_config(None, {"max_steps": -1})
    with pytest.raises(ConfigError, match="'max_steps' must be positive"):
        check_values(TrainConfig(max_steps=0))
    f.write_text("max_steps: null\nepochs: 2\n")
    assert build_config(str(f)).max_steps is None
    with pytest.raises(ConfigError, match="'epochs' must be positive"):
        build_config(None, {"epochs": 0})


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("offload", "offload"), (True, True), (False, False),
                                            ("true", True), ("none", False)])
def test_yaml_gradient_checkpointing_modes(tmp_path, value, expected):
    import yaml
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"gradient_checkpointing": value}))
    assert build_config(str(path)).gradient_checkpointing == expected


def test_gradient_checkpointing_bad_mode(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("gradient_checkpointing: sometimes\n")
    with pytest.raises(ConfigError, match="true, false, offload or auto"):
        build_config(str(path))
