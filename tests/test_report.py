import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from conftest import run_module
from mnist_add.config import load_config
from mnist_add.data import MNISTAdd
from mnist_add.report import (CONFIG_NAME, SPLITS, draw_confusion, draw_error_rates, draw_losses, draw_misclassified,
                              label_smoothing, main, newest_checkpoint, series, smoothed_loss_floor, sum_follows_digit)
from mnist_add.tracking import read_metrics
from mnist_add.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = ("loss.png", "accuracy.png")
TEST_SET_FIGURES = ("confusion_digit.png", "misclassified.png")  # the debug run's structured sum follows its digit


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> Path:
    """The debug run: 16 steps, checkpoints at steps 8 and 16, one evaluation, best.pt, summary.json."""
    run = tmp_path_factory.mktemp("run")
    # One thread: two processes' worth on the 2 shared cores makes this several times slower.
    train(load_config(["debug"], [f"data.root={data_root}", f"run.dir={run}", "trainer.num_threads=1"]))
    return run


@pytest.fixture
def preempted_run(finished_run, tmp_path) -> Path:
    """The same run as if killed before its evaluation: no summary, no best.pt or final.pt, no validation or test
    records, and a last line cut short mid-write."""
    run = tmp_path / "preempted"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()
    for name in ("best.pt", "final.pt"):
        (run / "checkpoints" / name).unlink()
    metrics = run / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines(keepends=True)
             if SPLITS["val"][0] not in line and SPLITS["test"][0] not in line]
    metrics.write_text("".join(lines) + '{"step": 20, "train/lo')
    return run


def report(capsys, *args: str) -> list[Path]:
    """Run the report CLI in this process; the paths it printed."""
    assert main(list(args)) == 0
    return [Path(line) for line in capsys.readouterr().out.splitlines()]


def assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100, path
            image.load()  # decodes every row: a truncated file fails here


def test_report_of_a_finished_run_writes_every_figure_into_run_dir_report(finished_run, data_root, capsys):
    written = report(capsys, str(finished_run), "--data-root", data_root)
    assert written == [finished_run / "report" / name for name in CURVES + TEST_SET_FIGURES]
    assert_pngs(written)


def test_report_of_a_preempted_run_uses_its_newest_step_checkpoint(preempted_run, data_root, tmp_path, capsys):
    assert newest_checkpoint(preempted_run) == preempted_run / "checkpoints" / "step-00000016.pt"
    written = report(capsys, str(preempted_run), "--out", str(tmp_path / "figures"), "--data-root", data_root)
    assert written == [tmp_path / "figures" / name for name in CURVES + TEST_SET_FIGURES]
    assert_pngs(written)


def test_newest_checkpoint_is_final_when_the_run_has_completed(finished_run):
    assert newest_checkpoint(finished_run) == finished_run / "checkpoints" / "final.pt"


def test_a_run_without_checkpoints_gets_the_learning_curves_only(finished_run, tmp_path, capsys):
    run = tmp_path / "started"
    run.mkdir()
    shutil.copy(finished_run / "metrics.jsonl", run)
    written = report(capsys, str(run))
    assert written == [run / "report" / name for name in CURVES]
    assert_pngs(written)


def test_curves_take_train_and_validation_points_from_their_own_records(finished_run, preempted_run):
    records = read_metrics(finished_run)
    assert series(records, "train/loss_digit")[0] == [4, 8, 12, 16]
    assert series(records, SPLITS["val"][0] + "acc_sum")[0] == [16]
    assert series(records, SPLITS["test"][0] + "acc_sum")[0] == [16]  # the final score, after training
    assert series(read_metrics(preempted_run), SPLITS["val"][0] + "acc_sum") == ([], [])


def panels(figure) -> dict[str, object]:
    """The figure's axes by task, from their titles ("digit loss", "sum error rate ...")."""
    figure.canvas.draw()  # limits, scales and layout as in the saved PNG
    return {ax.get_title().split()[0]: ax for ax in figure.axes}


def legend_labels(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_accuracy_figure_plots_error_rates_on_a_log_scale(finished_run):
    records = read_metrics(finished_run)
    for task, ax in panels(draw_error_rates(records)).items():
        assert ax.get_yscale() == "log"
        train_line, val_line, test_line = ax.get_lines()
        for line, split in ((train_line, "train"), (val_line, "val"), (test_line, "test")):
            accuracies = series(records, f"{SPLITS[split][0]}acc_{task}")[1]
            assert list(line.get_ydata()) == pytest.approx([1 - acc for acc in accuracies])
        assert legend_labels(ax) == [f"train, last {100 * train_line.get_ydata()[-1]:.2f}%",
                                     f"validation, last {100 * val_line.get_ydata()[-1]:.2f}%",
                                     f"test, last {100 * test_line.get_ydata()[-1]:.2f}%"]


def test_test_accuracies_of_99_5_and_99_7_percent_lie_visibly_apart():
    """A run climbing from 70%: on the old 0.6-1.0 linear axis these two points were under 2 pixels apart."""
    records = [{"step": 10 * i, "train/acc_digit": acc, "train/acc_sum": acc}
               for i, acc in enumerate((0.7, 0.9, 0.97, 0.99, 0.995, 0.996), start=1)]
    val = SPLITS["val"][0]
    records += [{"step": 60, f"{val}acc_digit": 0.995, f"{val}acc_sum": 0.995},
                {"step": 70, f"{val}acc_digit": 0.997, f"{val}acc_sum": 0.997}]
    ax = panels(draw_error_rates(records))["digit"]
    (_, y_99_5), (_, y_99_7) = ax.transData.transform([(60, 0.005), (70, 0.003)])
    assert y_99_5 - y_99_7 > 15  # pixels


def test_loss_legend_says_training_is_smoothed_and_testing_is_not(finished_run):
    smoothing = label_smoothing(finished_run)
    assert smoothing == {"digit": 0.15, "sum": 0.0}  # the debug run: default smoothing, structured sum head
    by_task = panels(draw_losses(read_metrics(finished_run), smoothing))
    assert legend_labels(by_task["digit"]) == ["train (label smoothing 0.15)", "validation (no smoothing)",
                                               "test (no smoothing)",
                                               "lowest train loss possible (smoothing 0.15): 0.69"]
    assert legend_labels(by_task["sum"]) == ["train (no smoothing)", "validation (no smoothing)", "test (no smoothing)"]
    floor_line = by_task["digit"].get_lines()[-1]
    assert list(floor_line.get_ydata()) == pytest.approx([smoothed_loss_floor(0.15, 10)] * 2)


def test_sum_loss_is_labelled_smoothed_only_for_a_free_sum_head(data_root, tmp_path):
    cfg = load_config(["debug"], [f"data.root={data_root}", "model.sum_head=free", "model.addend_dim=16",
                                  "loss.label_smoothing=0.2"])
    OmegaConf.save(cfg, tmp_path / CONFIG_NAME)
    assert label_smoothing(tmp_path) == {"digit": 0.2, "sum": 0.2}


def test_without_config_yaml_the_training_curve_makes_no_smoothing_claim(finished_run, tmp_path):
    assert label_smoothing(tmp_path) is None
    by_task = panels(draw_losses(read_metrics(finished_run), None))
    assert legend_labels(by_task["digit"]) == ["train", "validation (no smoothing)", "test (no smoothing)"]


@pytest.mark.parametrize("smoothing, num_classes", [(0.1, 10), (0.1, 19), (0.3, 10)])
def test_smoothed_loss_floor_is_the_loss_of_a_perfect_fit_to_the_smoothed_targets(smoothing, num_classes):
    targets = torch.full((num_classes,), smoothing / num_classes)
    targets[3] += 1 - smoothing
    perfect_fit = F.cross_entropy(targets.log()[None], torch.tensor([3]), label_smoothing=smoothing)
    assert smoothed_loss_floor(smoothing, num_classes) == pytest.approx(float(perfect_fit))


def test_confusion_cells_show_every_count_in_a_readable_size():
    confusion = torch.tensor([[1130, 2, 0], [5, 1009, 1], [0, 0, 980]])
    figure = draw_confusion(confusion, "digit", "three classes")
    ax = figure.axes[0]
    assert sorted(int(text.get_text()) for text in ax.texts) == sorted(confusion[confusion > 0].tolist())
    tick_size = ax.get_xticklabels()[0].get_fontsize()
    assert all(text.get_fontsize() >= max(10, tick_size) for text in ax.texts)


def test_a_dir_without_metrics_is_a_one_line_error(tmp_path):
    result = run_module("mnist_add.report", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {tmp_path} has no metrics.jsonl") and result.stderr.count("\n") == 1
    assert not (tmp_path / "report").exists()


def test_a_structured_sum_head_gets_one_error_panel_and_a_free_one_two(finished_run, tmp_path, data_root):
    records = read_metrics(finished_run)
    assert sum_follows_digit(finished_run)  # the debug run
    [ax] = draw_error_rates(records, one_panel=True).axes
    assert ax.get_title().startswith("digit and sum error rate") and ax.get_ylabel() == "error rate (1 - accuracy)"
    free = load_config(["debug"], [f"data.root={data_root}", "model.sum_head=free", "model.addend_dim=16"])
    OmegaConf.save(free, tmp_path / CONFIG_NAME)
    assert not sum_follows_digit(tmp_path) and not sum_follows_digit(tmp_path / "nothing")


@pytest.mark.parametrize("accuracies", [(0.93, 0.95, 0.965), (0.5, 0.9, 0.99, 0.999)])
def test_error_rate_ticks_read_in_percent_only(accuracies):
    records = [{"step": 10 * i, "train/acc_digit": acc, "train/acc_sum": acc} for i, acc in enumerate(accuracies)]
    figure = draw_error_rates(records)
    figure.canvas.draw()
    for ax in figure.axes:
        low, high = ax.get_ylim()
        shown = [t for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)
                 if t.get_text() and low <= t.get_position()[1] <= high]
        assert len(shown) >= 2 and all(t.get_text().endswith("%") for t in shown), [t.get_text() for t in shown]


def test_misclassified_captions_read_prediction_then_sum_with_the_truth_beside_each(data_root):
    mnist_test = MNISTAdd(data_root, train=False, num_samples=1)
    errors = [{"index": 0, "digit": 0, "true_digit": 6, "addend": 1, "sum": 1, "true_sum": 7}]
    figure = draw_misclassified(errors, 36, mnist_test, "best.pt, 10000 test pairs")
    assert figure.get_suptitle() == "1 of 36 errors, best.pt, 10000 test pairs"
    assert figure.axes[0].get_title() == "pred 0 (true 6)\n0+1 \u2192 1 (true 7)"
    assert draw_misclassified([], 0, mnist_test, "t").get_suptitle() == "no errors, t"


@pytest.mark.parametrize("make, said", [
    (lambda path: path.write_bytes(b"\x00\xff\xfe"), "holds no record: none of its lines is a JSON object with a "
                                                      "step (binary, cut, or another program's); restore it, or "
                                                      "delete its damaged lines"),
    (lambda path: path.write_text("9" * 5000 + "\n"), "holds no record: none of its lines is a JSON object with a "
                                                      "step (binary, cut, or another program's); restore it, or "
                                                      "delete its damaged lines"),
    (os.mkfifo, "is a FIFO (named pipe), not a file"),  # never read: that would wait for a writer
    (lambda path: path.symlink_to("/dev/zero"), "is a device, not a file"),  # never read: it would never end
    (lambda path: path.mkdir(), "is a directory, not a file"),
])
def test_a_metrics_file_that_cannot_be_read_is_one_line_naming_it(make, said, tmp_path, capsys):
    make(tmp_path / "metrics.jsonl")
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}/metrics.jsonl {said}\n"
    assert not (tmp_path / "report").exists()


def test_records_that_are_not_metrics_are_left_out_with_a_warning(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('[1, 2]\n{"step": "ten", "train/loss": 1}\n{"step": 30, "train/loss": "low"}\n')
    records = len(read_metrics(run))
    assert main([str(run)]) == 0
    out, err = capsys.readouterr()
    assert [Path(line).name for line in out.splitlines()] == list(CURVES)
    assert err.startswith(f"warning: {run}/metrics.jsonl: 3 of its {records + 2} lines are not metrics (a step and "
                          f"numbers) and are left out of the figures\n"), err


def test_a_config_yaml_that_is_a_fifo_is_one_line_naming_it(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("checkpoints", "config.yaml"))
    os.mkfifo(run / "config.yaml")
    assert main([str(run)]) == 2
    assert capsys.readouterr().err == f"error: config file {run}/config.yaml is a FIFO (named pipe); a config is a " \
                                      f"YAML file\n"
