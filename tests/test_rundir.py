"""The run directory under every way a launch goes wrong: a double launch, a refused launch, a finished
run launched again, a crash at any point of the run's writes, a full disk, a read-only filesystem."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, newest_step, run_module, start_and_wait_for_checkpoint, subprocess_env
from mnist_add import checkpoint
from mnist_add.config import ConfigError, load_config, to_dict
from mnist_add.rundir import completed_run, strict_json
from mnist_add.tracking import read_metrics
from mnist_add.train import main, train

THREE_EPOCHS = ("trainer.epochs=3", "trainer.keep_checkpoints=2")  # 48 steps, evaluated at 16, 32 and 48


def cli_args(data_root, run_dir, *overrides):
    return ["--config", "debug", f"data.root={data_root}", f"run.dir={run_dir}", "trainer.deterministic=true",
            "trainer.num_threads=1", *overrides]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes (the lock file names its latest holder: left out)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_second_launch_on_a_run_dir_in_use_is_refused_and_changes_nothing(data_root, tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    first = start_and_wait_for_checkpoint(cli_args(data_root, run_dir, "trainer.epochs=2"), run_dir, step=8,
                                          release=release)
    before = snapshot(run_dir)
    second = run_module("mnist_add.train", *cli_args(data_root, run_dir, "trainer.epochs=2"))
    assert second.returncode == 2
    line = one_error_line(second.stderr)
    assert f"{run_dir} is in use by another job (host " in line and f"pid {first.pid}, started " in line
    assert snapshot(run_dir) == before

    release.touch()
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]
    records = [(r["step"], frozenset(r)) for r in read_metrics(run_dir)]
    assert len(records) == len(set(records)) and json.loads((run_dir / "summary.json").read_text())["step"] == 32


def test_the_lock_of_a_killed_job_is_not_stale(data_root, tmp_path):
    run_dir = tmp_path / "run"
    first = start_and_wait_for_checkpoint(cli_args(data_root, run_dir), run_dir, step=8)
    first.kill()
    first.wait()
    result = run_module("mnist_add.train", *cli_args(data_root, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith("step-00000008.pt")


def test_resume_never_on_a_run_dir_with_only_best_pt_is_refused_and_changes_nothing(
        make_cfg, data_root, tmp_path, capsys):
    train(make_cfg())
    run_dir = tmp_path / "run"
    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        path.unlink()
    before = snapshot(run_dir)
    capsys.readouterr()  # what the first run said is not the answer under test
    assert main(cli_args(data_root, run_dir, "trainer.resume=never")) == 2
    assert "trainer.resume=never but" in one_error_line(capsys.readouterr().err)
    assert snapshot(run_dir) == before


def test_a_completed_run_launched_again_says_so_and_rewrites_nothing(data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = cli_args(data_root, run_dir, "wandb.mode=offline")
    assert run_module("mnist_add.train", *args).returncode == 0
    before = snapshot(run_dir)
    again = run_module("mnist_add.train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{run_dir} already holds this run, completed: final weights: test sum {summary['test']['acc_sum']:.2%}" \
        in again.stderr
    assert snapshot(run_dir) == before  # no summary, metrics or W&B segment written again


@pytest.fixture(scope="module")
def uncrashed(tmp_path_factory, data_root):
    """The three-epoch run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uncrashed")
    assert run_module("mnist_add.train", *cli_args(data_root, run_dir, *THREE_EPOCHS)).returncode == 0
    return run_dir


@pytest.mark.parametrize("point,step", [("mid-best", 32), ("before-step", 32), ("before-prune", 32),
                                        ("before-summary", 48)])
def test_after_a_crash_at_any_point_best_pt_is_the_best_evaluated_and_keep_k_holds(
        uncrashed, data_root, tmp_path, point, step):
    run_dir = tmp_path / "run"
    crashed = subprocess.run([sys.executable, str(REPO / "tests/crash_at.py"), point, str(step),
                              *cli_args(data_root, run_dir, *THREE_EPOCHS)],
                             capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    relaunched = run_module("mnist_add.train", *cli_args(data_root, run_dir, *THREE_EPOCHS))
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]

    evaluations = [r for r in read_metrics(run_dir) if "val/acc_sum" in r]
    assert [r["step"] for r in evaluations] == [16, 32, 48]
    best_step = max(evaluations, key=lambda r: r["val/acc_sum"])["step"]  # the first of equals, as train keeps
    best = checkpoint.load(run_dir / "checkpoints/best.pt")
    assert best[checkpoint.PROGRESS]["step"] == best_step
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["best.pt", "final.pt", "step-00000040.pt", "step-00000048.pt"]  # keep-k, and no temporary file
    summary = json.loads((run_dir / "summary.json").read_text())
    uncrashed_summary = json.loads((uncrashed / "summary.json").read_text())
    assert all(summary[key] == uncrashed_summary[key] for key in ("val", "test", "best"))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (CI runs as root); elsewhere without the right to mount, skipped."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs ({mounted.stderr.strip()}): run as root"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_stops_with_one_line_and_the_previous_checkpoint_resumes(data_root, small_disk, tmp_path):
    run_dir, release = small_disk / "run", tmp_path / "release"
    job = start_and_wait_for_checkpoint(cli_args(data_root, run_dir), run_dir, step=8, release=release)
    fill(small_disk)
    release.touch()
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 2
    error = [line for line in output.splitlines() if " ERROR " in line]
    assert len(error) == 1 and "Traceback" not in output, output[-3000:]
    assert f"{run_dir}/" in error[0] and "No space left on device" in error[0] and "resumes from it" in error[0]
    assert newest_step(run_dir) == 8 and not list(run_dir.rglob(f"*{checkpoint.TMP_MARK}*"))
    checkpoint.load(run_dir / "checkpoints/step-00000008.pt", keys=checkpoint.TRAINING_KEYS)

    roomy = tmp_path / "roomy"
    shutil.copytree(run_dir, roomy)
    resumed = run_module("mnist_add.train", *cli_args(data_root, roomy))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((roomy / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"].endswith("step-00000008.pt")


def test_a_read_only_run_dir_is_one_line(data_root, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(cli_args(data_root, small_disk / "run")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{small_disk}/run" in line and "Read-only file system" in line and "writable" in line


def test_summary_and_metrics_are_strict_json():
    assert strict_json({"loss": float("nan"), "acc": [1.0, float("inf")]}) == '{"loss": null, "acc": [1.0, null]}'


def test_a_run_completed_before_a_key_was_added_is_still_this_run(data_root, tmp_path):
    cfg = load_config(["debug"], [f"data.root={data_root}", f"run.dir={tmp_path}"])
    summary = {"status": "completed", "step": 16, "test": {"acc_digit": 0.5, "acc_sum": 0.5, "acc_both": 0.5}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    older = to_dict(cfg)
    del older["model"]["dropout"]  # as an older version wrote config.yaml: without the key, which did nothing then
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(older))
    assert completed_run(cfg) == summary
    assert completed_run(load_config(["debug"], [f"data.root={data_root}", f"run.dir={tmp_path}",
                                                 "model.dropout=0.5"])) is None
    older["model"]["gone"] = 1  # a key since removed: not this run
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(older))
    assert completed_run(cfg) is None


def test_a_launch_refused_before_it_wrote_anything_leaves_no_folder_behind(make_cfg, tmp_path):
    space = tmp_path / "space"
    space.mkdir()
    with pytest.raises(ConfigError, match="exceeds the 512 training samples"):
        train(make_cfg("trainer.batch_size=1024", run_dir=space / "new" / "run"))
    assert list(space.iterdir()) == []
    (space / "kept").mkdir()  # a folder that was there before stays, empty as it was
    with pytest.raises(ConfigError):
        train(make_cfg("trainer.batch_size=1024", run_dir=space / "kept"))
    assert [p.name for p in space.iterdir()] == ["kept"] and list((space / "kept").iterdir()) == []


@pytest.mark.parametrize("damage", [b"\x89PNG\r\n\x1a\n\x00\xff", b'{"status": "comp', b"[1, 2]",
                                    b'{"status": "completed", "test": 5}', b""])
def test_a_damaged_summary_is_said_and_the_run_finishes_again_from_its_checkpoint(make_cfg, tmp_path, damage,
                                                                                   caplog):
    cfg = make_cfg()
    summary = train(cfg)
    (tmp_path / "run/summary.json").write_bytes(damage)
    again = train(cfg)
    assert f"{tmp_path / 'run/summary.json'}" in caplog.text and "taking the run as unfinished" in caplog.text
    assert again["resumed_from"].endswith("step-00000016.pt")
    assert json.loads((tmp_path / "run/summary.json").read_text()) == again
    assert all(again[key] == summary[key] for key in ("test", "val", "best"))


def test_a_damaged_config_yaml_of_a_completed_run_is_written_again_by_its_resumption(make_cfg, tmp_path, caplog):
    cfg = make_cfg()
    train(cfg)
    (tmp_path / "run/config.yaml").write_bytes(b"\xff\xfe: [")
    train(cfg)
    assert "config.yaml is not text" in caplog.text and "resuming from the checkpoints" in caplog.text
    assert OmegaConf.load(tmp_path / "run/config.yaml").run.dir == str(tmp_path / "run")


@pytest.mark.parametrize("summary, said", [
    (b"\x00\xff", "summary.json is not text (byte 1 is not UTF-8)"),
    (b'{"status": "completed", "test": {"acc_digit": "x", "acc_sum": "x", "acc_both": "x"}}',
     "summary.json holds no complete scores (ValueError"),
    (b'["completed"]', "summary.json holds no complete scores (TypeError: a list, not a JSON object)"),
])
def test_a_damaged_summary_is_said_and_the_run_taken_as_unfinished(summary, said, data_root, tmp_path, caplog):
    # Unfinished, it resumes from its last checkpoint, and completing writes summary.json again.
    cfg = load_config(["debug"], [f"data.root={data_root}", f"run.dir={tmp_path}"])
    (tmp_path / "summary.json").write_bytes(summary)
    assert completed_run(cfg) is None
    assert f"{tmp_path}/{said}" in caplog.text and "taking the run as unfinished" in caplog.text


def test_a_damaged_config_yaml_of_a_completed_run_is_said_and_the_run_resumed(data_root, tmp_path, caplog):
    cfg = load_config(["debug"], [f"data.root={data_root}", f"run.dir={tmp_path}"])
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "test": {
        "acc_digit": 0.9, "acc_sum": 0.9, "acc_both": 0.9}}))
    (tmp_path / "config.yaml").write_bytes(b"\x89binary")
    assert completed_run(cfg) is None
    assert f"config file {tmp_path}/config.yaml is not text" in caplog.text and "resuming from the checkpoints" \
        in caplog.text
