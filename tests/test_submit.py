"""job.submit without a cluster: what it says before it submits anything (test_slurm and test_sweep submit to one)."""

from job.submit import main


def test_without_slurm_a_submission_says_so_in_one_line_and_names_the_local_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun on it
    assert main(["--config", "debug", f"run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == ("error: there is no SLURM here (no srun on PATH): submit from a node of a SLURM "
                                       "cluster, or run the job as processes on this machine with job.cluster=local\n")
    assert not (tmp_path / "run").exists()
