"""job.cluster: what SLURM says about a sweep's jobs, read from sacct (faked here; test_sweep asks the real one)."""

import json
import subprocess

import pytest

from job.cluster import SweepIndexError, member_states, slurm_states


def test_pending_array_tasks_have_their_state_though_sacct_shows_them_as_one_line(monkeypatch):
    asked = []

    def sacct(command, **kwargs):
        asked.append(command[command.index("-j") + 1])
        return subprocess.CompletedProcess(command, 0, stdout="7_0|COMPLETED\n7_1|RUNNING\n7_[2-4,6%2]|PENDING\n"
                                                              "9|FAILED\n")
    monkeypatch.setattr(subprocess, "run", sacct)
    assert slurm_states(["7_3", "7_6", "7_1", "9", "7_5"]) == {"7_3": "PENDING", "7_6": "PENDING",
                                                                 "7_1": "RUNNING", "9": "FAILED"}
    assert asked == ["7,9"]  # by array: `sacct -j 7_3` shows nothing while task 3 is pending


def test_each_recorded_member_is_named_by_its_slurm_state(tmp_path):
    slurm = {"RUNNING": "running", "COMPLETING": "running", "PENDING": "pending", "REQUEUED": "pending",
             "FAILED": "failed", "OUT_OF_MEMORY": "failed", "CANCELLED": "failed", "TIMEOUT": "failed",
             "COMPLETED": None}  # ended: its summary, or its absence, tells the rest
    jobs = {f"m{i}": f"7_{i}" for i in range(len(slurm) + 1)}  # the last: sacct does not know it
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "sw", "members": {
        name: {"job_id": job} for name, job in jobs.items()}}))
    states = dict(zip(jobs.values(), slurm))
    assert member_states(tmp_path, lambda ids: states) == {
        name: expected for name, expected in zip(jobs, [*slurm.values(), None])}


def test_a_folder_without_a_sweep_index_has_no_members(tmp_path):
    assert member_states(tmp_path, lambda ids: {}) == {}


@pytest.mark.parametrize("content, said", [
    (b"\x00\xff", "is not text"), (b'{"members": ', "is not valid JSON"),
    (b'{"members": {"m0": {"job_id": 7}}}', 'is not of the form {"members": {name: {"job_id": "..."}}}'),
])
def test_a_damaged_sweep_index_is_one_error_naming_it_not_a_sweep_without_jobs(content, said, tmp_path):
    (tmp_path / "sweep.json").write_bytes(content)
    with pytest.raises(SweepIndexError) as refused:
        member_states(tmp_path, lambda ids: {})
    assert str(refused.value).startswith(f"sweep index {tmp_path}/sweep.json {said}")
    assert str(refused.value).endswith("delete it (members whose jobs are still queued are then submitted again)")
