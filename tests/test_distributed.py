"""Real multi-process runs: torchrun on CPU with gloo, 2-3 ranks."""

import json
import logging
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch

from conftest import run_module, start_and_wait_for_checkpoint, torchrun, wait_until, worker_pid
from mnist_add import checkpoint
from mnist_add.checkpoint import Checkpointer
from mnist_add.config import ConfigError, DistConfig
from mnist_add.distributed import (RankZeroNeverCame, StopSignals, choose_device, explain_collective_failure,
                                   launcher_ranks, local_world_size, rendezvous_env, setup, stop_signals,
                                   wait_for_rank_zero)

# 64 steps on 2 ranks; a job started by start_long_job holds after its checkpoint at step HOLD until a
# rank is asked to stop, and then stops at the next step where the ranks agree, STOP (a log step).
LONG = ("data.train_samples=1024", "trainer.epochs=2", "trainer.save_every_steps=8", "trainer.log_every_steps=4",
        "trainer.deterministic=true")
HOLD, STOP = 16, 20
SEED_NET = ("model.arch=seed", "model.sum_head=free", "model.addend_dim=20", "model.channels_last=false", "data.augment=false",
            "data.train_samples=2048", "trainer.epochs=2", "trainer.deterministic=true")


def train_args(data_root, run_dir, *overrides):
    return ("--config", "debug", f"data.root={data_root}", f"run.dir={run_dir}", *overrides)


def launch(data_root, run_dir, *overrides, nproc=1, max_restarts=0):
    launcher = torchrun(nproc, max_restarts) if nproc > 1 else ()
    result = run_module("mnist_add.train", *train_args(data_root, run_dir, *overrides), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def final_checkpoint(run_dir):
    return checkpoint.load(Checkpointer(Path(run_dir) / "checkpoints", 1, False).step_paths()[0])


def final_weights(run_dir):
    return final_checkpoint(run_dir)[checkpoint.MODEL]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def start_long_job(data_root, run_dir, nproc, max_restarts=0):
    """The long job on `nproc` ranks, returned running and holding after its checkpoint at step HOLD."""
    return start_and_wait_for_checkpoint(train_args(data_root, run_dir, *LONG), run_dir, step=HOLD,
                                         launcher=torchrun(nproc, max_restarts))


def step_files(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step-*.pt"))


def gone(pid: int) -> bool:
    """Exited (a zombie that nobody reaped yet counts: it runs no code)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def assert_stopped_with_one_checkpoint(output, run_dir, reason):
    assert output.count("stopping on") == 1 and f"stopping on {reason} at step {STOP}" in output, output[-3000:]
    assert step_files(run_dir) == [f"step-{HOLD:08d}.pt", f"step-{STOP:08d}.pt"]
    assert not (Path(run_dir) / "summary.json").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root):
    """The reference: the long job on 2 ranks, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    launch(data_root, run_dir, *LONG, nproc=2)
    return run_dir


def test_two_ranks_train_on_the_single_process_sample_sequence(seed_net_on_one_rank, data_root, tmp_path):
    launch(data_root, tmp_path / "two", *SEED_NET, nproc=2)
    one, two = summary(seed_net_on_one_rank), summary(tmp_path / "two")
    assert two["world_size"] == 2 and two["fingerprint"] == one["fingerprint"]
    for key in ("acc_digit", "acc_sum"):
        assert two["test"][key] == pytest.approx(one["test"][key], abs=0.01)
    # Without BatchNorm, DDP's averaged gradient equals the single-process one up to rounding.
    for name, tensor in final_weights(seed_net_on_one_rank).items():
        assert torch.allclose(final_weights(tmp_path / "two")[name], tensor, atol=1e-4), name


@pytest.mark.parametrize("split, pairs", [("test", 10_000), ("val", 256)])
def test_sharded_evaluation_counts_do_not_depend_on_the_world_size(uninterrupted, data_root, split, pairs):
    best = str(uninterrupted / "checkpoints" / "best.pt")
    results = []
    for nproc in (1, 3):  # 3 ranks: shards of unequal size
        launcher = torchrun(nproc) if nproc > 1 else ()
        result = run_module("mnist_add.evaluate", "--checkpoint", best, "--json", "--data-root", data_root,
                            "--split", split, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        results.append(json.loads(result.stdout.strip().splitlines()[-1]))
    if split == "val":  # the split the 2-rank training chose best.pt on, rebuilt alike on 1, 2 and 3 ranks
        assert results[0]["acc_sum"] == summary(uninterrupted)["best"]["val"]["acc_sum"]
    for other in results[1:]:
        assert other["pairs"] == pairs
        for key in ("acc_digit", "acc_sum", "acc_both", "acc_sum_given_digit"):
            assert other[key] == results[0][key], key  # ratios of identical integer counts
        assert other["loss_sum"] == results[0]["loss_sum"] and other["loss_digit"] == results[0]["loss_digit"]


def test_a_killed_rank_is_restarted_and_the_job_ends_bitwise_equal(uninterrupted, data_root, tmp_path):
    process = start_long_job(data_root, tmp_path, nproc=2, max_restarts=1)
    victim = worker_pid(process.pid, rank=1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "resumed from" in output  # the restarted ranks continued from a checkpoint
    assert summary(tmp_path)["resumed_from"] is not None
    assert_bitwise_equal(final_weights(tmp_path), final_weights(uninterrupted))
    assert summary(tmp_path)["test"] == summary(uninterrupted)["test"]


# Each stop signal once, each target twice: the agent forwards whatever it gets alike, and a worker tells the others
# alike whatever it got (every stop signal's handler: the test below).
@pytest.mark.parametrize("target, signum", [("agent", signal.SIGINT), ("agent", signal.SIGUSR1),
                                            ("worker", signal.SIGHUP), ("worker", signal.SIGUSR2)],
                         ids=lambda value: getattr(value, "name", value))
def test_a_stop_signal_to_the_agent_or_a_worker_saves_one_checkpoint_and_a_relaunch_ends_bitwise_equal(
        uninterrupted, data_root, tmp_path, signum, target):
    process = start_long_job(data_root, tmp_path, nproc=2)
    workers = [worker_pid(process.pid, rank) for rank in (0, 1)]
    # The agent forwards it to every worker (--signals-to-handle); a worker alone tells the others at the
    # next step.
    os.kill(process.pid if target == "agent" else workers[1], signum)
    output, _ = process.communicate(timeout=300)
    # torchrun itself exits 1 with a traceback after forwarding a signal (it re-raises it); the workers do not.
    assert process.returncode == (1 if target == "agent" else 0), output[-3000:]
    assert output.count("Traceback") == output.count("SignalException: Process") == (target == "agent")
    assert_stopped_with_one_checkpoint(output, tmp_path, signum.name)
    assert all(gone(pid) for pid in workers)

    launch(data_root, tmp_path, *LONG, nproc=2)
    assert summary(tmp_path)["resumed_from"].endswith(f"step-{STOP:08d}.pt")
    assert_bitwise_equal(final_weights(tmp_path), final_weights(uninterrupted))


def test_workers_whose_agent_is_killed_stop_with_a_checkpoint(uninterrupted, data_root, tmp_path):
    process = start_long_job(data_root, tmp_path, nproc=2)
    workers = [worker_pid(process.pid, rank) for rank in (0, 1)]
    os.kill(process.pid, signal.SIGKILL)  # as the OOM killer would: nothing is forwarded
    process.wait(timeout=60)
    wait_until(lambda: all(gone(pid) for pid in workers), "the orphaned workers to exit", timeout=300)
    output = process.stdout.read()  # the workers' output: they inherited the agent's stdout
    assert_stopped_with_one_checkpoint(output, tmp_path, "the death of the torchrun agent")

    launch(data_root, tmp_path, *LONG, nproc=2)
    assert_bitwise_equal(final_weights(tmp_path), final_weights(uninterrupted))


@pytest.fixture(scope="module")
def seed_net_on_one_rank(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("seed-net")
    launch(data_root, run_dir, *SEED_NET)
    return run_dir


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resuming_on_another_world_size_continues_the_same_samples(seed_net_on_one_rank, data_root, tmp_path, first,
                                                                   then):
    launch(data_root, tmp_path / "moved", *SEED_NET, "trainer.max_steps=40", nproc=first)  # stops mid-epoch 1
    launch(data_root, tmp_path / "moved", *SEED_NET, nproc=then)
    whole, moved = summary(seed_net_on_one_rank), summary(tmp_path / "moved")
    assert moved["resumed_from"].endswith("step-00000040.pt") and moved["world_size"] == then
    assert moved["fingerprint"] == whole["fingerprint"]
    assert moved["test"]["acc_sum"] == pytest.approx(whole["test"]["acc_sum"], abs=0.01)


def test_weight_averaging_on_two_ranks_resumes_mid_average_bitwise_equal(data_root, tmp_path):
    averaging = (*LONG, "optim.swa_epochs=1")  # epoch 2, steps 33 to 64, averages
    launch(data_root, tmp_path / "whole", *averaging, nproc=2)
    launch(data_root, tmp_path / "cut", *averaging, "trainer.max_steps=48", nproc=2)  # half way through the average
    launch(data_root, tmp_path / "cut", *averaging, nproc=2)
    whole, cut = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "cut")
    assert whole[checkpoint.AVERAGE]["n_averaged"] == 32
    for key in (checkpoint.MODEL, checkpoint.AVERAGE):
        assert_bitwise_equal(cut[key], whole[key])
    assert summary(tmp_path / "cut")["test"] == summary(tmp_path / "whole")["test"]


def test_a_corrupt_newest_checkpoint_is_skipped_on_every_rank(uninterrupted, data_root, tmp_path):
    launch(data_root, tmp_path, *LONG, "trainer.max_steps=24", nproc=2)
    newest = Checkpointer(tmp_path / "checkpoints", 1, False).step_paths()[0]
    assert newest.name == "step-00000024.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = launch(data_root, tmp_path, *LONG, nproc=2)
    assert "skipping checkpoint" in result.stderr and "step-00000024.pt is truncated or corrupt" in result.stderr
    assert summary(tmp_path)["resumed_from"].endswith("step-00000016.pt")
    assert_bitwise_equal(final_weights(tmp_path), final_weights(uninterrupted))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cpu_trains_and_its_scaler_survives_a_resume(make_cfg, tmp_path, precision):
    from mnist_add.train import train
    whole = train(make_cfg(f"trainer.precision={precision}", "trainer.max_steps=12",
                           run_dir=tmp_path / "whole"))
    assert all(torch.isfinite(torch.tensor(v)) for v in whole["test"].values())
    train(make_cfg(f"trainer.precision={precision}", "trainer.max_steps=6", run_dir=tmp_path / "cut"))
    resumed = train(make_cfg(f"trainer.precision={precision}", "trainer.max_steps=12", run_dir=tmp_path / "cut"))
    assert resumed["resumed_from"].endswith("step-00000006.pt")
    saved = {name: checkpoint.load(tmp_path / name / "checkpoints/step-00000012.pt") for name in ("whole", "cut")}
    assert saved["cut"][checkpoint.SCALER] == saved["whole"][checkpoint.SCALER]
    if precision == "fp16":
        assert saved["cut"][checkpoint.SCALER]["scale"] > 0 and saved["cut"][checkpoint.SCALER]["_growth_tracker"] > 0
    assert_bitwise_equal(saved["cut"][checkpoint.MODEL], saved["whole"][checkpoint.MODEL])


def test_a_stop_signal_to_a_single_process_job_saves_and_a_relaunch_ends_bitwise_equal(data_root, tmp_path):
    args = train_args(data_root, tmp_path / "cut", *SEED_NET)
    process = start_and_wait_for_checkpoint(list(args), tmp_path / "cut", step=8)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and "stopping on SIGINT at step 12" in output, output[-3000:]
    launch(data_root, tmp_path / "cut", *SEED_NET)
    launch(data_root, tmp_path / "whole", *SEED_NET)
    assert_bitwise_equal(final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole"))


@pytest.mark.parametrize("signum", stop_signals({}), ids=lambda signum: signum.name)
def test_every_stop_signal_the_process_gets_is_its_reason_to_stop(signum):
    with StopSignals() as signals:
        os.kill(os.getpid(), signum)  # its handler has run once the next Python call begins
        assert signals.reason() == signum.name


def test_a_second_ctrl_c_aborts_at_once_and_a_third_is_ignored():
    before = signal.getsignal(signal.SIGINT)
    try:
        with StopSignals() as signals:
            signals._handle(signal.SIGINT, None)
            signals._handle(signal.SIGTERM, None)  # what torchrun sends after a Ctrl-C
            assert signals.reason() == "SIGINT"  # the first signal is the one named
            with pytest.raises(KeyboardInterrupt):
                signals._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # also after the handlers are put back
    finally:
        signal.signal(signal.SIGINT, before)


def test_submitits_preemption_signal_is_a_stop_signal_whatever_it_is_set_to():
    assert signal.SIGPWR in stop_signals({"SUBMITIT_PREEMPT_SIGNAL": "PWR"})
    assert signal.SIGUSR2 in stop_signals({}) and signal.SIGHUP in stop_signals({})


def test_a_worker_notices_the_death_of_its_torchrun_agent(monkeypatch):
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    signals = StopSignals({"TORCHELASTIC_RUN_ID": "x"})
    assert signals.reason() is None
    monkeypatch.setattr(os, "getppid", lambda: 1)  # reparented
    assert signals.reason() == StopSignals.AGENT_DIED
    assert StopSignals({}).reason() is None  # outside torchrun a parent's exit means nothing (nohup)


@pytest.mark.parametrize("ranks_here, num_gpus, devices", [
    (2, 2, ["cuda:0", "cuda:1"]),
    (4, 1, ["cuda:0"] * 4),  # more ranks than GPUs: gloo shares them round-robin
    (3, 2, ["cuda:0", "cuda:1", "cuda:0"]),
    (2, 0, ["cpu", "cpu"]),
])
def test_ranks_take_the_gpus_round_robin_and_the_cpu_without_one(ranks_here, num_gpus, devices):
    assert [str(choose_device(r, ranks_here, num_gpus, "gloo")) for r in range(ranks_here)] == devices


def test_nccl_with_more_ranks_than_gpus_is_one_line_that_names_the_three_fixes():
    assert str(choose_device(1, 2, 2, "nccl")) == "cuda:1"
    with pytest.raises(ConfigError) as refused:
        choose_device(0, 4, 1, "nccl")  # every rank refuses, rank 0 included: none waits for the others
    assert str(refused.value) == ("4 ranks on this node but 1 GPU(s), and NCCL runs one rank per GPU: launch "
                                  "--nproc_per_node=1, set dist.backend=gloo to share the GPUs, or choose the GPUs "
                                  "with CUDA_VISIBLE_DEVICES")


def test_a_node_runs_local_world_size_ranks_or_at_least_those_up_to_this_one():
    assert local_world_size({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3",
                             "SLURM_LOCALID": "1"}) == 2


def test_hidden_gpus_run_on_the_cpu_and_say_so(monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level(logging.INFO, logger="mnist_add")
    assert setup(DistConfig()).device == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == ["CUDA_VISIBLE_DEVICES is empty: running on the CPU"]


def test_a_mistake_every_rank_makes_is_said_once(data_root, tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path}",
                        "trainer.batch_size=33", launcher=torchrun(2))
    assert result.returncode != 0  # torchrun's, for workers that exit 2
    said = "trainer.batch_size=33 is the global batch and must divide evenly over 2 processes"
    assert result.stderr.count(said) == 1, result.stderr[-3000:]
    assert not (tmp_path / "config.yaml").exists()


TORCHRUN_ENV = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
SRUN_ENV = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_STEP_NODELIST": "node[0-1]", "SLURM_JOB_ID": "4321", "MASTER_ADDR": "node0"}


def test_the_environments_launchers_make_are_taken_as_they_are():
    assert launcher_ranks(TORCHRUN_ENV) == (5, 1, 8) and local_world_size(TORCHRUN_ENV) == 4
    assert rendezvous_env(TORCHRUN_ENV) == {"MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert launcher_ranks(SRUN_ENV) == (3, 1, 4) and local_world_size(SRUN_ENV) == 2
    assert rendezvous_env(SRUN_ENV) == {"MASTER_ADDR": "node0", "MASTER_PORT": str(20_000 + 4321)}
    assert rendezvous_env({**SRUN_ENV, "SLURM_JOB_ID": "4294967295"})["MASTER_PORT"] == str(20_000 + 7295)
    assert launcher_ranks({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}) == (0, 0, 1)  # one task: one process
    assert launcher_ranks({}) == (0, 0, 1)


@pytest.mark.parametrize("env, said", [
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 must be below WORLD_SIZE=2"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK=abc is not a whole number from 0 to 2147483647"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "-2"}, "WORLD_SIZE=-2 is not a whole number from 1"),
    ({"RANK": "0", "WORLD_SIZE": "9" * 5000}, "WORLD_SIZE=99999999999999999999... (5000 characters) is not a whole"),
    ({"RANK": " 1\n", "WORLD_SIZE": "2"}, r"RANK=' 1\n' is not a whole number"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 cannot exceed RANK=1"),
    ({**SRUN_ENV, "SLURM_PROCID": "4"}, "SLURM_PROCID=4 must be below SLURM_STEP_NUM_TASKS=4"),
    ({**SRUN_ENV, "SLURM_STEP_NUM_TASKS": ""}, "SLURM_STEP_NUM_TASKS='' is not a whole number from 1"),
    ({key: value for key, value in SRUN_ENV.items() if key != "SLURM_LOCALID"}, "SLURM_LOCALID is not set"),
])
def test_an_environment_no_launcher_makes_is_one_line_naming_the_variable(env, said):
    with pytest.raises(ConfigError) as refused:
        launcher_ranks(env)
    assert str(refused.value).startswith(said) and "\n" not in str(refused.value), str(refused.value)


@pytest.mark.parametrize("read, env, said", [
    # a node of more ranks than the job, or of fewer than its local rank
    (local_world_size, {**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": "1"}, "LOCAL_WORLD_SIZE=1 must exceed the local rank (1)"),
    (local_world_size, {**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": "9"},
     "LOCAL_WORLD_SIZE=9 must exceed the local rank (1) and be at most"),
    # a rendezvous address missing or malformed
    (rendezvous_env, {"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set, though WORLD_SIZE=2"),
    (rendezvous_env, {**TORCHRUN_ENV, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a whole number from 1 to 65535"),
    (rendezvous_env, {**TORCHRUN_ENV, "MASTER_ADDR": "two hosts"}, "MASTER_ADDR='two hosts' is not a host name or address"),
    (rendezvous_env, {**SRUN_ENV, "SLURM_JOB_ID": "x"}, "SLURM_JOB_ID=x is not a whole number"),
], ids=lambda value: getattr(value, "__name__", None))
def test_a_launcher_value_out_of_range_or_malformed_is_refused_before_any_rendezvous(read, env, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        read(env)


@pytest.mark.parametrize("env, said", [
    ({"RANK": "5", "WORLD_SIZE": "2"}, "error: RANK=5 must be below WORLD_SIZE=2"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "error: RANK=abc is not a whole number"),
    ({"WORLD_SIZE": "2"}, "error: WORLD_SIZE=2 is set but RANK is not"),  # it trained as one process
])
def test_a_launcher_mistake_ends_in_one_line_and_exit_2_before_any_rendezvous(env, said, data_root, tmp_path):
    result = run_module("mnist_add.train", *train_args(data_root, tmp_path / "run"), "trainer.max_steps=1",
                        env=env)
    assert result.returncode == 2 and said in result.stderr and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as probe:  # nobody listens on it once closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_lone_rank_0_ends_after_the_timeout_in_one_line_naming_the_rank_that_never_came(data_root, tmp_path):
    result = run_module("mnist_add.train", *train_args(data_root, tmp_path / "run"), "dist.timeout_s=1",
                        env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert re.search(r"rank 0 of 2 waited \d+ s \(dist.timeout_s\) for the other ranks to join it at MASTER_ADDR:"
                     r"MASTER_PORT, but rank 1 never came", result.stderr), result.stderr


def test_a_rank_whose_rank_0_never_listens_gives_up_after_the_timeout_in_one_line():
    port = free_port()
    with pytest.raises(RankZeroNeverCame) as gave_up:
        wait_for_rank_zero("127.0.0.1", port, 0.3, "rank 1 of 2")
    assert explain_collective_failure(gave_up.value) == str(gave_up.value)
    assert str(gave_up.value).startswith(f"rank 1 of 2 could not reach rank 0 at 127.0.0.1:{port} within 0.3 s "
                                         f"(dist.timeout_s): rank 0 never came")
