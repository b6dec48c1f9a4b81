"""Compare runs across seeds: the members of sweeps (or single runs), grouped by what they compute.

    python -m mnist_add.compare DIR [DIR ...] [--score test|val|best-test] [--out DIR] [--json]

Each DIR is a run directory (it holds config.yaml, summary.json, metrics.jsonl) or a sweep directory
whose sub-folders are run directories. Members are grouped by every config key whose value differs
between them, except the seed (trainer.seed) and keys that do not change what is computed
(`mnist_add.rundir.OPERATIONAL_KEYS`). Per group it prints n and mean ± std (over seeds, sample std) of
the digit, sum and both accuracy of summary.json (--score: the final weights' test score by default, their
validation score, or best.pt's test score), and of the wall time: summary.json's
`segment_wall_time_s`, the wall time of the segment that completed the run (the whole run unless it
was resumed). Members without a completed summary.json are listed and left out of the statistics:
running (a job holds the run directory's lock, or the scheduler says so), pending or failed (the scheduler's
state of the member's job, which the launcher that submitted the sweep tells through the `mnist_add.job_states`
hook: `job/` registers SLURM's), or unfinished (stopped, or no job state known).

Writes into --out (default: the first DIR's compare/) and prints the paths written:
    accuracy.png    per accuracy, each group's mean with a ± std error bar
    curves.png      validation sum accuracy over steps (metrics.jsonl), per group the mean with a ± std band
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from mnist_add.config import ConfigError, cli_parser, flatten, read_yaml, refuse
from mnist_add.files import UnreadableFile, present, read_json
from mnist_add.rundir import CONFIG_NAME, LOCK_NAME, METRICS_NAME, OPERATIONAL_KEYS, SUMMARY_NAME, is_running
from mnist_add.tracking import read_metrics

SEED_KEY = "trainer.seed"
ACCURACIES = ("acc_digit", "acc_sum", "acc_both")  # keys of each score in summary.json
# --score: where in summary.json a member's score is, and what it is called
SCORES = {"test": (("test",), "test"), "val": (("val",), "validation"), "best-test": (("best", "test"), "best.pt test")}
WALL_TIME = "wall_time_s"  # from summary["segment_wall_time_s"]
STATISTICS = (*ACCURACIES, WALL_TIME)
CURVE_METRIC = "val/acc_sum"
RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, METRICS_NAME, LOCK_NAME)  # any of them marks a run directory
# Entry-point group of the launchers' hooks `f(sweep_dir) -> {member name: "pending" | "running" | "failed" | None}`,
# one entry per member the launcher submitted (None: the scheduler does not say). job/ registers SLURM's
# (pyproject.toml), so this package asks no scheduler itself.
JOB_STATES_HOOK = "mnist_add.job_states"



class CompareError(ValueError):
    """The input holds nothing to compare; the message says what was expected."""


@dataclass
class Member:
    """One run directory of a sweep: its config (flat keys), its state, and its results when completed."""
    path: Path
    config: dict[str, Any]
    status: str  # completed, running, pending, failed, unfinished, or "no <score> score" (a run from before it)
    results: dict[str, float] = field(default_factory=dict)  # STATISTICS keys, completed members only


@dataclass
class Group:
    """The members that share the values of the keys that differ, and their statistics over seeds."""
    values: dict[str, Any]
    members: list[Member]

    @property
    def completed(self) -> list[Member]:
        return [m for m in self.members if m.status == "completed"]

    def stats(self) -> dict[str, dict[str, float | None]]:
        return {name: mean_std([m.results[name] for m in self.completed]) for name in STATISTICS}


@dataclass
class Comparison:
    keys: list[str]  # the config keys that differ between members (seed and operational keys aside)
    groups: list[Group]
    unstarted: list[Member]  # no config.yaml yet: queued, or failed before training started
    score: str = "test"  # a key of SCORES: which score of summary.json the statistics are over

    @property
    def excluded(self) -> list[Member]:
        """Every member left out of the statistics."""
        return [m for group in self.groups for m in group.members if m.status != "completed"] + self.unstarted


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation; None where there are too few values for it."""
    return {"mean": statistics.mean(values) if values else None,  # exact: a sum past the largest float is no error
            "std": statistics.stdev(values) if len(values) > 1 else None}


# --- finding and reading members --------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def member_dirs(path: Path, submitted: list[str]) -> list[Path]:
    """The run directory itself, or the run directories directly inside a sweep directory (and the `submitted`
    members that have not started yet)."""
    if is_run_dir(path):
        return [path]
    found = {child for child in path.iterdir() if is_run_dir(child)} if path.is_dir() else set()
    members = sorted(found | {path / name for name in submitted})
    if not members:
        raise CompareError(f"{path} holds no run: expected a run directory (with {CONFIG_NAME} or {SUMMARY_NAME}) "
                           f"or a sweep directory of them")
    return members


def job_states(sweep_dir: Path) -> dict[str, str | None]:
    """{member name: its job's state} for every member a launcher submitted into sweep_dir, from the hooks."""
    states: dict[str, str | None] = {}
    for hook in entry_points(group=JOB_STATES_HOOK):
        try:
            states.update(hook.load()(sweep_dir))
        except ValueError as err:  # a record the launcher cannot read (job.cluster's: a damaged sweep.json)
            print(f"warning: {err}; the job states of {sweep_dir} are unknown", file=sys.stderr)
    return states


def member_status(summary: dict, lock_held: bool, job_state: str | None) -> str:
    if summary.get("status") == "completed":
        return "completed"
    if lock_held:
        return "running"
    return job_state or "unfinished"


def read_member(path: Path, job_state: str | None = None, score: str = "test") -> Member:
    """A member as its files say; one whose config.yaml or summary.json is damaged is left out with a warning naming
    the file, and the comparison goes on: the other members' statistics are what the user came for."""
    try:
        config, summary = read_run_files(path)
        status = member_status(summary, is_running(path), job_state)
        results = completed_results(summary, path / SUMMARY_NAME, score) if status == "completed" else None
    except (ConfigError, UnreadableFile) as err:
        print(f"warning: {err}; {path.name} is left out", file=sys.stderr)
        return Member(path, {}, "damaged")
    if status != "completed":
        return Member(path, config, status)
    if results is None:  # a run from before validation existed, or one that held nothing out
        return Member(path, config, f"no {SCORES[score][1]} score")
    return Member(path, config, status, results)


def read_run_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run directory's config (flat keys) and summary, each empty when the run has not written it yet."""
    config_path, summary_path = path / CONFIG_NAME, path / SUMMARY_NAME
    config = flatten(OmegaConf.to_container(read_yaml(config_path))) if present(config_path) else {}
    summary = read_json(summary_path) if present(summary_path) else {}
    if not isinstance(summary, dict):
        raise UnreadableFile(f"{summary_path} holds {_brief(summary)}, not a JSON object")
    return config, summary


def completed_results(summary: dict[str, Any], path: Path, score: str) -> dict[str, float] | None:
    """The STATISTICS of a completed summary, None without the score asked for; UnreadableFile for a value that is
    not a number in its range."""
    scores = summary
    for key in SCORES[score][0]:
        scores = scores.get(key) or {}
        if not isinstance(scores, dict):
            raise UnreadableFile(f"{path} holds {_brief(scores)} at {key}, where an object of scores belongs")
    if not scores:
        return None
    found = {name: (scores.get(name), ".".join([*SCORES[score][0], name]), 1.0) for name in ACCURACIES}
    found[WALL_TIME] = (summary.get("segment_wall_time_s"), "segment_wall_time_s", sys.float_info.max)
    for value, key, most in found.values():
        if type(value) not in (int, float) or not 0 <= value <= most:
            raise UnreadableFile(f"{path} holds {_brief(value)} at {key}, where a number from 0 to {most:g} belongs")
    return {name: float(value) for name, (value, _, _) in found.items()}


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}..."


# --- grouping ---------------------------------------------------------------------------------------


def compared_keys(members: list[Member]) -> list[str]:
    """The config keys whose values differ between members, other than the seed and operational keys."""
    configs = [m.config for m in members if m.config]
    keys = sorted({key for config in configs for key in config})
    return [key for key in keys if key != SEED_KEY and not key.startswith(OPERATIONAL_KEYS)
            and len({repr(config.get(key)) for config in configs}) > 1]


def group_members(members: list[Member]) -> tuple[list[str], list[Group]]:
    """Members grouped by the values of the keys that differ, in order of first appearance."""
    keys = compared_keys(members)
    groups: dict[tuple, Group] = {}
    for member in members:
        values = {key: member.config.get(key) for key in keys}
        groups.setdefault(tuple(repr(v) for v in values.values()), Group(values, [])).members.append(member)
    return keys, list(groups.values())


# --- output -----------------------------------------------------------------------------------------


def to_json(comparison: Comparison, figures: list[Path]) -> dict:
    keys, groups = comparison.keys, comparison.groups
    return {"keys": keys, "score": comparison.score,
            "wall_time": "summary.json segment_wall_time_s: the segment that completed each run",
            "groups": [{"values": group.values, "n": len(group.completed),
                        "members": [str(m.path) for m in group.completed], **group.stats()} for group in groups],
            "excluded": [{"dir": str(m.path), "status": m.status} for m in comparison.excluded],
            "figures": [str(path) for path in figures]}


def format_stat(stat: dict[str, float | None], scale: float, digits: int) -> str:
    if stat["mean"] is None:
        return "–"
    std = "–" if stat["std"] is None else f"{scale * stat['std']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {std}"


def format_table(comparison: Comparison) -> str:
    keys, groups = comparison.keys, comparison.groups
    label = SCORES[comparison.score][1]
    header = [*(keys or ["runs"]), "n", f"{label} digit %", "sum %", "both %", "wall time s"]
    rows = []
    for group in groups:
        stats = group.stats()
        rows.append([*([str(v) for v in group.values.values()] or ["all"]), str(len(group.completed)),
                     *(format_stat(stats[name], 100, 2) for name in ACCURACIES),
                     format_stat(stats[WALL_TIME], 1, 1)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines += [f"{m.status}: {m.path} (left out)" for m in comparison.excluded]
    return "\n".join(lines)


def group_label(group: Group) -> str:
    return ", ".join(f"{key.rpartition('.')[2]}={value}" for key, value in group.values.items()) or "all"


def new_figure(cols: int, size: tuple[float, float], sharey: bool = False):
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, cols, squeeze=False, sharey=sharey)[0]


def draw_accuracy(groups: list[Group], score: str = "test") -> Figure:
    """One panel per accuracy, on one shared axis: each group's mean over seeds with a ± 1 std error bar (none for
    n < 2)."""
    figure, axes = new_figure(len(ACCURACIES), (4 * len(ACCURACIES), 4), sharey=True)
    figure.suptitle("mean ± 1 std over seeds (sample std; n seeds per group)")
    shown = [group for group in groups if group.completed]
    for ax, name in zip(axes, ACCURACIES):
        for x, group in enumerate(shown):
            stat = group.stats()[name]
            ax.errorbar([x], [100 * stat["mean"]], yerr=[100 * (stat["std"] or 0)], fmt="o", capsize=4,
                        label=f"{group_label(group)} (n={len(group.completed)})")
        ax.set(title=f"{SCORES[score][1]} {name.removeprefix('acc_')} accuracy (%)", xticks=range(len(shown)),
               xticklabels=[f"{group_label(group)}\nn={len(group.completed)}" for group in shown])
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(True, axis="y", alpha=0.3)
    return figure


def curve_band(members: list[Member]) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) of the validation sum accuracy over members, at the steps every member evaluated."""
    curves = [{r["step"]: r[CURVE_METRIC] for r in read_metrics(m.path) if CURVE_METRIC in r}
              for m in members if (m.path / METRICS_NAME).is_file()]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    stats = [mean_std([curve[step] for curve in curves]) for step in steps]
    return steps, [s["mean"] for s in stats], [s["std"] or 0.0 for s in stats]


def draw_single_evaluations(figure: Figure, ax, bands: list) -> Figure:
    for index, (group, (steps, mean, std)) in enumerate(bands):
        color, points = f"C{index % 10}", member_points(group.completed, steps[0])
        ax.plot([index - 0.1] * len(points), [100 * v for v in points], "o", color=color, alpha=0.5, markersize=4)
        ax.errorbar([index + 0.1], [100 * mean[0]], yerr=[100 * std[0]], fmt="s", color=color, capsize=6)
    ax.set(title="validation sum accuracy (%) at the one evaluation\nmembers (dots); mean ± 1 std over seeds",
           xticks=range(len(bands)),
           xticklabels=[f"{group_label(g)}\nn={len(g.completed)}, step {s[0]}" for g, (s, _, _) in bands])
    ax.grid(True, axis="y", alpha=0.3)
    return figure


def member_points(members: list[Member], step: int) -> list[float]:
    """Each member's validation sum accuracy at `step`."""
    return [r[CURVE_METRIC] for m in members for r in read_metrics(m.path) if r["step"] == step and CURVE_METRIC in r]


def draw_curves(groups: list[Group]) -> Figure:
    """Validation sum accuracy over steps: per group the mean over seeds and a ± 1 std band. Where every member
    evaluated once, a curve would be a dot: each group is then a column of its members' points beside their mean
    with a ± 1 std error bar."""
    figure, axes = new_figure(1, (7, 4.5))
    ax = axes[0]
    bands = [(group, curve_band(group.completed)) for group in groups]
    bands = [(group, band) for group, band in bands if band[0]]
    if bands and all(len(steps) == 1 for _, (steps, _, _) in bands):
        return draw_single_evaluations(figure, ax, bands)
    for index, (group, (steps, mean, std)) in enumerate(bands):
        color, label = f"C{index % 10}", f"{group_label(group)} (n={len(group.completed)})"
        ax.plot(steps, [100 * v for v in mean], "o-", color=color, markersize=3, label=label)
        ax.fill_between(steps, [100 * (m - s) for m, s in zip(mean, std)], [100 * (m + s) for m, s in zip(mean, std)],
                        color=color, alpha=0.2)
    ax.set(title="validation sum accuracy (%), mean ± 1 std over seeds", xlabel="step")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend()
    return figure


def write_figures(comparison: Comparison, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in (("accuracy.png", draw_accuracy(comparison.groups, comparison.score)),
                         ("curves.png", draw_curves(comparison.groups))):
        figure.savefig(out / name)
        written.append(out / name)
    return written


def compare(dirs: list[Path], score: str = "test") -> Comparison:
    members = []
    for directory in dirs:
        states = job_states(directory)
        members += [read_member(path, states.get(path.name), score) for path in member_dirs(directory, list(states))]
    keys, groups = group_members([m for m in members if m.config])
    return Comparison(keys, groups, [m for m in members if not m.config], score)


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("mnist_add.compare", __doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep or run directories")
    parser.add_argument("--score", choices=list(SCORES), default="test",
                        help="the final weights' test score (default), their validation score, or best.pt's test score")
    parser.add_argument("--out", type=Path, help="folder for the figures (default: the first DIR's compare/)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    try:
        comparison = compare(args.dirs, args.score)
        figures = write_figures(comparison, args.out or args.dirs[0] / "compare")
    except CompareError as err:
        return refuse(err)
    except OSError as err:  # a path too long, a folder that cannot be written
        return refuse(f"{err.filename}: {err.strerror}")
    if args.json:
        print(json.dumps(to_json(comparison, figures), indent=2))
    else:
        print(format_table(comparison))
        print("\n".join(str(path) for path in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
