import pytest

from mnist_add.config import Arch, ConfigError, load_config


def test_yaml_files_then_command_line_override_the_defaults():
    cfg = load_config(["seed-joint"], ["trainer.epochs=2"])
    assert cfg.model.arch == Arch.seed and cfg.model.heads.value == "joint"
    assert cfg.trainer.epochs == 2 and cfg.trainer.seed == 0


def test_config_is_read_only():
    cfg = load_config([], [])
    with pytest.raises(Exception):
        cfg.trainer.epochs = 3


def test_a_typo_in_a_key_names_it_and_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"'epoch'.*did you mean trainer\.epochs"):
        load_config([], ["trainer.epoch=3"])


def test_a_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'abc'.*trainer\.epochs"):
        load_config([], ["trainer.epochs=abc"])


def test_an_invalid_choice_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"expected one of \[seed, convnet\].*model\.arch"):
        load_config([], ["model.arch=resnet"])


def test_mse_needs_the_regression_head():
    with pytest.raises(ConfigError, match="model.sum_head=regression"):
        load_config([], ["loss.sum=mse"])
    assert load_config([], ["loss.sum=mse", "model.sum_head=regression", "model.addend_dim=20"]).loss.sum.value == "mse"


def test_values_out_of_range_are_refused():
    with pytest.raises(ConfigError, match="trainer.batch_size must be at least 1"):
        load_config([], ["trainer.batch_size=0"])


def test_a_missing_config_file_says_where_it_looked():
    with pytest.raises(ConfigError, match="not found.*configs"):
        load_config(["no-such-config"])


def test_a_hidden_addend_needs_the_structured_head():
    with pytest.raises(ConfigError, match="addend_dim=0"):
        load_config([], ["model.sum_head=free"])
