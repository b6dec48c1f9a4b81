"""A sweep: the Cartesian product of lists of values, one training run per combination.

    python -m job.submit --sweep model.heads=joint,separate trainer.seed=0,1,2 [--config F] [key=value ...]

What is here decides what to run, and nothing more: the members and their names, their configs (each
the same config as a single job, with its own run directory `<run.dir>/<member name>` and the sweep's
W&B group), which are finished, and how the rest split into SLURM arrays no larger than the
cluster allows. `job.submit` submits them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from job.cluster import SWEEP_INDEX, member_states, slurm_states
from mnist_add.config import ConfigError, load_config, training_config
from mnist_add.rundir import completed_run, is_running

UNSWEPT_PREFIXES = ("run.", "job.")  # one run directory per member; one array shares one set of SLURM settings


@dataclass(frozen=True)
class Member:
    name: str  # e.g. heads-joint_seed-0, also the folder under the sweep's run.dir
    assignment: dict[str, str]  # the swept key=value pairs
    cfg: DictConfig  # the member's whole config: sweep defaults < its assignment < run dir and W&B group


@dataclass(frozen=True)
class SweepPlan:
    name: str  # the sweep's name: the W&B group of every member
    directory: Path  # holds one run directory per member
    to_run: list[Member]  # new or unfinished (resumed from their run directories)
    finished: list[Member]  # completed earlier with this same config: skipped
    running: list[Member]  # a job holds their run directory now, or their SLURM job is queued or running: skipped


def separate_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """What follows --sweep -> (axes, plain overrides): `--sweep model.heads=joint,separate trainer.epochs=2` sweeps
    the heads, and every member trains 2 epochs. An item with one value varies nothing: it is an override."""
    overrides = [item for item in items if re.fullmatch(r"[^=,]+=[^,]+", item)]
    axes = [item for item in items if item not in overrides]
    if items and not axes:
        raise ConfigError(f"--sweep {' '.join(items)} varies nothing; give a key two or more values, e.g. "
                          f"trainer.seed=0,1,2")
    return axes, overrides


def parse_axes(specs: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2,...` items -> {key: [v1, v2, ...]}, in the order given."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key:
            raise ConfigError(f"--sweep item {spec!r} is not key=value1,value2,...; e.g. trainer.seed=0,1,2")
        if key in axes:
            raise ConfigError(f"--sweep names {key} twice; give all its values in one item: {key}=a,b,c")
        if key.startswith(UNSWEPT_PREFIXES):
            raise ConfigError(f"--sweep cannot vary {key}: each member has its own run.dir under the sweep's, and "
                              f"one array shares the job.* settings; set it as a plain key=value instead")
        items = values.split(",")
        if not values or any(not item for item in items):
            raise ConfigError(f"--sweep {key} has an empty value in {values!r}; list values separated by commas, "
                              f"e.g. {key}=a,b")
        axes[key] = items
    return axes


def expand(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of one value per key, the last key varying fastest."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def member_name(assignment: dict[str, str]) -> str:
    """`{model.heads: joint, trainer.seed: 0}` -> `heads-joint_seed-0`: the last part of each key, unless two
    keys share it (then the whole key, dots as dashes); characters unsafe in a folder name become `-`."""
    short = [key.rpartition(".")[2] for key in assignment]
    parts = [f"{s if short.count(s) == 1 else key.replace('.', '-')}-{value}"
             for s, (key, value) in zip(short, assignment.items())]
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts))


def member_config(files: list[str], overrides: list[str], assignment: dict[str, str], sweep_dir: Path,
                  sweep_name: str, schema: type) -> DictConfig:
    """The member's config: validated as any config is, so a wrong key or type names itself."""
    name = member_name(assignment)
    placement = [f"run.dir={sweep_dir / name}", f"wandb.group={sweep_name}", f"wandb.name={sweep_name}/{name}"]
    return load_config(files, [*overrides, *(f"{k}={v}" for k, v in assignment.items()), *placement], schema)


def split(members: list, max_size: int) -> list[list]:
    """Consecutive chunks of at most max_size: one SLURM array each."""
    return [members[start:start + max_size] for start in range(0, len(members), max_size)]


def parse_max_array_size(scontrol_config: str) -> int:
    """The most tasks one array may have, from `scontrol show config` (array indices run 0..MaxArraySize-1)."""
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", scontrol_config, re.MULTILINE)
    if found is None:
        raise ConfigError("`scontrol show config` names no MaxArraySize; set job.max_array_size")
    return int(found.group(1))


def plan(files: list[str], overrides: list[str], axis_specs: list[str], schema: type,
         job_states=slurm_states) -> SweepPlan:
    """The members of the sweep and which of them to run: finished ones are skipped, and so are those whose job
    (recorded in sweep.json; `job_states` asks SLURM) is still queued or running; unfinished ones resume."""
    base = load_config(files, overrides, schema)
    sweep_dir = Path(base.run.dir)
    assignments = expand(parse_axes(axis_specs))
    members = [Member(member_name(a), a, member_config(files, overrides, a, sweep_dir, sweep_dir.name, schema))
               for a in assignments]
    if len({m.name for m in members}) < len(members):
        raise ConfigError(f"--sweep values give members the same folder name ({', '.join(m.name for m in members)}); "
                          f"use values that differ in letters, digits or . _ = + -")
    states = member_states(sweep_dir, job_states)
    to_run, finished, running = [], [], []
    for member in members:
        if completed_run(training_config(member.cfg)) is not None:
            finished.append(member)
        elif is_running(Path(member.cfg.run.dir)) or states.get(member.name) in ("running", "pending"):
            running.append(member)
        else:
            to_run.append(member)
    return SweepPlan(sweep_dir.name, sweep_dir, to_run, finished, running)


def record_jobs(plan: SweepPlan, job_ids: dict[str, str]) -> Path:
    """Add {member name: SLURM job id} to the sweep's sweep.json, where `mnist_add.compare` reads the states of
    members that have not completed (pending, running, failed). Written whole, then renamed: never half a file."""
    path = plan.directory / SWEEP_INDEX
    index = json.loads(path.read_text()) if path.is_file() else {"name": plan.name, "members": {}}
    index["members"].update({name: {"job_id": job} for name, job in job_ids.items()})
    plan.directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(index, indent=2) + "\n")
    partial.replace(path)
    return path
