import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_module
from mnist_add.report import main, newest_checkpoint, series
from mnist_add.tracking import read_metrics
from mnist_add.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = ("loss.png", "accuracy.png")
TEST_SET_FIGURES = ("confusion_digit.png", "confusion_sum.png", "misclassified.png")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> Path:
    """The debug run: 16 steps, checkpoints at steps 8 and 16, one evaluation, best.pt, summary.json."""
    from mnist_add.config import load_config
    run = tmp_path_factory.mktemp("run")
    # One thread: two processes' worth on the 2 shared cores makes this several times slower.
    train(load_config(["debug"], [f"data.root={data_root}", f"run.dir={run}", "trainer.num_threads=1"]))
    return run


@pytest.fixture
def preempted_run(finished_run, tmp_path) -> Path:
    """The same run as if killed before its evaluation: no summary, no best.pt, no evaluation
    records, and a last line cut short mid-write."""
    run = tmp_path / "preempted"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()
    (run / "checkpoints" / "best.pt").unlink()
    metrics = run / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines(keepends=True) if "val/" not in line]
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


def test_newest_checkpoint_is_best_when_the_run_has_one(finished_run):
    assert newest_checkpoint(finished_run) == finished_run / "checkpoints" / "best.pt"


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
    assert series(records, "val/acc_sum")[0] == [16]
    assert series(read_metrics(preempted_run), "val/acc_sum") == ([], [])


def test_a_dir_without_metrics_is_a_one_line_error(tmp_path):
    result = run_module("mnist_add.report", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {tmp_path} has no metrics.jsonl") and result.stderr.count("\n") == 1
    assert not (tmp_path / "report").exists()
