"""W&B runs offline, every folder inside the test's tmp_path (see conftest.isolated_wandb)."""

import itertools
import json
import os
import signal
import socket
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import run_module, torchrun
from mnist_add import checkpoint
from mnist_add.config import WandbMode
from mnist_add.model import AddNet
from mnist_add.tracking import read_metrics, wandb_mode
from mnist_add.train import train
from wandb_records import offline_runs

STEP_KEYS = {"_step", "_runtime", "_timestamp"}
EXACT = ("trainer.epochs=2", "trainer.save_every_steps=4", "trainer.keep_checkpoints=100")


def scalar_rows(run):
    """History rows as {step: {key: value}}, the per-class table left out."""
    skip = STEP_KEYS | {"test/per_class"}
    return {row["_step"]: {k: v for k, v in row.items() if k not in skip} for row in run["history"]
            if set(row) - skip}


def jsonl_rows(run_dir):
    rows = {}
    for record in read_metrics(run_dir):
        rows.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k != "step"})
    return rows


def test_wandb_mirrors_metrics_jsonl_per_task(make_cfg, tmp_path):
    cfg = make_cfg("wandb.mode=offline")
    train(cfg)
    [run] = offline_runs(tmp_path / "run")
    assert run["exit_code"] == 0 and run["config"]["model"]["arch"] == "convnet"
    assert scalar_rows(run) == jsonl_rows(tmp_path / "run")
    last = scalar_rows(run)[16]
    for key in ("train/loss_digit", "train/loss_sum", "train/loss", "train/acc_digit", "train/acc_sum",
                "val/loss_digit", "val/loss_sum", "val/acc_digit", "val/acc_sum", "val/acc_both",
                "val/acc_sum_given_digit", "test/acc_sum", "best/test/acc_sum", "lr", "samples_per_s", "epoch"):
        assert key in last, key
    assert run["summary"]["val/acc_sum"]["max"] == last["val/acc_sum"]  # validation summarises as its best
    assert run["summary"]["test/acc_sum"] == last["test/acc_sum"]  # the test set as the final weights' score
    assert run["history"][-1]["test/per_class"]["_type"] == "table-file"  # the final per-class accuracy table


def test_a_resumed_run_continues_the_same_run_id_and_steps(make_cfg, tmp_path):
    train(make_cfg("wandb.mode=offline", "trainer.max_steps=8"))
    saved_id = checkpoint.load(tmp_path / "run/checkpoints/step-00000008.pt")[checkpoint.TRACKING_RUN_ID]
    train(make_cfg("wandb.mode=offline"))
    first, second = offline_runs(tmp_path / "run")
    assert first["run_id"] == second["run_id"] == saved_id
    first_steps, second_steps = sorted(scalar_rows(first)), sorted(scalar_rows(second))
    assert first_steps == [4, 8] and second_steps == [12, 16]
    assert {**scalar_rows(first), **scalar_rows(second)} == jsonl_rows(tmp_path / "run")


def test_steps_trained_again_after_a_crash_are_not_logged_twice(make_cfg, tmp_path):
    cfg = make_cfg("wandb.mode=offline", *EXACT)
    train(cfg)
    for path in sorted((tmp_path / "run/checkpoints").glob("step-*.pt"))[4:]:
        path.unlink()  # as if it crashed after step 20 with everything up to step 32 already logged
    (tmp_path / "run/summary.json").unlink()
    train(cfg)
    first, second = offline_runs(tmp_path / "run")
    assert sorted(scalar_rows(first)) == list(range(4, 33, 4))
    assert scalar_rows(second) == {}  # steps 20..32 were recomputed, bitwise equal, and not re-logged


def test_only_rank_zero_writes_metrics_and_creates_a_run(data_root, tmp_path, isolated_wandb):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path / 'run'}",
                        "wandb.mode=offline", launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = offline_runs(tmp_path / "run")
    assert run["exit_code"] == 0
    assert not list(isolated_wandb.rglob("offline-run-*"))  # no other rank wrote anywhere else
    # Each record once: training every 4 of the 16 steps, the validation at the epoch's end, the test at the end.
    kinds = Counter((r["step"], next(k for k in ("train", "val", "test") if f"{k}/acc_sum" in r))
                    for r in read_metrics(tmp_path / "run"))
    assert kinds == {(4, "train"): 1, (8, "train"): 1, (12, "train"): 1, (16, "train"): 1, (16, "val"): 1,
                     (16, "test"): 1}
    # And each is rank 0's: its timings equal those of the W&B run, which only rank 0 has.
    assert scalar_rows(run) == jsonl_rows(tmp_path / "run")


@pytest.fixture
def network_attempts(monkeypatch):
    """Every name lookup or connection this process tries, refused and recorded (the code under test
    may swallow the refusal; the record stays)."""
    attempts = []

    def refuse(what):
        def attempt(*args, **kwargs):
            attempts.append((what, args))
            raise ConnectionRefusedError(f"no network in this test ({what})")
        return attempt

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def test_auto_is_offline_without_credentials_and_online_with_a_key_without_touching_the_network(
        monkeypatch, network_attempts):
    assert wandb_mode(WandbMode.auto) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbMode.auto) == "online"
    assert network_attempts == []


def test_auto_is_online_with_a_key_in_netrc(isolated_wandb, network_attempts):
    netrc = isolated_wandb / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'y' * 40}\n")
    netrc.chmod(0o600)
    assert wandb_mode(WandbMode.auto) == "online"
    assert network_attempts == []


def test_wandb_mode_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(WandbMode.offline) == "disabled"


def test_disabled_writes_nothing(make_cfg, tmp_path, isolated_wandb):
    train(make_cfg("wandb.mode=disabled"))
    assert not list(tmp_path.rglob("*.wandb")) and not (tmp_path / "run" / "wandb").exists()
    assert not [p for p in isolated_wandb.rglob("*") if p.is_file()]


def test_online_start_that_fails_continues_offline(make_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key, but no server answers here
    summary = train(make_cfg("wandb.mode=online", "wandb.init_timeout_s=1"))
    assert summary["status"] == "completed"
    assert "continuing offline" in caplog.text
    [run] = offline_runs(tmp_path / "run")
    assert scalar_rows(run) == jsonl_rows(tmp_path / "run")


@contextmanager
def during_step(step: int, action):
    """Run `action()` inside the forward pass of training step `step` (counted from 1 in this process)."""
    forwards = itertools.count(1)

    def hook(module, inputs, output):
        if isinstance(module, AddNet) and module.training and next(forwards) == step:
            action()

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_a_stop_signal_checkpoints_that_step_and_finishes_the_run(make_cfg, tmp_path):
    unhandled = []  # SIGTERMs that reached the test's own handler: training did not take them
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: unhandled.append(signum))
    try:
        with during_step(6, lambda: os.kill(os.getpid(), signal.SIGTERM)):
            summary = train(make_cfg("wandb.mode=offline", "trainer.agree_every_steps=1"))  # agree every step
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert unhandled == [] and summary["status"] == "stopped" and summary["step"] == 6, summary
    saved = Path(summary["checkpoint"])
    assert saved == tmp_path / "run/checkpoints/step-00000006.pt"
    assert checkpoint.load(saved)[checkpoint.PROGRESS]["step"] == 6
    [run] = offline_runs(tmp_path / "run")
    assert run["complete"] and run["exit_code"] == 0
    assert sorted(scalar_rows(run)) == [4]  # logged up to the stop; nothing after it


def test_an_exception_finishes_the_run_as_failed(make_cfg, tmp_path):
    def fail():
        raise RuntimeError("out of memory, say")

    with during_step(6, fail), pytest.raises(RuntimeError, match="out of memory"):
        train(make_cfg("wandb.mode=offline"))
    [run] = offline_runs(tmp_path / "run")
    assert run["complete"] and run["exit_code"] == 1


def test_damaged_lines_of_metrics_jsonl_are_moved_aside_on_relaunch_and_nothing_is_lost(make_cfg, tmp_path, caplog):
    train(make_cfg("trainer.max_steps=8"))
    metrics = tmp_path / "run/metrics.jsonl"
    good = metrics.read_bytes().splitlines(keepends=True)
    damage = [b"\x00\xffbinary\n", b'{"step": "four"}\n', b"[1]\n"]
    metrics.write_bytes(good[0] + b"".join(damage) + b"".join(good[1:]) + b'{"step": 9, "cut')  # and a cut last line
    assert read_metrics(tmp_path / "run") == [json.loads(line) for line in good]
    assert "skipped 3 line(s) that are not records" in caplog.text
    train(make_cfg())
    assert (tmp_path / "run/metrics.jsonl.damaged").read_bytes() == b"".join(damage)
    assert "3 line(s) that are not records moved to" in caplog.text
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert steps == [4, 8, 12, 16]


def test_a_relaunch_over_an_all_binary_metrics_jsonl_trains_on(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=8"))
    (tmp_path / "run/metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    assert train(make_cfg())["status"] == "completed"
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "train/loss" in r] == [12, 16]
