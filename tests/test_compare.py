"""mnist_add.compare on crafted run directories: statistics, grouping, partial sweeps, JSON and figures."""

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import run_module
from mnist_add.compare import compare, curve_band, draw_accuracy, draw_curves, job_states, main, member_status
from mnist_add.config import load_config, to_dict
from mnist_add.rundir import RunDirLock

# (heads, seed) -> test accuracies (digit, sum, both), wall time, and the test sum accuracy at steps 8 and 16
RESULTS = {
    ("joint", 0): ((0.90, 0.80, 0.70), 10.0, (0.50, 0.80)),
    ("joint", 1): ((0.92, 0.84, 0.74), 12.0, (0.60, 0.84)),
    ("joint", 2): ((0.94, 0.82, 0.78), 14.0, (0.70, 0.82)),
    ("separate", 0): ((0.96, 0.90, 0.88), 20.0, (0.65, 0.90)),
    ("separate", 1): ((0.98, 0.94, 0.92), 30.0, (0.75, 0.94)),
}


def write_run(run_dir: Path, heads: str, seed: int, *, completed: bool = True, **extra: str) -> Path:
    """A run directory as mnist_add.train leaves it, written by hand: config.yaml, metrics.jsonl, summary.json."""
    run_dir.mkdir(parents=True)
    cfg = load_config(["debug"], [f"run.dir={run_dir}", f"model.heads={heads}", f"trainer.seed={seed}",
                                  *(f"{key}={value}" for key, value in extra.items())])
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))
    (accuracies, wall_time, curve) = RESULTS.get((heads, seed), ((0.5, 0.5, 0.5), 1.0, (0.1, 0.2)))
    records = [{"step": 4, "train/loss": 1.0, "time_s": 1.0}]
    records += [{"step": step, "val/acc_sum": acc, "time_s": 2.0} for step, acc in zip((8, 16), curve)]
    records = records if completed else records[:2]  # stopped after its first evaluation
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if completed:
        keys = ("acc_digit", "acc_sum", "acc_both")  # validation 1 point lower than test, best.pt 0.5 higher
        test, val, best_test = ({key: acc + offset for key, acc in zip(keys, accuracies)}
                                for offset in (0, -0.01, 0.005))
        (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "step": 16, "test": test, "val": val,
                                                          "best": {"step": 8, "val": val, "test": best_test},
                                                          "segment_wall_time_s": wall_time}))
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Two groups (heads joint: 3 seeds, separate: 2 seeds completed), one member running, one that failed.
    Members also differ in operational keys (wandb.group, trainer.num_threads), which must not split groups."""
    root = tmp_path / "sweep"
    for (heads, seed) in RESULTS:
        write_run(root / f"heads-{heads}_seed-{seed}", heads, seed, **{"trainer.num_threads": seed + 1,
                                                                          "wandb.group": f"g{seed}"})
    write_run(root / "heads-separate_seed-2", "separate", 2, completed=False)
    write_run(root / "heads-separate_seed-3", "separate", 3, completed=False)
    return root


def by_heads(groups):
    return {group.values["model.heads"]: group for group in groups}


def test_members_are_grouped_by_the_differing_key_only(sweep):
    result = compare([sweep])
    keys, groups = result.keys, result.groups
    assert keys == ["model.heads"]  # not trainer.seed, trainer.num_threads, wandb.group or run.dir
    groups = by_heads(groups)
    assert sorted(groups) == ["joint", "separate"]
    assert [m.path.name for m in groups["joint"].completed] == [f"heads-joint_seed-{s}" for s in range(3)]
    assert len(groups["separate"].completed) == 2 and len(groups["separate"].members) == 4


def test_group_statistics_are_the_mean_and_sample_std_over_seeds(sweep):
    stats = by_heads(compare([sweep]).groups)["joint"].stats()
    for index, name in enumerate(("acc_digit", "acc_sum", "acc_both")):
        values = [RESULTS[("joint", seed)][0][index] for seed in range(3)]
        assert stats[name]["mean"] == pytest.approx(statistics.fmean(values))
        assert stats[name]["std"] == pytest.approx(statistics.stdev(values))
    assert stats["acc_sum"] == {"mean": pytest.approx(0.82), "std": pytest.approx(0.02)}
    assert stats["wall_time_s"] == {"mean": pytest.approx(12.0), "std": pytest.approx(2.0)}


def test_two_keys_that_differ_make_a_group_per_combination(tmp_path):
    write_run(tmp_path / "a", "joint", 0)
    write_run(tmp_path / "b", "joint", 1, **{"optim.lr": 0.001})
    write_run(tmp_path / "c", "separate", 0, **{"optim.lr": 0.001})
    result = compare([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    keys, groups = result.keys, result.groups
    assert keys == ["model.heads", "optim.lr"]
    assert [tuple(g.values.values()) for g in groups] == [("joint", 0.005), ("joint", 0.001), ("separate", 0.001)]


def test_a_single_group_has_no_std_and_no_keys(tmp_path):
    result = compare([write_run(tmp_path / "run", "joint", 0)])
    keys, groups = result.keys, result.groups
    assert keys == [] and len(groups) == 1
    assert groups[0].stats()["acc_digit"] == {"mean": pytest.approx(0.90), "std": None}


def test_running_and_unfinished_members_are_listed_and_left_out(sweep, capsys):
    lock = RunDirLock(sweep / "heads-separate_seed-3")
    lock.acquire()  # as the job that trains it holds it
    try:
        assert main([str(sweep), "--json"]) == 0
    finally:
        lock.release()
    printed = json.loads(capsys.readouterr().out)
    assert {Path(e["dir"]).name: e["status"] for e in printed["excluded"]} == {
        "heads-separate_seed-2": "unfinished", "heads-separate_seed-3": "running"}
    separate = next(g for g in printed["groups"] if g["values"] == {"model.heads": "separate"})
    assert separate["n"] == 2 and separate["acc_both"]["mean"] == pytest.approx(0.90)


def test_json_gives_every_group_with_its_statistics(sweep, capsys):
    assert main([str(sweep), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["keys"] == ["model.heads"]
    assert [(g["values"]["model.heads"], g["n"]) for g in printed["groups"]] == [("joint", 3), ("separate", 2)]
    assert printed["groups"][1]["wall_time_s"] == {"mean": pytest.approx(25.0), "std": pytest.approx(50 ** 0.5)}
    assert "segment_wall_time_s" in printed["wall_time"]


def test_the_table_shows_mean_and_std_in_percent(sweep, capsys):
    assert main([str(sweep), "--out", str(sweep / "figs")]) == 0
    out = capsys.readouterr().out
    joint = next(line for line in out.splitlines() if line.startswith("joint"))
    assert joint.split()[:5] == ["joint", "3", "92.00", "±", "2.00"]  # digit: mean 92%, std 2%
    assert "82.00 ± 2.00" in joint and "12.0 ± 2.0" in joint
    assert "unfinished: " in out and "heads-separate_seed-2 (left out)" in out


def test_figures_are_pngs_and_plot_the_group_values(sweep, capsys):
    assert main([str(sweep)]) == 0
    for name in ("accuracy.png", "curves.png"):
        with Image.open(sweep / "compare" / name) as image:
            assert image.format == "PNG" and image.width > 100
            image.load()
    groups = compare([sweep]).groups
    accuracy_axes = draw_accuracy(groups).axes
    digit = accuracy_axes[0]
    assert [bar.lines[0].get_ydata()[0] for bar in digit.containers] == pytest.approx([92.0, 97.0])  # the group means
    error_bar = digit.containers[0].lines[2][0].get_segments()[0]  # joint's vertical bar: mean ± std
    assert [y for _, y in error_bar] == pytest.approx([90.0, 94.0])
    curves = draw_curves(groups).axes[0]
    joint_line = curves.lines[0]
    assert list(joint_line.get_xdata()) == [8, 16]
    assert list(joint_line.get_ydata()) == pytest.approx([60.0, 82.0])
    band = curves.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(50.0) and max(band) == pytest.approx(84.0)


def test_curve_band_uses_only_steps_every_member_reached(sweep):
    members = by_heads(compare([sweep]).groups)["separate"].members  # two completed, two stopped at step 8
    steps, mean, std = curve_band(members)
    assert steps == [8] and mean[0] == pytest.approx((0.65 + 0.75 + 0.1 + 0.1) / 4)


def test_a_directory_without_runs_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty" / "nothing").mkdir(parents=True)
    result = run_module("mnist_add.compare", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "holds no run" in result.stderr


@pytest.mark.parametrize("summary, lock_held, job_state, status", [
    ({"status": "completed"}, False, "failed", "completed"),  # the summary is the last word
    ({}, True, None, "running"),
    ({}, False, "running", "running"),
    ({}, False, "pending", "pending"),
    ({}, False, "failed", "failed"),
    ({"status": "stopped"}, False, None, "unfinished"),
    ({}, False, None, "unfinished"),  # no job state known: stopped, or ended without a summary
])
def test_a_member_without_a_completed_summary_is_named_by_its_lock_or_job_state(summary, lock_held, job_state,
                                                                               status):
    assert member_status(summary, lock_held, job_state) == status


def test_members_of_sweep_json_that_have_not_started_are_listed_apart(sweep, capsys):
    index = {"name": "sweep", "members": {"heads-joint_seed-9": {"job_id": "999999999_9"},
                                          "heads-joint_seed-0": {"job_id": "999999999_0"}}}
    (sweep / "sweep.json").write_text(json.dumps(index))
    result = compare([sweep])
    assert [m.path.name for m in result.unstarted] == ["heads-joint_seed-9"]
    assert result.keys == ["model.heads"] and len(result.groups) == 2  # no group of members without a config
    assert main([str(sweep)]) == 0
    assert "unfinished: " + str(sweep / "heads-joint_seed-9") + " (left out)" in capsys.readouterr().out


def test_the_job_states_of_a_sweep_come_from_the_hook_that_job_registers(sweep, monkeypatch):
    (sweep / "sweep.json").write_text(json.dumps({"name": "sweep", "members": {
        "heads-separate_seed-2": {"job_id": "7_2"}, "heads-separate_seed-3": {"job_id": "7_3"},
        "heads-joint_seed-9": {"job_id": "7_9"}}}))
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 0, stdout="7_2|FAILED\n7_[3,9]|PENDING\n"))  # sacct, as job.cluster asks it
    assert job_states(sweep) == {"heads-separate_seed-2": "failed", "heads-separate_seed-3": "pending",
                                 "heads-joint_seed-9": "pending"}
    excluded = {m.path.name: m.status for m in compare([sweep]).excluded}
    assert excluded == {"heads-separate_seed-2": "failed", "heads-separate_seed-3": "pending",
                        "heads-joint_seed-9": "pending"}


@pytest.mark.parametrize("score, offset, label", [("test", 0, "test"), ("val", -0.01, "validation"),
                                                  ("best-test", 0.005, "best.pt test")])
def test_the_score_compared_is_the_final_test_score_unless_asked_for_another(sweep, capsys, score, offset, label):
    old = write_run(sweep / "heads-joint_seed-5", "joint", 5)  # written before validation existed
    summary = json.loads((old / "summary.json").read_text())
    (old / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in ("val", "best")}))
    result = compare([sweep], *([score] if score != "test" else []))
    sums = [0.80, 0.84, 0.82] + ([0.5] if score == "test" else [])  # the old run has a test score only
    assert by_heads(result.groups)["joint"].stats()["acc_sum"]["mean"] == pytest.approx(statistics.fmean(sums) + offset)
    assert main([str(sweep), "--score", score]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model.heads  n  {label} digit %")
    assert (f"no {label} score: {old} (left out)" in out) == (score != "test")
    assert draw_accuracy(result.groups, score).axes[0].get_title() == f"{label} digit accuracy (%)"


def test_the_accuracy_figure_says_its_bars_are_one_std_and_shares_one_axis(sweep):
    figure = draw_accuracy(compare([sweep]).groups)
    assert "± 1 std over seeds" in figure.get_suptitle()
    figure.canvas.draw()
    assert len({ax.get_ylim() for ax in figure.axes}) == 1  # groups compare across digit, sum and both alike


def test_members_that_evaluated_once_show_a_mean_with_its_bar_and_each_member(tmp_path):
    for seed in range(3):
        run = write_run(tmp_path / f"seed-{seed}", "joint", seed)
        records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"] != 8]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # step 16 alone
    ax = draw_curves(compare([tmp_path / f"seed-{seed}" for seed in range(3)]).groups).axes[0]
    [bar] = ax.containers
    assert list(bar.lines[0].get_ydata()) == pytest.approx([82.0])  # the mean of 80, 84, 82
    assert [y for _, y in bar.lines[2][0].get_segments()[0]] == pytest.approx([80.0, 84.0])  # ± 1 std
    assert sorted(ax.lines[0].get_ydata()) == pytest.approx([80.0, 82.0, 84.0])  # each member
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all\nn=3, step 16"]


@pytest.mark.parametrize("damage, said", [
    (lambda path: path.write_bytes(b"\x00\xff\xfe binary"), "is not text (byte 1 is not UTF-8)"),
    (lambda path: path.write_text('{"status": "compl'), "is not valid JSON"),
    (lambda path: path.write_text("[1, 2]"), "holds [1, 2], not a JSON object"),
    (lambda path: path.write_text(json.dumps({"status": "completed", "test": {"acc_digit": "high"}})),
     "holds 'high' at test.acc_digit, where a number from 0 to 1 belongs"),
    (lambda path: path.write_text(json.dumps({"status": "completed", "test": [0.9]})),
     "holds [0.9] at test, where an object of scores belongs"),
    (lambda path: path.write_text('{"status": "completed", "test": {"acc_digit": 1e999}}'), "holds inf at test"),
    (os.mkfifo, "is a FIFO (named pipe), not a file"),  # never opened: that would wait for a writer
])
def test_a_damaged_summary_leaves_its_member_out_with_a_warning_and_the_others_are_compared(damage, said, sweep, capsys):
    damaged = sweep / "heads-joint_seed-2" / "summary.json"
    damaged.unlink()
    damage(damaged)
    assert main([str(sweep), "--json"]) == 0
    printed, err = capsys.readouterr()
    assert err.startswith(f"warning: {damaged} {said}") and err.endswith("; heads-joint_seed-2 is left out\n"), err
    assert err.count("\n") == 1
    result = json.loads(printed)
    assert {"dir": str(damaged.parent), "status": "damaged"} in result["excluded"]
    assert [(g["values"]["model.heads"], g["n"]) for g in result["groups"]] == [("joint", 2), ("separate", 2)]


def test_a_damaged_config_yaml_leaves_its_member_out_with_a_warning(sweep, capsys):
    damaged = sweep / "heads-joint_seed-2" / "config.yaml"
    damaged.write_text("model: &m {heads: joint}\nloss: *m\n")  # an alias: refused, never expanded
    assert main([str(sweep)]) == 0
    printed, err = capsys.readouterr()
    assert err == f"warning: config file {damaged} uses the YAML alias *m: aliases are not allowed, as a few can " \
                  f"expand into billions of values; write the values out; heads-joint_seed-2 is left out\n"
    assert f"damaged: {damaged.parent} (left out)" in printed


def test_a_damaged_sweep_index_leaves_the_job_states_unknown_with_a_warning(sweep, capsys):
    (sweep / "sweep.json").write_bytes(b"\x89binary")
    assert main([str(sweep)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: sweep index {sweep}/sweep.json is not text") and err.count("\n") == 1, err
    assert err.endswith(f"the job states of {sweep} are unknown\n")
