import json
import shutil

import pytest
import torch

from conftest import run_module
from mnist_add import checkpoint
from mnist_add.checkpoint import CheckpointError
from mnist_add.train import train
from mnist_add.tracking import read_metrics

EXACT = ("trainer.epochs=2", "trainer.save_every_steps=4", "trainer.keep_checkpoints=100")


def weights(run_dir, name):
    return checkpoint.load(f"{run_dir}/checkpoints/{name}")[checkpoint.MODEL]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "time_s")} for r in records]


def test_debug_run_writes_config_metrics_checkpoints_and_summary(make_cfg, tmp_path):
    summary = train(make_cfg())
    run = tmp_path / "run"
    assert summary["status"] == "completed" and summary["step"] == 16
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "best.pt").is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12, 16]
    evaluation = [r for r in records if "val/acc_sum" in r]
    assert len(evaluation) == 1 and evaluation[0]["val/acc_sum"] == summary["test"]["acc_sum"]
    assert {"val/loss_digit", "val/loss_sum", "val/acc_digit", "val/acc_both",
            "val/acc_sum_given_digit"} <= set(evaluation[0])


def test_resuming_from_a_mid_epoch_checkpoint_is_bitwise_exact(make_cfg, tmp_path):
    whole = make_cfg(*EXACT, run_dir=tmp_path / "whole")
    expected = train(whole)
    # A run that stopped right after its mid-epoch checkpoint at step 12 (of 16 in epoch 1).
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "whole/checkpoints/step-00000012.pt", cut / "checkpoints")
    resumed = train(make_cfg(*EXACT, run_dir=cut))
    assert resumed["resumed_from"].endswith("step-00000012.pt")
    assert resumed["test"] == expected["test"] and resumed["fingerprint"] == expected["fingerprint"]
    for name, tensor in weights(tmp_path / "whole", "step-00000032.pt").items():
        assert torch.equal(tensor, weights(cut, "step-00000032.pt")[name]), name
    after = [r for r in read_metrics(tmp_path / "whole") if r["step"] > 12]
    assert without_timing(read_metrics(cut)) == without_timing(after)


def test_a_resumed_run_rewrites_no_metric_twice(make_cfg, tmp_path):
    cfg = make_cfg(*EXACT)
    train(cfg)
    run = tmp_path / "run"
    for path in checkpoint.Checkpointer(run / "checkpoints", 100, False).step_paths()[:4]:
        path.unlink()  # as if killed after step 16's checkpoint, with metrics up to 32 on disk
    train(cfg)
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == sorted(set(steps)) == list(range(4, 33, 4))


def test_resume_auto_on_a_finished_run_does_not_train_again(make_cfg):
    cfg = make_cfg()
    first = train(cfg)
    again = train(cfg)
    assert again["step"] == first["step"] and again["test"] == first["test"]


def test_resume_never_refuses_to_mix_with_existing_checkpoints(make_cfg):
    train(make_cfg())
    with pytest.raises(CheckpointError, match="trainer.resume=never"):
        train(make_cfg("trainer.resume=never"))


def test_a_checkpoint_of_another_architecture_is_reported(make_cfg, tmp_path):
    train(make_cfg())
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(make_cfg("model.arch=seed", f"run.dir={tmp_path / 'other'}",
                       f"trainer.resume={tmp_path / 'run/checkpoints/best.pt'}"))


def test_resuming_with_another_batch_size_is_refused(make_cfg):
    train(make_cfg("trainer.max_steps=8"))
    with pytest.raises(CheckpointError, match="trainer.batch_size=32"):
        train(make_cfg("trainer.batch_size=64"))


def test_cli_trains_the_debug_config(data_root, tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert "done: test digit" in result.stderr


def test_cli_reports_a_config_typo_in_one_line(tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", "trainer.epoch=1", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "did you mean trainer.epochs" in result.stderr and "Traceback" not in result.stderr


def test_cli_reports_missing_data_with_the_fix(tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={tmp_path}", "data.download=false",
                        f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"MNIST not found in {tmp_path}/MNIST/raw" in result.stderr


def test_a_file_that_is_not_a_training_checkpoint_is_reported(make_cfg, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(make_cfg(f"trainer.resume={foreign}"))
