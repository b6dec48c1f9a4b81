import json

import pytest
import torch

from conftest import run_module
from mnist_add.evaluate import load_model
from mnist_add.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    from mnist_add.config import load_config
    run = tmp_path_factory.mktemp("trained")
    summary = train(load_config(["debug"], [f"data.root={data_root}", f"run.dir={run}", "data.test_samples=0",
                                            "trainer.num_threads=1"]))
    return run, summary


def test_load_model_returns_an_eval_model_and_its_config(trained):
    run, _ = trained
    model, cfg = load_model(f"{run}/checkpoints/best.pt")
    assert not model.training and cfg.trainer.batch_size == 32
    digit_logits, sum_logits = model(torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 9]))
    assert digit_logits.shape == (3, 10) and sum_logits.shape == (3, 19)


def test_cli_reproduces_the_training_summary(trained, data_root):
    run, summary = trained
    result = run_module("mnist_add.evaluate", "--checkpoint", f"{run}/checkpoints/best.pt", "--json",
                        "--data-root", data_root)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["pairs"] == 10_000
    for key, value in summary["test"].items():  # counts are exact; loss sums differ in float rounding
        assert metrics[key] == (value if key.startswith("acc") else pytest.approx(value, rel=1e-5)), key


def test_exhaustive_scores_every_image_with_all_ten_addends(trained, data_root):
    run, _ = trained
    result = run_module("mnist_add.evaluate", "--checkpoint", f"{run}/checkpoints/best.pt", "--json",
                        "--exhaustive", "--data-root", data_root)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["pairs"] == 100_000 and 0 < metrics["acc_sum"] <= 1


def test_a_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_module("mnist_add.evaluate", "--checkpoint", str(bad))
    assert result.returncode == 1
    assert "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr
