"""job.submit without a cluster: what it says before it submits anything (test_slurm and test_sweep submit to one)."""

from job.submit import main


def test_without_slurm_a_submission_says_so_in_one_line_and_names_the_local_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun on it
    assert main(["--config", "debug", f"run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == ("error: there is no SLURM here (no srun on PATH): submit from a node of a SLURM "
                                       "cluster, or run the job as processes on this machine with job.cluster=local\n")
    assert not (tmp_path / "run").exists()


def test_a_damaged_sweep_index_is_one_line_naming_it_and_submits_nothing(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text('{"members": {"seed-0": ')  # cut short: which jobs run is unknown
    argv = ["--config", "debug", f"run.dir={sweep}", "job.cluster=local", "--sweep", "trainer.seed=0,1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: sweep index {sweep}/sweep.json is not valid JSON") and err.count("\n") == 1
    assert [path.name for path in sweep.iterdir()] == ["sweep.json"]
