import json
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from conftest import run_module, torchrun
from mnist_add.config import SumLoss, load_config
from mnist_add.data import MNISTAdd
from mnist_add.distributed import Runtime
from mnist_add.evaluate import main
from mnist_add.scoring import Evaluation, evaluate, load_model
from mnist_add.model import build_model, task_losses
from mnist_add.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("trained")
    summary = train(load_config(["debug"], [f"data.root={data_root}", f"run.dir={run}", "data.test_samples=0",
                                            "trainer.num_threads=1"]))
    return run, summary


@pytest.fixture(scope="module")
def model(trained):
    run, _ = trained
    return load_model(f"{run}/checkpoints/best.pt")[0]


class Recorder(torch.nn.Module):
    """A model that remembers each batch of (image, addend) pairs it was asked to score."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.batches = []
        self.train(model.training)

    def forward(self, images, addends):
        self.batches.append(list(zip((image.numpy().tobytes() for image in images), addends.tolist())))
        return self.model(images, addends)

    def pairs(self, images: MNISTAdd) -> list[tuple[int, int]]:
        """Every pair scored, in order, as (index of the image in `images`, addend)."""
        all_images = images.batch(torch.arange(len(images))).images
        index_of = {image.numpy().tobytes(): i for i, image in enumerate(all_images)}
        return [(index_of[image], addend) for batch in self.batches for image, addend in batch]


def test_load_model_returns_an_eval_model_and_its_config(trained):
    run, _ = trained
    model, cfg = load_model(f"{run}/checkpoints/best.pt")
    assert not model.training and cfg.trainer.batch_size == 32
    digit_logits, sum_logits = model(torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 9]))
    assert digit_logits.shape == (3, 10) and sum_logits.shape == (3, 19)


def test_cli_on_two_ranks_reproduces_the_single_process_training_summary_exactly(trained, data_root):
    run, summary = trained
    eval_batch_size = load_model(f"{run}/checkpoints/final.pt")[1].trainer.eval_batch_size
    result = run_module("mnist_add.evaluate", "--checkpoint", f"{run}/checkpoints/final.pt", "--json",
                        "--data-root", data_root, "--batch-size", str(eval_batch_size), launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["pairs"] == 10_000
    # Counts are exact, and so are the loss sums: not one bit differs.
    assert {key: metrics[key] for key in summary["test"]} == summary["test"]


def test_the_text_says_what_it_scored_and_the_scores_in_percent(trained, data_root, capsys):
    run, summary = trained
    path = f"{run}/checkpoints/final.pt"
    assert main(["--checkpoint", path, "--data-root", data_root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path} on the test set: 10,000 (image, addend) pairs"
    assert f"{'acc_sum':>20}: {summary['test']['acc_sum']:.2%}" in lines[1:]  # final.pt: the final weights
    assert main(["--checkpoint", path, "--data-root", data_root, "--split", "val"]) == 0
    assert capsys.readouterr().out.startswith(f"{path} on the validation split: 256 (image, addend) pairs\n")


def test_cli_exhaustive_scores_ten_pairs_per_image(trained, data_root, capsys):
    run, summary = trained
    assert main(["--checkpoint", f"{run}/checkpoints/final.pt", "--json", "--exhaustive", "--data-root", data_root]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairs"] == 100_000
    # This network reads the digit without the addend, and its sum is digit + addend by construction.
    assert metrics["acc_digit"] == metrics["acc_sum"] == summary["test"]["acc_digit"]


def test_a_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_module("mnist_add.evaluate", "--checkpoint", str(bad))
    assert result.returncode == 2
    assert "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr


def test_exhaustive_scores_each_image_once_with_each_addend(model, data_root):
    images = MNISTAdd(data_root, train=False, num_samples=30)
    recorder = Recorder(model)
    result = evaluate(recorder, images, Runtime(), batch_size=8, sum_loss=SumLoss.ce, exhaustive=True)
    each_once = Counter({(image, addend): 1 for image in range(30) for addend in range(10)})
    assert Counter(recorder.pairs(images)) == each_once
    assert result.num_pairs == 300
    # The targets: each image's digit ten times, and sums digit + 0 .. digit + 9.
    digits = images.targets
    assert result.digit_confusion.sum(1).tolist() == (10 * torch.bincount(digits, minlength=10)).tolist()
    true_sums = torch.cat([digits + addend for addend in range(10)])
    assert result.sum_confusion.sum(1).tolist() == torch.bincount(true_sums, minlength=19).tolist()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_score_the_single_process_batches_whole(model, data_root, world_size):
    """A kernel can round a sample differently in a batch of another size: same batches, same bits."""
    images = MNISTAdd(data_root, train=False, num_samples=100)
    single = Recorder(model)
    whole = evaluate(single, images, Runtime(), 16, SumLoss.ce)
    batches, digit_confusion = [], torch.zeros(10, 10, dtype=torch.int64)
    for rank in range(world_size):  # each rank's share, before the sum over ranks
        recorder = Recorder(model)
        digit_confusion += evaluate(recorder, images, Runtime(rank=rank, world_size=world_size), 16,
                                    SumLoss.ce).digit_confusion
        batches += recorder.batches
    assert whole.num_pairs == 100
    assert sorted(batches) == sorted(single.batches) and len(batches) == 7  # 100 images in batches of 16
    assert torch.equal(digit_confusion, whole.digit_confusion)


@pytest.mark.parametrize("exhaustive", [False, True], ids=["fixed addends", "exhaustive"])
def test_losses_are_the_mean_cross_entropy_over_the_pairs(model, data_root, exhaustive):
    images = MNISTAdd(data_root, train=False, num_samples=100)
    metrics = evaluate(model, images, Runtime(), 32, SumLoss.ce, exhaustive=exhaustive).metrics()
    batch = images.batch(torch.arange(100))
    copies = 10 if exhaustive else 1
    addends = torch.arange(10).repeat_interleave(100) if exhaustive else batch.addends
    digits = batch.digits.repeat(copies)
    with torch.no_grad():
        digit_logits, sum_logits = model(batch.images.repeat(copies, 1, 1, 1), addends)
    assert metrics["test/loss_digit"] == pytest.approx(F.cross_entropy(digit_logits, digits).item(), rel=1e-6)
    assert metrics["test/loss_sum"] == pytest.approx(F.cross_entropy(sum_logits, digits + addends).item(), rel=1e-6)


def test_metrics_are_ratios_of_the_summed_counts():
    digit_confusion = torch.zeros(10, 10, dtype=torch.int64)
    digit_confusion[3, 3], digit_confusion[5, 6], digit_confusion[7, 7] = 2, 1, 1  # class 7 has one image
    sum_confusion = torch.zeros(19, 19, dtype=torch.int64)
    sum_confusion[3, 3], sum_confusion[12, 12], sum_confusion[9, 10] = 1, 2, 1
    result = Evaluation(num_pairs=4, loss_digit=2.0, loss_sum=6.0, digit_confusion=digit_confusion,
                        sum_confusion=sum_confusion, both_correct=2)
    assert result.metrics(prefix="test/") == {
        "test/loss_digit": 0.5, "test/loss_sum": 1.5, "test/acc_digit": 0.75, "test/acc_sum": 0.75,
        "test/acc_both": 0.5, "test/acc_sum_given_digit": 2 / 3}
    per_class = result.per_class()
    assert per_class["digit"] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0]  # class 5: wrong; classes never seen: 0
    assert per_class["sum"][3] == per_class["sum"][12] == 1 and per_class["sum"][9] == 0 and len(per_class["sum"]) == 19


def test_sum_given_digit_counts_the_right_digits_only():
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion[4, 4], confusion[2, 8] = 1, 3
    result = Evaluation(4, 0.0, 0.0, confusion, torch.zeros(19, 19, dtype=torch.int64), both_correct=1)
    assert result.metrics(prefix="")["acc_sum_given_digit"] == 1.0  # 1 of the 1 right digit


@pytest.mark.parametrize("overrides,sum_loss", [
    (["model.arch=seed", "model.sum_head=free", "model.addend_dim=20"], SumLoss.ce),
    (["model.arch=seed", "model.sum_head=regression", "loss.sum=mse", "model.addend_dim=20"], SumLoss.mse),
], ids=["free sum, ce", "regressed sum, mse"])
def test_counts_and_losses_are_those_of_scoring_every_pair_directly(data_root, overrides, sum_loss):
    """An untrained network with its own sum head: right digits and right sums are different pairs."""
    torch.manual_seed(0)
    model = build_model(load_config([], overrides).model).eval()
    images = MNISTAdd(data_root, train=False, num_samples=100)
    result = evaluate(model, images, Runtime(), 32, sum_loss)
    batch = images.batch(torch.arange(100))
    with torch.no_grad():
        outputs = model(batch.images, batch.addends)
    digit_pred, sum_pred = (o.argmax(1) for o in outputs)
    assert result.digit_confusion.dtype == result.sum_confusion.dtype == torch.int64
    digit_confusion = torch.bincount(batch.digits * 10 + digit_pred, minlength=100).view(10, 10)
    sum_confusion = torch.bincount(batch.sums * 19 + sum_pred, minlength=361).view(19, 19)
    assert torch.equal(result.digit_confusion, digit_confusion) and torch.equal(result.sum_confusion, sum_confusion)
    assert result.both_correct == int(((digit_pred == batch.digits) & (sum_pred == batch.sums)).sum())
    loss_digit, loss_sum = task_losses(outputs, batch.digits, batch.sums, sum_loss, reduction="sum")
    assert (result.loss_digit, result.loss_sum) == pytest.approx((loss_digit.item(), loss_sum.item()), rel=1e-5)


def test_cli_scores_the_validation_images_the_run_held_out(trained, data_root, tmp_path, capsys):
    run, summary = trained
    eval_batch_size = load_model(f"{run}/checkpoints/best.pt")[1].trainer.eval_batch_size
    assert main(["--checkpoint", f"{run}/checkpoints/best.pt", "--json", "--split", "val", "--data-root", data_root,
                 "--batch-size", str(eval_batch_size)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairs"] == 256 and {key: metrics[key] for key in summary["val"]} == summary["best"]["val"]
    train(load_config(["debug"], [f"data.root={data_root}", f"run.dir={tmp_path}", "data.val_samples=0",
                                  "trainer.max_steps=2", "trainer.num_threads=1"]))
    assert main(["--checkpoint", f"{tmp_path}/checkpoints/best.pt", "--split", "val"]) == 2
    assert capsys.readouterr().err == ("error: this checkpoint's run held out no validation images "
                                       "(data.val_samples=0); evaluate --split test\n")


def test_a_best_pt_not_written_yet_says_when_it_comes_and_names_the_newest_step(trained, tmp_path, capsys):
    run, _ = trained
    (tmp_path / "checkpoints").mkdir()
    for name in ("step-00000008.pt", "step-00000016.pt"):
        (tmp_path / "checkpoints" / name).write_bytes((run / "checkpoints" / "step-00000016.pt").read_bytes())
    newest = f"; the newest checkpoint there is {tmp_path}/checkpoints/step-00000016.pt\n"
    assert main(["--checkpoint", str(tmp_path / "checkpoints" / "best.pt")]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {tmp_path}/checkpoints/best.pt does not exist yet: it is "
                                       f"written at the first epoch's end, with the first validation{newest}")
    assert main(["--checkpoint", str(tmp_path / "checkpoints" / "final.pt")]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {tmp_path}/checkpoints/final.pt does not exist yet: it is "
                                       f"written when the run completes{newest}")
    (tmp_path / "summary.json").write_text("{}")  # a finished run: nothing is still to come
    assert main(["--checkpoint", str(tmp_path / "checkpoints" / "final.pt")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path}/checkpoints/final.pt does not exist{newest}"


def test_a_mistyped_run_dir_is_said_as_one(tmp_path, capsys):
    (tmp_path / "default" / "checkpoints").mkdir(parents=True)
    assert main(["--checkpoint", str(tmp_path / "defualt" / "checkpoints" / "final.pt")]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {tmp_path}/defualt/checkpoints/final.pt does not exist (nor "
                                       f"does its folder {tmp_path}/defualt/checkpoints: a typo in the path?)\n")


def test_a_missing_checkpoint_is_said_before_torch_is_imported(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    result = run_module("mnist_add.evaluate", "--checkpoint", f"{tmp_path}/checkpoints/best.pt",
                        launcher=(sys.executable, "-X", "importtime"))
    *imports, said = result.stderr.splitlines()
    assert result.returncode == 2 and said.startswith(f"error: checkpoint {tmp_path}/checkpoints/best.pt does not "
                                                      f"exist yet"), result.stderr
    imported = {line.rpartition("|")[2].strip() for line in imports}
    assert "omegaconf" in imported and "torch" not in imported


def test_exhaustive_scoring_reads_each_image_once_where_the_digits_ignore_the_addend(model, data_root):
    assert model.digits_ignore_the_addend  # the debug network: a structured sum head, addend_dim 0
    images = MNISTAdd(data_root, train=False, num_samples=200)
    once, every_pair = Recorder(model), Recorder(model)
    once.digits_ignore_the_addend, once.sum_output = True, model.sum_output
    fast = evaluate(once, images, Runtime(), 64, SumLoss.ce, exhaustive=True)
    slow = evaluate(every_pair, images, Runtime(), 64, SumLoss.ce, exhaustive=True)
    assert len(once.pairs(images)) == 200 and len(every_pair.pairs(images)) == 2000  # one pass, not ten
    assert torch.equal(fast.digit_confusion, slow.digit_confusion) and torch.equal(fast.sum_confusion,
                                                                                   slow.sum_confusion)
    assert fast.both_correct == slow.both_correct and fast.num_pairs == 2000
    assert fast.loss_digit == pytest.approx(slow.loss_digit, rel=1e-5)
    assert fast.loss_sum == pytest.approx(slow.loss_sum, rel=1e-5)
