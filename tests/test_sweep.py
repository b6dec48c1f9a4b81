"""job.sweep: expansion, member names and configs, skipping and splitting; job.submit --sweep end to end."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, newest_step, run_module, wait_until
from test_slurm import (HOLD_AT, LONG, assert_bitwise_equal, expected_fingerprint, final_weights, sacct_states,
                        slurm_cluster, summary)  # noqa: F401 (slurm_cluster: a fixture)
from job import sweep
from job.submit import SubmitConfig, local_parallelism, main, read_command_line
from job.cluster import slurm_states
from mnist_add.config import ConfigError, training_config
from mnist_add.rundir import RunDirLock

AXES = ["model.heads=joint,separate", "trainer.seed=0,1,2"]


def test_the_product_of_the_lists_is_every_member_last_key_fastest():
    members = sweep.expand(sweep.parse_axes(AXES))
    assert members == [{"model.heads": h, "trainer.seed": s} for h in ("joint", "separate") for s in "012"]


def test_one_valued_items_after_sweep_are_plain_overrides():
    assert sweep.separate_overrides([*AXES, "trainer.epochs=2", "job.array_parallelism=1", "trainer.seed="]) == \
        ([*AXES, "trainer.seed="], ["trainer.epochs=2", "job.array_parallelism=1"])  # an empty value: refused later


@pytest.mark.parametrize("assignment, name", [
    ({"model.heads": "joint", "trainer.seed": "0"}, "heads-joint_seed-0"),
    ({"loss.sum": "ce", "loss.weights.sum": "0.5"}, "loss-sum-ce_loss-weights-sum-0.5"),  # same last part
    ({"run_tag": "a/b c"}, "run_tag-a-b-c"),  # no path separators or spaces in a folder name
])
def test_member_names_are_made_from_the_swept_values(assignment, name):
    assert sweep.member_name(assignment) == name


@pytest.mark.parametrize("spec, message", [
    ("trainer.seed", "is not key=value1,value2"),
    ("trainer.seed=", "empty value"),
    ("trainer.seed=0,,1", "empty value"),
    ("run.dir=a,b", "cannot vary run.dir"),
    ("job.nodes=1,2", "cannot vary job.nodes"),
])
def test_malformed_sweep_items_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        sweep.parse_axes([spec])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="names trainer.seed twice"):
        sweep.parse_axes(["trainer.seed=0,1", "trainer.seed=2"])


def test_split_keeps_order_and_caps_each_array():
    assert sweep.split(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert sweep.split(list(range(3)), 1001) == [[0, 1, 2]]


def test_max_array_size_is_read_from_scontrol_show_config():
    text = "MaxArraySize            = 1001\nMaxJobCount             = 10000\n"
    assert sweep.parse_max_array_size(text) == 1001
    with pytest.raises(ConfigError, match="job.max_array_size"):
        sweep.parse_max_array_size("MaxJobCount = 10000\n")


def plan(tmp_path, *overrides, axes=AXES):
    return sweep.plan(["debug"], [f"run.dir={tmp_path / 'sw'}", *overrides], axes, SubmitConfig)


def test_each_member_has_its_run_dir_its_values_and_the_sweep_as_wandb_group(tmp_path):
    result = plan(tmp_path, "optim.lr=0.01")
    assert result.name == "sw" and len(result.to_run) == 6 and not result.finished
    member = result.to_run[4]  # separate, seed 1
    assert member.name == "heads-separate_seed-1"
    assert member.cfg.run.dir == str(tmp_path / "sw" / "heads-separate_seed-1")
    assert member.cfg.model.heads.value == "separate" and member.cfg.trainer.seed == 1
    assert member.cfg.optim.lr == 0.01 and member.cfg.data.train_samples == 512  # the plain overrides and --config
    assert member.cfg.wandb.group == "sw" and member.cfg.wandb.name == "sw/heads-separate_seed-1"


@pytest.mark.parametrize("axis, message", [
    ("trainer.sed=0,1", "did you mean trainer.seed"),
    ("trainer.seed=0,x", "could not be converted to Integer"),
    ("model.heads=joint,both", "expected one of"),
    ("trainer.seed=0,-1", "trainer.seed must be at least 0"),
])
def test_a_bad_value_in_a_list_is_named(tmp_path, axis, message):
    with pytest.raises(ConfigError, match=message):
        plan(tmp_path, axes=[axis])


def write_summary(run_dir: Path, status: str = "completed"):
    scores = {"acc_digit": 0.9, "acc_sum": 0.9, "acc_both": 0.9}
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "step": 2, "test": scores}))


def test_finished_members_are_skipped_and_unfinished_or_changed_ones_run(tmp_path):
    first = plan(tmp_path)
    for member in first.to_run[:3]:  # what a launch leaves: the resolved config, then the summary
        Path(member.cfg.run.dir).mkdir(parents=True)
        (Path(member.cfg.run.dir) / "config.yaml").write_text(OmegaConf.to_yaml(training_config(member.cfg)))
    write_summary(Path(first.to_run[0].cfg.run.dir))
    write_summary(Path(first.to_run[1].cfg.run.dir), status="stopped")
    again = plan(tmp_path)
    assert [m.name for m in again.finished] == ["heads-joint_seed-0"]
    assert [m.name for m in again.to_run] == [m.name for m in first.to_run[1:]]
    changed = plan(tmp_path, "optim.lr=0.01")  # computes something else: the completed run is not this member
    assert not changed.finished and len(changed.to_run) == 6


def test_a_member_whose_run_dir_is_held_by_a_job_is_not_submitted_again(tmp_path):
    lock = RunDirLock(tmp_path / "sw" / "heads-joint_seed-2")
    lock.acquire()
    try:
        result = plan(tmp_path)
    finally:
        lock.release()
    assert [m.name for m in result.running] == ["heads-joint_seed-2"] and len(result.to_run) == 5


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "trainer.sed=0,1"], "did you mean trainer.seed?"),
    (["--sweep", "trainer.seed="], "empty value"),
    (["--sweep", "trainer.seed=0,zero"], "could not be converted to Integer (at trainer.seed)"),
    (["--sweep", "trainer.seed=0", "trainer.epochs=2"], "varies nothing; give a key two or more values"),
])
def test_bad_sweep_syntax_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main(["--config", "debug", f"run.dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_local_sweep_runs_every_member_and_a_second_submission_runs_none(tmp_path, data_root, capsys):
    args = ["--config", "debug", f"run.dir={tmp_path / 'sw'}", f"data.root={data_root}", "trainer.max_steps=2",
            "trainer.num_threads=1", "data.test_samples=32", "job.cluster=local",
            "--sweep", "trainer.seed=0,1", "job.array_parallelism=2"]  # a plain override after the axes
    first = run_module("job.submit", *args, "--wait", timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep sw: 2 to run, 0 finished" in first.stdout and "running 2 at a time" in first.stdout
    started = re.findall(r"^  (seed-\d): started, log (\S+)$", first.stdout, re.MULTILINE)
    assert [name for name, _ in started] == ["seed-0", "seed-1"] and all(Path(log).is_file() for _, log in started)
    ends = re.findall(r"^(\d/2) (seed-\d): final weights: test sum", first.stdout, re.MULTILINE)
    assert ends == [("1/2", "seed-0"), ("2/2", "seed-1")]  # each member's end, counted
    assert first.stdout.index("seed-1: started") < first.stdout.index("1/2 seed-0")  # said as they start
    assert sorted(path.name for path in (tmp_path / "sw" / "submitit").iterdir() if path.is_dir()) == []  # no %j
    for seed in (0, 1):
        summary = json.loads((tmp_path / "sw" / f"seed-{seed}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["step"] == 2
    assert main(args) == 0  # in this process: nothing is left to start one
    assert capsys.readouterr().out == "sweep sw: 0 to run, 2 finished and 0 queued or running (skipped)\n"


@pytest.mark.parametrize("threads, tasks, parallelism", [(1, 1, 2), (0, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 9)])
def test_a_local_sweep_runs_no_more_members_at_once_than_the_cpus_hold(tmp_path, monkeypatch, threads, tasks,
                                                                      parallelism):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(18)) if parallelism == 9 else {0, 1})
    args = ["--config", "debug", f"run.dir={tmp_path}", f"trainer.num_threads={threads}", "job.cluster=local",
            f"job.tasks_per_node={tasks}", "job.array_parallelism=9", "--sweep", "trainer.seed=0,1,2"]
    _, cfg, plan = read_command_line(args)
    assert local_parallelism(cfg.job, plan) == parallelism


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def array_states(job: str) -> dict[str, str]:
    """Each task of a SLURM job (array) and its last state; a pending array shows as one `A_[0-3]` line."""
    out = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True,
                         text=True, check=True).stdout
    return {task: state.split()[0] for task, state in (line.split("|") for line in out.splitlines() if line)}


def wait_for_tasks(job: str, count: int) -> dict[str, str]:
    """Once every one of `count` tasks has ended, they stay ended."""
    return wait_until(lambda: len(s := array_states(job)) == count and all(v in ENDED for v in s.values()) and s,
                      f"the {count} tasks of job {job} to end", timeout=300)


def test_a_sweep_on_slurm_runs_as_arrays_and_a_resubmission_reruns_only_the_unfinished_member(
        slurm_cluster, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the tasks import job.submit from the directory they were submitted in
    sweep_dir = tmp_path / "sw"
    args = ["--config", "debug", f"run.dir={sweep_dir}", f"data.root={data_root}", "trainer.max_steps=2",
            "trainer.num_threads=1", "data.test_samples=32", "job.cluster=slurm", "job.array_parallelism=4",
            "job.max_array_size=3", "--sweep", "model.heads=joint,separate", "trainer.seed=0,1"]
    first = run_module("job.submit", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    array, rest = re.search(r"submitted array\(s\) (\d+),(\d+)\n", first.stdout).groups()  # split at 3 members
    assert wait_for_tasks(array, 3) == {f"{array}_{i}": "COMPLETED" for i in range(3)}
    assert wait_for_tasks(rest, 1) == {rest: "COMPLETED"}
    names = [f"heads-{h}_seed-{s}" for h in ("joint", "separate") for s in (0, 1)]
    finished = {name: (sweep_dir / name / "summary.json").stat().st_mtime_ns for name in names}
    index = json.loads((sweep_dir / "sweep.json").read_text())  # where compare looks up SLURM states
    assert index["members"] == {name: {"job_id": job} for name, job in
                                zip(names, [f"{array}_0", f"{array}_1", f"{array}_2", rest])}
    assert slurm_states([f"{array}_1", rest]) == {f"{array}_1": "COMPLETED", rest: "COMPLETED"}  # compare's view

    assert main(args) == 0
    assert capsys.readouterr().out == "sweep sw: 0 to run, 4 finished and 0 queued or running (skipped)\n"

    shutil.rmtree(sweep_dir / "heads-separate_seed-0")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("sweep sw: 1 to run, 3 finished") and "heads-separate_seed-0: job" in out
    rerun = re.search(r"submitted array\(s\) (\d+)\n", out).group(1)
    assert wait_for_tasks(rerun, 1) == {rerun: "COMPLETED"}
    assert json.loads((sweep_dir / "heads-separate_seed-0" / "summary.json").read_text())["status"] == "completed"
    assert json.loads((sweep_dir / "sweep.json").read_text())["members"]["heads-separate_seed-0"] == {"job_id": rerun}
    finished.pop("heads-separate_seed-0")
    assert {name: (sweep_dir / name / "summary.json").stat().st_mtime_ns for name in finished} == finished  # not rerun


def running_tasks(job: str) -> dict[str, str]:
    """{task id: node} of the job's running tasks."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-t", "R", "-o", "%i %N"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split() for line in out.splitlines())


def test_an_array_member_preempted_by_urgent_resumes_bitwise_equal_and_the_others_run_once(
        slurm_cluster, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep_dir, release = tmp_path / "sw", tmp_path / "release"
    cpus = subprocess.run(["sinfo", "-h", "-n", "node1", "-o", "%c"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    # Each member takes a whole node, so two run at once, one per node; each holds after its checkpoint
    # at step 16 until it is asked to stop or `release` exists.
    result = run_module("job.submit", *LONG, f"data.root={data_root}", f"run.dir={sweep_dir}", "wandb.mode=disabled",
                        "job.cluster=slurm", f"job.cpus_per_task={cpus}", "--sweep", "trainer.seed=0,1,2,3",
                        env={**HOLD_AT, "MNIST_ADD_TEST_RELEASE": str(release)})
    assert result.returncode == 0, result.stderr[-3000:]
    array = re.search(r"submitted array\(s\) (\d+)\n", result.stdout).group(1)
    members = {info["job_id"]: name for name, info in json.loads((sweep_dir / "sweep.json").read_text())["members"].items()}
    held = wait_until(lambda: len(r := running_tasks(array)) == 2 and
                      all(newest_step(sweep_dir / members[task]) >= 16 for task in r) and r, "two members to hold")
    victim = next(task for task, node in held.items() if node == "node1")  # urgent holds node1 alone
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", cpus, "--output=/dev/null", "--wrap", "true"],
                            capture_output=True, text=True, check=True).stdout.strip()
    wait_until(lambda: sacct_states(urgent)[-1:] == ["COMPLETED"], "the urgent job to run and end")
    release.touch()

    assert wait_for_tasks(array, 4) == {f"{array}_{i}": "COMPLETED" for i in range(4)}
    runs = {task: sacct_states(task) for task in members}
    assert runs.pop(victim)[0] in ("PREEMPTED", "REQUEUED") and all(r == ["COMPLETED"] for r in runs.values()), runs
    reference = tmp_path / "reference"
    seed = members[victim].rpartition("-")[2]
    done = run_module("mnist_add.train", *LONG, f"data.root={data_root}", f"run.dir={reference}", "wandb.mode=disabled",
                      f"trainer.seed={seed}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(sweep_dir / members[victim])["resumed_from"] is not None
    assert_bitwise_equal(final_weights(sweep_dir / members[victim]), final_weights(reference))
    for task in runs:  # the others: never stopped, every batch of their own sequence trained on once
        seed = members[task].rpartition("-")[2]
        assert summary(sweep_dir / members[task])["resumed_from"] is None
        assert summary(sweep_dir / members[task])["fingerprint"] == expected_fingerprint(
            data_root, "data.train_samples=1024", "trainer.epochs=2", f"trainer.seed={seed}")


def test_record_jobs_adds_to_the_sweep_index(tmp_path):
    result = plan(tmp_path)
    sweep.record_jobs(result, {"heads-joint_seed-0": "7_0", "heads-joint_seed-1": "7_1"})
    sweep.record_jobs(result, {"heads-joint_seed-1": "9"})  # resubmitted: the newer job counts
    index = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert index == {"name": "sw", "members": {"heads-joint_seed-0": {"job_id": "7_0"},
                                                "heads-joint_seed-1": {"job_id": "9"}}}
    assert [p.name for p in (tmp_path / "sw").iterdir()] == ["sweep.json"]  # no temporary file left


def test_a_member_whose_recorded_job_is_still_queued_is_not_submitted_again(tmp_path):
    sweep.record_jobs(plan(tmp_path), {"heads-joint_seed-0": "7_0", "heads-joint_seed-1": "7_1",
                                       "heads-joint_seed-2": "7_2"})
    states = {"7_0": "PENDING", "7_1": "FAILED", "7_2": "RUNNING"}
    asked = []
    result = sweep.plan(["debug"], [f"run.dir={tmp_path / 'sw'}"], AXES, SubmitConfig,
                        job_states=lambda ids: asked.append(ids) or states)
    assert asked == [["7_0", "7_1", "7_2"]]
    assert [m.name for m in result.running] == ["heads-joint_seed-0", "heads-joint_seed-2"]
    assert [m.name for m in result.to_run][:1] == ["heads-joint_seed-1"] and len(result.to_run) == 4  # failed: rerun
