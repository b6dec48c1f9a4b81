"""Submit the training job to SLURM (or run it locally) with submitit.

    python -m job.submit [--config FILE ...] [key=value ...] [--wait]
    python -m job.submit --config debug job.cluster=local job.tasks_per_node=2 --wait
    python -m job.submit --sweep model.heads=joint,separate trainer.seed=0,1,2 [--config F] [key=value ...]

After --sweep, an item with one value (key=value) is a plain override, as before it.

One SLURM task per GPU (or per CPU worker), each task one rank; every task runs the same
`mnist_add.train.train(cfg)` as the command line. On the preemption or time-limit signal the
ranks stop together at a step boundary with a checkpoint, and the job is requeued; it then
resumes from the run directory and continues the same W&B run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import submitit
import torch
from omegaconf import DictConfig

from job import sweep
from job.cluster import SweepIndexError
from mnist_add.config import (Config, ConfigError, build_parser, load_config, ranged, refuse, training_config,
                              upgraded)
from mnist_add.rundir import SUMMARY_NAME, RunDirError, summary_line
from mnist_add.train import setup_logging, train


class Cluster(str, Enum):
    slurm = "slurm"
    local = "local"  # tasks as local processes: try the job without a cluster
    debug = "debug"  # in this process, one task: for a debugger


@dataclass
class JobConfig:
    cluster: Cluster = Cluster.slurm
    nodes: int = ranged(1, ge=1)
    gpus_per_node: int = ranged(0, ge=0)  # 0: a CPU job
    tasks_per_node: int = ranged(1, ge=1)  # ranks per node; with GPUs, one per GPU (set to gpus_per_node)
    cpus_per_task: int = ranged(1, ge=1)
    mem_gb: int = ranged(0, ge=0)  # per node (0: the partition's default)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    timeout_min: int = ranged(60, ge=1)  # time limit of each run of the job
    signal_delay_s: int = ranged(120, ge=0)  # the warning signal (USR2) comes this long before the time limit
    max_num_timeout: int = ranged(3, ge=0)  # requeues after reaching the time limit (preemptions do not count)
    name: str = "mnist-add"
    log_dir: str | None = None  # submitit's logs and pickles (default: <run.dir>/submitit)
    # A sweep: at most this many members run at once; locally, also no more than the CPUs hold (trainer.num_threads)
    array_parallelism: int = ranged(4, ge=1)
    max_array_size: int = ranged(0, ge=0)  # a sweep: members per SLURM array (0: the cluster's MaxArraySize)


@dataclass
class SubmitConfig(Config):
    job: JobConfig = field(default_factory=JobConfig)


def nccl_failure_env(run_dir: str) -> dict[str, str]:
    """NCCL settings under which a rank whose peer hangs or dies ends after dist.timeout_s (the watchdog tears the
    process down) and first dumps its flight recorder into run_dir/nccl-trace/rank_N (`torchfrtrace` reads them).
    Also in slurm/train.sbatch; no effect on gloo."""
    return {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_BUFFER_SIZE": "2000",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(run_dir) / "nccl-trace" / "rank_")}


class Trainer(submitit.helpers.Checkpointable):
    """What every task runs: a picklable holder of the config around the same `train(cfg)`.

    submitit's own USR2 handler would checkpoint on rank 0 alone, inside the handler, maybe in the
    middle of a step. So `train` replaces it for its duration; the ranks stop together at a step
    boundary with a checkpoint, and only then is the signal handed back to submitit, which
    requeues the job (`checkpoint()` returns this same callable: resuming reads the run directory).
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __call__(self) -> dict:
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        for name, value in nccl_failure_env(self.cfg.run.dir).items():
            os.environ.setdefault(name, value)  # before the process group exists; the user's own settings win
        if torch.cuda.is_available():
            Path(os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
        setup_logging(env.rank)
        summary = train(upgraded(self.cfg))  # pickled at submission: a job queued across an upgrade still runs
        preempt_signal = submitit.JobEnvironment._usr_sig()
        if summary["status"] == "stopped" and preempt_signal.name in summary["reasons"]:
            signal.getsignal(preempt_signal)(preempt_signal, None)  # submitit: requeue, then exit
        return summary


def build_executor(cfg: JobConfig, run_dir: str) -> submitit.AutoExecutor:
    tasks = cfg.gpus_per_node or cfg.tasks_per_node
    # A local job's files are named by its process id: no folder per job, which submitit would create as `%j`.
    per_job = "%j" if cfg.cluster == Cluster.slurm else ""
    executor = submitit.AutoExecutor(folder=cfg.log_dir or str(Path(run_dir) / "submitit" / per_job),
                                     cluster=cfg.cluster.value, slurm_max_num_timeout=cfg.max_num_timeout)
    slurm_only = {"partition": cfg.partition, "account": cfg.account, "qos": cfg.qos, "constraint": cfg.constraint}
    executor.update_parameters(
        name=cfg.name, nodes=cfg.nodes, tasks_per_node=tasks, cpus_per_task=cfg.cpus_per_task,
        gpus_per_node=cfg.gpus_per_node, timeout_min=cfg.timeout_min, **({"mem_gb": cfg.mem_gb} if cfg.mem_gb else {}),
        slurm_signal_delay_s=cfg.signal_delay_s,
        **{f"slurm_{key}": value for key, value in slurm_only.items() if value},
    )
    return executor


def validate(cfg: JobConfig) -> None:
    """SLURM may send the warning up to a minute early; one that comes during start-up kills the task."""
    if cfg.signal_delay_s > cfg.timeout_min * 60 - 60:
        raise ConfigError(f"job.signal_delay_s={cfg.signal_delay_s} leaves less than a minute of the "
                          f"{cfg.timeout_min}-minute limit before the warning; lower it or raise job.timeout_min")


def check_slurm(cluster: Cluster) -> None:
    """submitit submits to SLURM with its commands; without them it would end in a traceback of its own."""
    if cluster == Cluster.slurm and shutil.which("srun") is None:
        raise ConfigError("there is no SLURM here (no srun on PATH): submit from a node of a SLURM cluster, or run the "
                          "job as processes on this machine with job.cluster=local")


def submit_sweep(plan: sweep.SweepPlan, cfg: JobConfig, wait: bool) -> int:
    """Each array of members to run as one SLURM job array; locally, as processes on this machine."""
    print(f"sweep {plan.name}: {len(plan.to_run)} to run, {len(plan.finished)} finished and "
          f"{len(plan.running)} queued or running (skipped)", flush=True)
    if not plan.to_run:
        return 0
    executor = build_executor(cfg, str(plan.directory))
    if cfg.cluster != Cluster.slurm:
        return run_locally(plan, executor, local_parallelism(cfg, plan))
    executor.update_parameters(slurm_array_parallelism=cfg.array_parallelism)
    jobs = []
    for members in sweep.split(plan.to_run, cfg.max_array_size or max_array_size()):
        with executor.batch():
            jobs += [executor.submit(Trainer(training_config(member.cfg))) for member in members]
    arrays = ",".join(dict.fromkeys(job.job_id.split("_")[0] for job in jobs))
    sweep.record_jobs(plan, {member.name: job.job_id for member, job in zip(plan.to_run, jobs)})
    print(f"submitted array(s) {arrays}\n" +
          "".join(f"  {m.name}: job {j.job_id}, logs {j.paths.stderr}\n" for m, j in zip(plan.to_run, jobs)) +
          f"  follow: squeue -j {arrays}; sacct -X -j {arrays}\n  compare: python -m mnist_add.compare {plan.directory}")
    return 1 if wait and say_ends(plan.to_run, jobs, len(jobs)) else 0


def local_parallelism(cfg: JobConfig, plan: sweep.SweepPlan) -> int:
    """Members at once without a scheduler: no more than this machine's CPUs hold, each member's ranks with their
    threads (torch's default takes every CPU), and at most job.array_parallelism."""
    cpus = len(os.sched_getaffinity(0))
    threads = max(member.cfg.trainer.num_threads or cpus for member in plan.to_run)
    return max(1, min(cfg.array_parallelism, cpus // ((cfg.gpus_per_node or cfg.tasks_per_node) * threads)))


def run_locally(plan: sweep.SweepPlan, executor: submitit.AutoExecutor, parallelism: int) -> int:
    """The members as processes here, `parallelism` at a time (no scheduler holds the rest back): each one's log
    said as it starts, its end as it ends."""
    print(f"running {parallelism} at a time on this machine; compare: python -m mnist_add.compare {plan.directory}",
          flush=True)
    failed = done = 0
    for members in sweep.split(plan.to_run, parallelism):
        with executor.batch():
            jobs = [executor.submit(Trainer(training_config(member.cfg))) for member in members]
        for member, job in zip(members, jobs):
            print(f"  {member.name}: started, log {job.paths.stderr}", flush=True)
        failed += say_ends(members, jobs, len(plan.to_run), done)
        done += len(members)
    return 1 if failed else 0


def say_ends(members: list[sweep.Member], jobs: list, total: int, done: int = 0) -> int:
    """Wait for each member in turn and say how it ended, counted `N/TOTAL` on from `done`; how many failed."""
    failed = 0
    for number, (member, job) in enumerate(zip(members, jobs), start=done + 1):
        try:
            summary = job.results()[0]  # rank 0's
        except Exception as err:  # submitit re-raises the job's failure with its traceback
            failed += 1
            print(f"{number}/{total} {member.name} (job {job.job_id}) failed:\n{err}", file=sys.stderr, flush=True)
            continue
        ended = summary_line(summary) if summary.get("status") == "completed" else summary.get("status")
        print(f"{number}/{total} {member.name}: {ended}", flush=True)
    return failed


def max_array_size() -> int:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return sweep.parse_max_array_size(config)


def read_command_line(argv: list[str] | None) -> tuple[argparse.Namespace, DictConfig, sweep.SweepPlan | None]:
    """The arguments, the validated config and, with --sweep, the sweep's plan; submits nothing. A mistake raises
    ConfigError or RunDirError (argparse's own exit 2 for a malformed command line)."""
    parser = build_parser("job.submit", __doc__.splitlines()[0])
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its summary")
    parser.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="key=v1,v2",
                        help="one run per combination of the values, under run.dir, as SLURM job arrays")
    args = parser.parse_intermixed_args(argv)
    axes, trailing = sweep.separate_overrides(args.sweep)
    overrides = [*args.overrides, *trailing]
    cfg = load_config(args.config, overrides, schema=SubmitConfig)
    validate(cfg.job)
    return args, cfg, sweep.plan(args.config, overrides, axes, SubmitConfig) if axes else None


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg, sweep_plan = read_command_line(argv)
        check_slurm(cfg.job.cluster)  # after the command line's own mistakes, which say more
    except (ConfigError, RunDirError, SweepIndexError) as err:
        return refuse(err)
    if sweep_plan is not None:
        return submit_sweep(sweep_plan, cfg.job, args.wait)
    job = build_executor(cfg.job, cfg.run.dir).submit(Trainer(training_config(cfg)))
    print(f"submitted job {job.job_id}\n  logs: {job.paths.stdout} and {job.paths.stderr}\n"
          f"  follow: tail -f {job.paths.stderr}" + (f"   state: sacct -j {job.job_id}" if cfg.job.cluster == Cluster.slurm
                                                      else "") + f"\n  run dir: {cfg.run.dir}")
    if not args.wait:
        return 0
    try:
        summary = job.results()[0]  # rank 0's
    except Exception as err:  # submitit re-raises the job's failure with its traceback
        print(f"error: job {job.job_id} failed:\n{err}", file=sys.stderr)
        return 1
    if summary.get("status") != "completed":
        print(f"job {job.job_id} ended {summary.get('status')}: {json.dumps(summary)}")
        return 1
    print(f"job {job.job_id} completed at step {summary['step']} on {summary['world_size']} rank(s): "
          f"{summary_line(summary)}; all of it in {Path(cfg.run.dir) / SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
