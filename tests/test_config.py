import os
import re

import pytest

from omegaconf.errors import OmegaConfBaseException

from mnist_add.config import Activation, Arch, ConfigError, load_config, to_dict, upgraded


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


@pytest.mark.parametrize("override, meant", [("epochs=3", "trainer.epochs"), ("lr=0.1", "optim.lr"),
                                             ("epoch=3", "trainer.epochs")])
def test_a_key_without_its_section_names_the_section_it_belongs_to(override, meant):
    with pytest.raises(ConfigError, match=rf"did you mean {re.escape(meant)}\?"):
        load_config([], [override])


def test_a_key_no_section_has_suggests_nothing():
    with pytest.raises(ConfigError) as err:
        load_config([], ["zzz=1"])
    assert "did you mean" not in str(err.value)


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


def test_the_batch_size_must_be_positive():
    with pytest.raises(ConfigError, match="trainer.batch_size must be at least 1"):
        load_config([], ["trainer.batch_size=0"])


def test_a_missing_config_file_says_where_it_looked():
    with pytest.raises(ConfigError, match="not found.*configs"):
        load_config(["no-such-config"])


def test_a_hidden_addend_needs_the_structured_head():
    with pytest.raises(ConfigError, match="addend_dim=0"):
        load_config([], ["model.sum_head=free"])


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr must be greater than 0, got -1.0"),
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("model.width=0", "model.width must be at least 1, got 0"),
    ("trainer.log_every_steps=0", "trainer.log_every_steps must be at least 1, got 0"),
    ("optim.warmup_fraction=1.5", "optim.warmup_fraction must be less than 1, got 1.5"),
    ("loss.label_smoothing=2", "loss.label_smoothing must be less than 1, got 2.0"),
    ("trainer.num_threads=-1", "trainer.num_threads must be at least 0, got -1"),
    ("data.train_samples=-5", "data.train_samples must be at least 0, got -5"),
    ("data.train_samples=60001", "data.train_samples must be at most 60000, got 60001"),
])
def test_every_field_out_of_its_range_is_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([], [override])


def test_a_config_file_with_invalid_yaml_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  epochs: 3\n  batch_size: [64\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad))} is not valid YAML: .* at line 4"):
        load_config([str(bad)])


def test_a_yaml_alias_is_refused_naming_the_file(tmp_path):
    # Harmless here, but a few nested aliases expand a file of 400 bytes into billions of values (test_fuzz runs one).
    aliased = tmp_path / "aliased.yaml"
    aliased.write_text("run:\n  dir: &where runs/x\nwandb:\n  dir: *where\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(aliased))} uses the YAML alias \*where"):
        load_config([str(aliased)])


def test_a_number_too_long_to_read_names_its_key_in_one_short_line(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_config([], ["trainer.epochs=" + "9" * 100_000])
    assert str(refused.value).startswith("the value of 'trainer.epochs' holds a number too long to read")
    assert len(str(refused.value)) < 200
    (tmp_path / "long.yaml").write_text("trainer:\n  seed: " + "9" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(tmp_path))}/long.yaml holds a number too long"):
        load_config([str(tmp_path / "long.yaml")])


@pytest.mark.parametrize("kind, made_by, message", [
    ("a directory", lambda path: path.mkdir(), "is a directory"),
    ("a FIFO", os.mkfifo, "is a FIFO"),  # never opened: that would wait for a writer
    ("a device", lambda path: path.symlink_to("/dev/zero"), "is a device"),  # never read: it never ends
    ("a dangling link", lambda path: path.symlink_to("nowhere.yaml"), "is a dangling link (to nowhere.yaml)"),
])
def test_a_config_path_that_is_no_file_says_what_it_is(kind, made_by, message, tmp_path):
    made_by(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path}/config.yaml {message}")):
        load_config([str(tmp_path / "config.yaml")])


@pytest.mark.parametrize("override", ["run.dir=runs/a\nb", "data.root=/data\r", "wandb.name=\x1b[31mred"])
def test_a_control_character_in_a_value_is_refused_by_key(override):
    # YAML would fold the line break of run.dir=runs/a<newline>b into a space: the run would land in 'runs/a b'.
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=re.escape(f"the value of {key!r} holds the control character")):
        load_config([], [override])


def test_a_control_character_in_a_config_file_is_refused_by_key(tmp_path):
    (tmp_path / "quoted.yaml").write_text('run:\n  dir: "runs/a\\nb"\n')
    with pytest.raises(ConfigError, match=re.escape("run.dir holds the control character '\\n'")):
        load_config([str(tmp_path / "quoted.yaml")])


def test_an_unset_environment_variable_names_the_key_that_uses_it():
    with pytest.raises(ConfigError, match=r"Environment variable 'NO_SUCH_VAR_32' not found.* \(at data.root\)"):
        load_config([], ["data.root=${oc.env:NO_SUCH_VAR_32}"])


def test_a_wrong_type_in_a_config_file_names_the_file_and_the_key(tmp_path):
    (tmp_path / "typed.yaml").write_text("trainer:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=rf"trainer.epochs.* in config file {re.escape(str(tmp_path))}/typed.yaml"):
        load_config([str(tmp_path / "typed.yaml")])


def test_yaml_nested_too_deep_is_one_line(tmp_path):
    (tmp_path / "deep.yaml").write_text("run: " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="deep.yaml nests lists or mappings more than 32 deep"):
        load_config([str(tmp_path / "deep.yaml")])


def test_the_launcher_sections_are_range_checked_too():
    from job.submit import SubmitConfig
    with pytest.raises(ConfigError, match="job.nodes must be at least 1, got 0"):
        load_config([], ["job.nodes=0"], schema=SubmitConfig)


def test_the_data_root_comes_from_the_environment_as_for_the_tests(monkeypatch):
    monkeypatch.delenv("MNIST_ADD_DATA_ROOT", raising=False)
    assert load_config([], []).data.root == "data"
    monkeypatch.setenv("MNIST_ADD_DATA_ROOT", "/mnt/mnist")
    assert load_config([], []).data.root == "/mnt/mnist"
    assert load_config([], ["data.root=/elsewhere"]).data.root == "/elsewhere"  # the command line still wins


def test_a_config_from_before_a_key_existed_reads_as_the_code_then_computed():
    old = to_dict(load_config([], []))
    for key in "hidden", "dropout", "pool_first", "activation":  # written before these existed
        del old["model"][key]
    del old["data"]["val_samples"], old["trainer"]["test_every_epoch"]
    cfg, today = upgraded(old), load_config([], [])
    assert cfg.data.val_samples == 0 and today.data.val_samples == 5000  # trained on all 60k, as runs did then
    then = cfg.model.hidden, cfg.model.pool_first, cfg.model.activation
    assert (*then, cfg.model.dropout) == (128, False, Activation.relu, 0.0)  # as it computed then
    assert all(a != b for a, b in zip(then, (today.model.hidden, today.model.pool_first, today.model.activation)))
    assert upgraded(to_dict(load_config([], ["model.hidden=32"]))).model.hidden == 32  # what it says wins
    with pytest.raises(OmegaConfBaseException):
        upgraded({**old, "model": {**old["model"], "gone": 1}})


def test_default_yaml_spells_out_the_schema_defaults_and_fast_differs_in_its_network_smoothing_and_length():
    schema, default = to_dict(load_config([], [])), to_dict(load_config(["default"], []))
    assert default == schema
    fast = to_dict(load_config(["fast"], []))
    assert {(s, k) for s in fast for k in fast[s] if fast[s][k] != schema[s][k]} == \
        {("run", "dir"), ("model", "hidden"), ("model", "pool_first"), ("model", "activation"),
         ("loss", "label_smoothing"), ("trainer", "epochs")}
