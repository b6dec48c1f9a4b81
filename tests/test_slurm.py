"""On a real SLURM cluster (CI starts one on localhost with slurm/local/start.sh): submitit and
sbatch jobs on CPU with gloo, preempted, timed out and requeued."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, newest_step, run_module, subprocess_env, torchrun, wait_until
from mnist_add import checkpoint
from mnist_add.agreement import Agreement
from mnist_add.checkpoint import Checkpointer
from mnist_add.config import load_config
from mnist_add.data import GlobalBatchSampler, build_datasets
from mnist_add.distributed import StopSignals
from mnist_add.rundir import summary_line
from mnist_add.train import Progress
from wandb_records import offline_runs

# 64 steps on 2 ranks. With HOLD_AT=N in its environment a job holds after its checkpoint at step N until
# a rank is asked to stop (tests/hooks/sitecustomize.py): preempted or requeued there, whatever the speed.
LONG = ("--config", "debug", "data.train_samples=1024", "trainer.epochs=2", "trainer.save_every_steps=8",
        "trainer.log_every_steps=4", "trainer.deterministic=true", "trainer.num_threads=1")
HOLD_AT = {"MNIST_ADD_TEST_HOLD_AT": "16"}


@pytest.fixture(scope="module")
def slurm_cluster():
    """The cluster must answer; in CI its absence is a failure, elsewhere a reason to skip."""
    if shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
        return
    message = ("no SLURM cluster answers: start one as root on Debian with "
               "`MNIST_ADD_SLURM_NODES=2 bash slurm/local/start.sh && . slurm/local/env.sh`")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory, data_root):
    """The long job on 2 ranks under torchrun, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run_module("mnist_add.train", *LONG, f"data.root={data_root}", f"run.dir={run_dir}",
                        launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def submit(data_root, run_dir, *args, env=None) -> subprocess.CompletedProcess:
    return run_module("job.submit", *LONG, f"data.root={data_root}", f"run.dir={run_dir}", "job.cluster=slurm",
                      "job.tasks_per_node=2", "wandb.mode=offline", *args, env=env)


def job_id(output: str) -> str:
    return re.search(r"submitted job (\d+)", output).group(1)


def sacct_states(job: str) -> list[str]:
    """Every run of the job, oldest first (-D: requeued runs too)."""
    out = subprocess.run(["sacct", "-j", job, "-X", "-D", "-n", "-P", "-o", "State"], capture_output=True,
                         text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line]


def wait_for_job_end(job: str, timeout: float = 300) -> list[str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
    return wait_until(lambda: (s := sacct_states(job)) and s[-1] in ended and s, f"job {job} to end", timeout)


def final_weights(run_dir):
    return checkpoint.load(Checkpointer(Path(run_dir) / "checkpoints", 1, False).step_paths()[0])[checkpoint.MODEL]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def test_submitit_job_trains_like_torchrun(reference, data_root, tmp_path):
    result = submit(data_root, tmp_path, "--wait")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "submitted job" in result.stdout and "follow: tail -f" in result.stdout
    ours = summary(tmp_path)
    assert ours["world_size"] == 2 and ours["test"] == summary(reference)["test"]
    assert ours["fingerprint"] == summary(reference)["fingerprint"]
    assert result.stdout.endswith(f"completed at step {ours['step']} on 2 rank(s): {summary_line(ours)}; all of it "
                                  f"in {tmp_path / 'summary.json'}\n")  # one line, not the whole summary
    assert_bitwise_equal(final_weights(tmp_path), final_weights(reference))


def test_preempted_submitit_job_requeues_resumes_and_ends_bitwise_equal(reference, data_root, tmp_path):
    result = submit(data_root, tmp_path, env=HOLD_AT)
    assert result.returncode == 0, result.stderr
    job = job_id(result.stdout)
    wait_until(lambda: newest_step(tmp_path) >= 16, "the job to hold at step 16")
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", "2", "--output=/dev/null", "--wrap", "true"],
                            capture_output=True, text=True, check=True).stdout.strip()
    states = wait_for_job_end(job)
    assert states[0] in ("PREEMPTED", "REQUEUED") and states[-1] == "COMPLETED", states  # requeued by submitit
    assert sacct_states(urgent)[-1] == "COMPLETED"
    log = "".join(p.read_text() for p in tmp_path.glob(f"submitit/{job}/{job}_0_log.err"))
    assert "stopping on SIGUSR2" in log and "this job is preempted" in log
    assert summary(tmp_path)["resumed_from"] is not None
    assert_bitwise_equal(final_weights(tmp_path), final_weights(reference))
    segments = offline_runs(tmp_path)
    assert len(segments) == 2 and len({s["run_id"] for s in segments}) == 1  # one W&B run throughout


def expected_fingerprint(data_root, *overrides) -> int:
    """What a run of this data sequence must have trained on, computed without training."""
    cfg = load_config(["debug"], [f"data.root={data_root}", *overrides])
    dataset = build_datasets(cfg.data, cfg.trainer.seed, torch.device("cpu")).train
    sampler, progress = GlobalBatchSampler(dataset, cfg.trainer.batch_size, 1, 0, cfg.trainer.seed), Progress()
    agreement = Agreement(torch.device("cpu"))
    for epoch in range(cfg.trainer.epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for indices in sampler:
            progress.step += 1
            agreement.add(progress.step, indices, dataset.addends()[indices], loss=torch.zeros(()))
    agreement.agree(progress, StopSignals())
    return progress.fingerprint


def test_a_job_at_its_time_limit_checkpoints_requeues_and_completes(slurm_cluster, data_root, tmp_path):
    # The first run holds after its first checkpoint until SLURM's warning, due 60 s before the 2-minute
    # limit (SLURM checks limits every 30 s, so it lands 30-90 s into the run, after start-up); requeued,
    # the run resumes past the hold and completes, however fast or slow the machine.
    result = run_module("job.submit", *LONG, f"data.root={data_root}", f"run.dir={tmp_path}", "job.cluster=slurm",
                        "job.timeout_min=2", "job.signal_delay_s=60", "wandb.mode=offline",
                        env={"MNIST_ADD_TEST_HOLD_AT": "8"})
    assert result.returncode == 0, result.stderr
    states = wait_for_job_end(job_id(result.stdout), timeout=600)
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    assert summary(tmp_path)["fingerprint"] == expected_fingerprint(data_root, *LONG[2:])
    log = "".join(p.read_text() for p in tmp_path.glob("submitit/*/*_0_log.err"))
    assert "stopping on SIGUSR2 at step 12" in log and "this job is timed-out" in log


def test_sbatch_script_survives_scontrol_requeue(reference, data_root, tmp_path):
    env = subprocess_env(RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable, **HOLD_AT)
    job = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                          f"--output={tmp_path}/%j.out", str(REPO / "slurm/train.sbatch"), *LONG,
                          f"data.root={data_root}", "wandb.mode=disabled"],
                         capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout.strip()
    wait_until(lambda: newest_step(tmp_path / "run") >= 16, "the job to hold at step 16")
    subprocess.run(["scontrol", "requeue", job], check=True)
    states = wait_for_job_end(job)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    assert summary(tmp_path / "run")["resumed_from"] is not None
    assert summary(tmp_path / "run")["fingerprint"] == summary(reference)["fingerprint"]
    assert_bitwise_equal(final_weights(tmp_path / "run"), final_weights(reference))


def test_a_failing_job_surfaces_its_error_to_the_submitter(slurm_cluster, tmp_path):
    result = run_module("job.submit", "--config", "debug", f"data.root={tmp_path}", "data.download=false",
                        f"run.dir={tmp_path / 'run'}", "job.cluster=slurm", "--wait")
    assert result.returncode == 1
    assert "failed" in result.stderr and "MNIST not found" in result.stderr


def test_a_warning_that_could_come_during_start_up_is_refused(tmp_path):
    result = run_module("job.submit", "--config", "debug", f"run.dir={tmp_path}", "job.timeout_min=2",
                        "job.signal_delay_s=110")
    assert result.returncode == 2 and "job.signal_delay_s=110" in result.stderr
