import pytest
import torch
import torch.nn.functional as F

from mnist_add.config import load_config
from mnist_add.model import OneHot, build_model
from mnist_add.train import train

VARIANTS = [
    ["model.arch=seed", "model.heads=joint", "model.sum_head=free", "model.addend_dim=20"],
    ["model.arch=seed", "model.heads=separate", "model.sum_head=free", "model.addend_dim=20"],
    ["model.arch=seed", "model.sum_head=regression", "loss.sum=mse", "model.addend_dim=20"],
    ["model.arch=convnet", "model.sum_head=structured"],
    ["model.arch=convnet", "model.heads=joint", "model.sum_head=free", "model.addend_dim=20"],
]


def test_one_hot_turns_ids_into_rows():
    rows = OneHot(10)(torch.tensor([0, 9, 3]))
    assert rows.shape == (3, 10) and rows.dtype == torch.float32
    assert rows.argmax(1).tolist() == [0, 9, 3] and rows.sum().item() == 3


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(v.split("=")[1] for v in o))
def test_every_variant_maps_images_and_addends_to_digit_and_sum_scores(overrides):
    model = build_model(load_config([], overrides).model).eval()
    digit_logits, sum_logits = model(torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 9, 5]))
    assert digit_logits.shape == (4, 10) and sum_logits.shape == (4, 19)


def test_seed_network_has_the_classroom_shapes():
    model = build_model(load_config(["seed-joint"]).model)
    assert model.mlp[0].in_features == 212 and model.mlp[2].out_features == 100
    assert model.head.out_features == 29


def test_structured_sum_is_the_digit_distribution_shifted_by_the_addend():
    model = build_model(load_config([], []).model).eval()
    addends = torch.tensor([0, 4, 9, 2])
    digit_logits, sum_logits = model(torch.randn(4, 1, 28, 28), addends)
    digit_p, sum_p = F.softmax(digit_logits, 1), F.softmax(sum_logits, 1)
    for row, addend in enumerate(addends.tolist()):
        assert torch.allclose(sum_p[row, addend:addend + 10], digit_p[row], atol=1e-6)
        assert sum_p[row].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(sum_logits.argmax(1), digit_logits.argmax(1) + addends)


def test_regression_scores_peak_at_the_rounded_sum():
    model = build_model(load_config([], ["model.sum_head=regression", "loss.sum=mse", "model.addend_dim=20"]).model)
    extra = torch.tensor([[3.4], [12.6], [-2.0], [30.0]])
    scores = model.sum_output(torch.zeros(4, 10), extra, torch.zeros(4, dtype=torch.long))
    assert scores.argmax(1).tolist() == [3, 13, 0, 18]
    assert -scores[0, 5].item() == pytest.approx((3.4 - 5) ** 2)  # -score[target] is the squared error


@pytest.mark.parametrize("heads", ["joint", "separate"])
def test_seed_approaches_learn_on_a_small_subset(make_cfg, heads):
    cfg = make_cfg("model.arch=seed", f"model.heads={heads}", "model.sum_head=free", "model.channels_last=false",
                   "model.addend_dim=20", "data.augment=false", "data.train_samples=3000", "data.test_samples=1000", "trainer.epochs=3",
                   "trainer.log_every_steps=10", "optim.lr=0.005")
    summary = train(cfg)
    records = [r for r in _metrics(cfg.run.dir) if "train/loss" in r]
    assert records[-1]["train/loss"] < 0.5 * records[0]["train/loss"]
    assert summary["test"]["acc_digit"] > 0.8
    assert summary["test"]["acc_sum"] > 0.2  # chance is about 1/19; the classroom version stayed near it


def _metrics(run_dir):
    from mnist_add.tracking import read_metrics
    return read_metrics(run_dir)
