"""What the cluster says about our jobs: SLURM's state of each job (sacct), and the sweep index that
records which job runs which member of a sweep."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from mnist_add.files import UnreadableFile, present, read_json

SWEEP_INDEX = "sweep.json"  # in a sweep directory: {"name": ..., "members": {member name: {"job_id": ...}}}
# SLURM job states (sacct) of a member without a completed summary, by what mnist_add.compare calls them
SLURM_STATUS = {"RUNNING": "running", "COMPLETING": "running", "PENDING": "pending", "REQUEUED": "pending",
                "SUSPENDED": "pending", "FAILED": "failed", "CANCELLED": "failed", "TIMEOUT": "failed",
                "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed"}


class SweepIndexError(ValueError):
    """A sweep.json that cannot be read; the message names it and what to do."""


def read_index(sweep_dir: Path) -> dict[str, str]:
    """{member name: SLURM job id} from the sweep's sweep.json; empty without one. A damaged one raises
    SweepIndexError rather than being taken as empty, which would submit again members whose jobs still run."""
    path = sweep_dir / SWEEP_INDEX
    if not present(path):
        return {}
    try:
        index = read_json(path)
    except UnreadableFile as err:
        raise SweepIndexError(f"sweep index {err}; {_INDEX_FIX}") from None
    members = index.get("members") if isinstance(index, dict) else None
    if not isinstance(members, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("job_id"), str)
                                                for entry in members.values()):
        raise SweepIndexError(f"sweep index {path} is not of the form {{\"members\": {{name: {{\"job_id\": \"...\"}}}}}}; "
                              f"{_INDEX_FIX}")
    return {name: entry["job_id"] for name, entry in members.items()}


_INDEX_FIX = ("it records the SLURM job of each member: restore it, or delete it (members whose jobs are still queued "
              "are then submitted again)")


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: its SLURM state now}, from sacct; empty where SLURM does not answer. Asked by array (sacct
    shows an array's pending tasks only as one line of the array, such as `7_[2-5%2]`)."""
    if not job_ids:
        return {}
    arrays = ",".join(dict.fromkeys(job.split("_")[0] for job in job_ids))
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", arrays],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {task: state.split()[0] for job, state in (line.split("|", 1) for line in out.splitlines() if "|" in line)
              for task in array_tasks(job)}
    return {job: states[job] for job in job_ids if job in states}


def array_tasks(job: str) -> list[str]:
    """sacct's job ids, one line of pending array tasks made into the tasks: `7_[2-4,6%2]` -> 7_2, 7_3, 7_4, 7_6."""
    found = re.fullmatch(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]", job)
    if found is None:
        return [job]
    tasks = []
    for part in found.group(2).split(","):
        first, _, last = part.partition("-")
        tasks += [f"{found.group(1)}_{i}" for i in range(int(first), int(last or first) + 1)]
    return tasks


def member_states(sweep_dir: Path, job_states=slurm_states) -> dict[str, str | None]:
    """{member name: running, pending, failed, or None where SLURM does not say} for each member sweep.json
    records; `job_states` asks SLURM (slurm_states). mnist_add.compare's hook (pyproject.toml's entry points)."""
    jobs = read_index(sweep_dir)
    states = job_states(sorted(set(jobs.values())))
    return {name: SLURM_STATUS.get(states.get(job, "")) for name, job in jobs.items()}
