import pytest
import torch
import torch.nn.functional as F

from torch import nn

from mnist_add.config import SumHead, SumLoss, load_config
from mnist_add.model import Criterion, OneHot, SumOutput, build_model, convnet_features, seed_features, task_losses
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
    assert OneHot(10)(torch.tensor([2, 0])).shape == (2, 10)  # ten columns, whatever the largest id


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(v.split("=")[1] for v in o))
def test_every_variant_maps_images_and_addends_to_digit_and_sum_scores(overrides):
    model = build_model(load_config([], overrides).model).eval()
    digit_logits, sum_logits = model(torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 9, 5]))
    assert digit_logits.shape == (4, 10) and sum_logits.shape == (4, 19)


def test_seed_network_has_the_classroom_shapes():
    model = build_model(load_config(["seed-joint"]).model)
    assert [(layer.in_features, layer.out_features) for layer in model.mlp[::2]] == [(212, 212), (212, 100)]
    assert model.head.out_features == 29


@pytest.mark.parametrize("config, hidden, parameters, pool_first",
                         [([], 64, 167_850, True), (["fast"], 128, 242_282, False)])
def test_the_recipes_networks_have_one_hidden_layer_and_only_a_digit_head(config, hidden, parameters, pool_first):
    model = build_model(load_config(config, []).model)  # structured sum: nothing to learn beyond the digit
    assert isinstance(model.features[1], nn.MaxPool2d) == pool_first
    assert [(layer.in_features, layer.out_features) for layer in model.mlp[::2]] == [(36 * 32, hidden)]
    assert sum(p.numel() for p in model.parameters()) == parameters  # the default within 200k
    assert model.addend is None and model.head.out_features == 10 and not hasattr(model, "sum_head")
    assert not any("sums" in name for name in model.state_dict())  # a constant, not saved in checkpoints


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_is_the_weights_memory_format_as_configured(channels_last):
    model = build_model(load_config([], [f"model.channels_last={channels_last}"]).model)
    weight = model.features[4].weight  # the second convolution's: [64, 32, 3, 3]
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert weight.is_contiguous() != channels_last


def test_seed_features_are_the_classroom_convolutions():
    features, num_features = seed_features()
    assert [type(layer) for layer in features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2 + [nn.Flatten]
    assert [(conv.in_channels, conv.out_channels, conv.kernel_size) for conv in features[::3][:2]] == \
        [(1, 6, (5, 5)), (6, 12, (5, 5))]
    assert features(torch.zeros(2, 1, 28, 28)).shape == (2, num_features) == (2, 192)


@pytest.mark.parametrize("pool_first", [False, True])
def test_convnet_features_are_three_same_size_conv_bn_relu_pool_blocks(pool_first):
    features, num_features = convnet_features(width=4, pool_first=pool_first)
    blocks = [list(features[i:i + 4]) for i in range(0, 12, 4)]
    for block, (cin, cout, kernel) in zip(blocks, [(1, 4, 5), (4, 8, 3), (8, 16, 3)]):
        conv, pool, norm, relu = block if pool_first else (block[0], block[3], block[1], block[2])
        assert (type(norm), type(relu), type(pool)) == (nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)
        # "Same" padding, and no bias: BatchNorm's shift would cancel it.
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == \
            (cin, cout, (kernel, kernel), (kernel // 2, kernel // 2))
        assert conv.bias is None
    assert features(torch.zeros(2, 1, 28, 28)).shape == (2, num_features) == (2, 16 * 3 * 3)


@pytest.mark.parametrize("activation, kind", [("relu", nn.ReLU), ("silu", nn.SiLU)])
def test_the_configured_activation_follows_every_batchnorm_and_the_hidden_layer(activation, kind):
    def activations(config: list[str]) -> list[type]:
        model = build_model(load_config(config, [f"model.activation={activation}"]).model)
        return [type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.SiLU))]
    assert activations([]) == [kind] * 4  # three conv blocks, then the hidden layer
    assert set(activations(["seed-joint"])) == {nn.ReLU}  # the classroom network stays exactly as it was


def test_pooling_first_computes_the_same_features_when_every_batchnorm_scale_is_positive():
    torch.manual_seed(0)
    (after, _), (first, _) = convnet_features(4, pool_first=False), convnet_features(4, pool_first=True)
    for layer in after:
        if isinstance(layer, nn.BatchNorm2d):  # trained-looking statistics, positive scales
            layer.running_mean.normal_(), layer.running_var.uniform_(0.5, 2), layer.bias.data.normal_()
            layer.weight.data.uniform_(0.5, 2)
    # Same layers, another order: each block's (conv, norm, relu, pool) is (conv, pool, norm, relu).
    first.load_state_dict({_pool_first_name(name): value for name, value in after.state_dict().items()})
    images = torch.randn(8, 1, 28, 28)
    assert torch.equal(after.eval()(images), first.eval()(images))
    after[1].weight.data[0] = first[2].weight.data[0] = -1.0  # pooling after it now takes the minimum
    assert not torch.equal(after(images), first(images))


@pytest.mark.parametrize("pool_first", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_only_the_overlapping_last_pool_reads_the_last_row_and_column_of_its_map(pool_first, overlap):
    features, _ = convnet_features(4, pool_first, overlap_last_pool=overlap)
    last_pool, seen = features[9 if pool_first else 11], {}
    last_pool.register_forward_hook(lambda module, inputs, output: seen.update(map=inputs[0]))
    out = features(torch.randn(8, 1, 28, 28))
    grad, = torch.autograd.grad(out.sum(), seen["map"])  # nonzero where a window's maximum was read
    assert isinstance(last_pool, nn.MaxPool2d) and grad.shape[-2:] == (7, 7) and out.shape[1] == 16 * 3 * 3
    assert bool(grad[..., 6, :].any()) == bool(grad[..., :, 6].any()) == overlap


def _pool_first_name(name: str) -> str:
    index, rest = name.split(".", 1)
    return f"{int(index) + 1}.{rest}" if int(index) % 4 == 1 else name


def test_task_losses_smooth_each_task_with_its_own_amount():
    digit_logits, sum_logits = torch.randn(5, 10), torch.randn(5, 19)
    digits, sums = torch.tensor([0, 3, 9, 4, 1]), torch.tensor([0, 12, 18, 7, 5])
    loss_digit, loss_sum = task_losses((digit_logits, sum_logits), digits, sums, SumLoss.ce, (0.1, 0.3))
    assert loss_digit.item() == pytest.approx(F.cross_entropy(digit_logits, digits, label_smoothing=0.1).item())
    assert loss_sum.item() == pytest.approx(F.cross_entropy(sum_logits, sums, label_smoothing=0.3).item())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_sum_loss_is_the_squared_error_of_the_regressed_sum(reduction):
    regressed = torch.tensor([[3.5], [10.0], [0.0]])
    scores = SumOutput(SumHead.regression)(torch.zeros(3, 10), regressed, torch.zeros(3, dtype=torch.long))
    _, loss_sum = task_losses((torch.zeros(3, 10), scores), torch.zeros(3, dtype=torch.long),
                              torch.tensor([5, 10, 2]), SumLoss.mse, reduction=reduction)
    squared_errors = [1.5 ** 2, 0.0, 2.0 ** 2]
    assert loss_sum.item() == pytest.approx(sum(squared_errors) / (3 if reduction == "mean" else 1))


def test_criterion_takes_the_configured_sum_loss():
    overrides = ["loss.sum=mse", "model.sum_head=regression", "model.addend_dim=20", "loss.label_smoothing=0"]
    criterion = Criterion(load_config([], overrides).loss, SumHead.regression)
    no_digits = torch.zeros(2, 10), torch.zeros(2, dtype=torch.long)
    scores = SumOutput(SumHead.regression)(no_digits[0], torch.tensor([[4.0], [7.0]]), no_digits[1])
    _, _, loss_sum = criterion((no_digits[0], scores), no_digits[1], torch.tensor([6, 7]))
    assert loss_sum.item() == pytest.approx(2.0)  # squared errors 4 and 0, averaged


def test_criterion_weighs_the_tasks_and_smooths_only_a_free_sum():
    loss_cfg = load_config([], ["loss.label_smoothing=0.2", "loss.weights.digit=0.5", "loss.weights.sum=2.0"]).loss
    digit_logits, free_sums = torch.randn(4, 10), torch.randn(4, 19)
    digits, addends = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 9, 5, 2])
    structured_sums = SumOutput(SumHead.structured)(digit_logits, torch.zeros(4, 0), addends)
    expected_digit = F.cross_entropy(digit_logits, digits, label_smoothing=0.2)
    for head, sum_logits, smoothing in [(SumHead.free, free_sums, 0.2), (SumHead.structured, structured_sums, 0.0)]:
        total, loss_digit, loss_sum = Criterion(loss_cfg, head)((digit_logits, sum_logits), digits, digits + addends)
        assert loss_digit.item() == pytest.approx(expected_digit.item())
        assert loss_sum.item() == pytest.approx(
            F.cross_entropy(sum_logits, digits + addends, label_smoothing=smoothing).item()), head
        assert total.item() == pytest.approx(0.5 * loss_digit.item() + 2.0 * loss_sum.item())


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
                   "trainer.log_every_steps=10", "optim.lr=0.005", "loss.label_smoothing=0")  # as configs/seed-*.yaml
    summary = train(cfg)
    records = [r for r in _metrics(cfg.run.dir) if "train/loss" in r]
    assert records[-1]["train/loss"] < 0.5 * records[0]["train/loss"]
    assert summary["test"]["acc_digit"] > 0.8
    assert summary["test"]["acc_sum"] > 0.2  # chance is about 1/19; the classroom version stayed near it


def _metrics(run_dir):
    from mnist_add.tracking import read_metrics
    return read_metrics(run_dir)


def test_dropout_zeroes_image_features_in_training_only():
    model = build_model(load_config([], ["model.dropout=0.5"]).model)
    images, addends = torch.randn(8, 1, 28, 28), torch.arange(8)
    model.train()
    torch.manual_seed(0)
    first = model(images, addends)[0]
    assert not torch.equal(first, model(images, addends)[0])  # another mask
    torch.manual_seed(0)
    assert torch.equal(first, model(images, addends)[0])  # drawn from torch's generator: resumable with it
    model.eval()
    assert torch.equal(model(images, addends)[0], model(images, addends)[0])
