import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

import mnist_add.train
from conftest import run_module
from mnist_add import checkpoint
from mnist_add.checkpoint import Checkpointer, CheckpointError
from mnist_add.config import load_config
from mnist_add.data import MNISTAdd
from mnist_add.distributed import Runtime
from mnist_add.scoring import evaluate, load_model
from mnist_add.rundir import RunDirError
from mnist_add.agreement import Agreement
from mnist_add.learner import build_learner
from mnist_add.step import TrainStep
from mnist_add.train import DivergenceError, Progress, StepWindow, check_weights_finite, duration, main, train
from mnist_add.tracking import read_metrics

EXACT = ("trainer.epochs=2", "trainer.save_every_steps=4", "trainer.keep_checkpoints=100")


def weights(run_dir, name):
    return checkpoint.load(f"{run_dir}/checkpoints/{name}")[checkpoint.MODEL]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "time_s")} for r in records]


def test_debug_run_writes_config_metrics_checkpoints_and_summary(make_cfg, tmp_path):
    summary = train(make_cfg())
    run = tmp_path / "run"
    assert summary["status"] == "completed" and summary["step"] == 16
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "best.pt").is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12, 16]
    evaluation = [r for r in records if "test/acc_sum" in r]
    assert len(evaluation) == 1 and evaluation[0]["test/acc_sum"] == summary["test"]["acc_sum"]
    assert {"test/loss_digit", "test/loss_sum", "test/acc_digit", "test/acc_both",
            "test/acc_sum_given_digit"} <= set(evaluation[0])


# Cut at step 12 (of 16 in epoch 1), or with weight averaging in epoch 2 at step 24, half way through the average.
@pytest.mark.parametrize("extra,cut_at", [((), 12), (("optim.swa_epochs=1",), 24)], ids=["plain", "averaging"])
def test_resuming_from_a_mid_epoch_checkpoint_is_bitwise_exact(make_cfg, tmp_path, extra, cut_at):
    whole = make_cfg(*EXACT, *extra, run_dir=tmp_path / "whole")
    expected = train(whole)
    # A run that stopped right after its mid-epoch checkpoint.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / f"whole/checkpoints/step-{cut_at:08d}.pt", cut / "checkpoints")
    resumed = train(make_cfg(*EXACT, *extra, run_dir=cut))
    assert resumed["resumed_from"].endswith(f"step-{cut_at:08d}.pt")
    assert resumed["test"] == expected["test"] and resumed["fingerprint"] == expected["fingerprint"]
    assert resumed["val"] == expected["val"] and resumed["best"] == expected["best"]
    final = [checkpoint.load(run / "checkpoints/step-00000032.pt") for run in (tmp_path / "whole", cut)]
    for key in (checkpoint.MODEL, checkpoint.AVERAGE) if extra else (checkpoint.MODEL,):
        for name, tensor in final[0][key].items():
            assert torch.equal(tensor, final[1][key][name]), (key, name)
    after = [r for r in read_metrics(tmp_path / "whole") if r["step"] > cut_at]
    assert without_timing(read_metrics(cut)) == without_timing(after)


def test_weight_averaging_runs_its_epochs_at_swa_lr_and_the_average_evaluates_and_serves(make_cfg, tmp_path):
    summary = train(make_cfg("trainer.epochs=3", "optim.swa_epochs=1", "optim.swa_lr=0.003",
                             "trainer.keep_checkpoints=9"))
    records = read_metrics(tmp_path / "run")
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    # The lr logged at a step is the next step's: one-cycle's tail until step 32, swa_lr from step 33 on.
    assert lrs[28] < 0.001 and all(lrs[step] == pytest.approx(0.003) for step in (32, 36, 40, 44, 48))
    final = checkpoint.load(tmp_path / "run/checkpoints/step-00000048.pt")
    assert final[checkpoint.AVERAGE]["n_averaged"] == 16  # every step of epoch 3, none before
    served = checkpoint.served_weights(final)
    for name in ("features.0.weight", "features.2.running_mean"):
        assert not torch.equal(served[name], final[checkpoint.MODEL][name]), name  # its own BatchNorm statistics
    # The summary's figures are those of the network a checkpoint serves: the average, with those statistics.
    model, cfg = load_model(tmp_path / "run/checkpoints/step-00000048.pt")
    test_set = MNISTAdd(cfg.data.root, train=False, download=False, num_samples=cfg.data.test_samples)
    assert evaluate(model, test_set, Runtime(), 128, cfg.loss.sum).metrics(prefix="") == summary["test"]
    assert checkpoint.load(tmp_path / "run/checkpoints/step-00000016.pt")[checkpoint.AVERAGE] is None


def test_a_resumed_run_rewrites_no_metric_twice(make_cfg, tmp_path):
    cfg = make_cfg(*EXACT)
    train(cfg)
    run = tmp_path / "run"
    for path in checkpoint.Checkpointer(run / "checkpoints", 100, False).step_paths()[:4]:
        path.unlink()  # as if killed after step 16's checkpoint, with metrics up to 32 on disk
    train(cfg)
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == sorted(set(steps)) == list(range(4, 33, 4))


def test_resume_auto_on_a_finished_run_does_not_train_again(make_cfg):
    cfg = make_cfg()
    first = train(cfg)
    again = train(cfg)
    assert again["step"] == first["step"] and again["test"] == first["test"]


def test_resume_never_refuses_to_mix_with_existing_checkpoints(make_cfg):
    train(make_cfg())
    with pytest.raises(RunDirError, match="trainer.resume=never"):
        train(make_cfg("trainer.resume=never"))


def test_a_checkpoint_of_another_network_names_the_file_and_every_model_key_that_differs(make_cfg, tmp_path):
    train(make_cfg("model.width=16"))
    best = tmp_path / "run/checkpoints/best.pt"
    with pytest.raises(CheckpointError) as refused:
        train(make_cfg("model.width=8", "model.hidden=32", f"run.dir={tmp_path / 'other'}", f"trainer.resume={best}"))
    assert str(refused.value) == (f"checkpoint {best} holds another network (model.width=16 there, 8 here; "
                                  f"model.hidden=64 there, 32 here); resume with the same model.* values, or start "
                                  f"a new run.dir")


def test_cli_trains_the_debug_config(data_root, tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    # In percent, named by the weights it scores, on a line of its own.
    assert (f"INFO done: final weights: test sum {summary['test']['acc_sum']:.2%} (digit "
            f"{summary['test']['acc_digit']:.2%}, both {summary['test']['acc_both']:.2%}); best.pt (step 16): test sum "
            f"{summary['best']['test']['acc_sum']:.2%} -> {tmp_path / 'summary.json'}\n") in result.stderr


def test_cli_reports_a_config_typo_in_one_line(tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", "trainer.epoch=1", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "did you mean trainer.epochs" in result.stderr and "Traceback" not in result.stderr


def test_cli_reports_missing_data_with_the_fix(tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={tmp_path}", "data.download=false",
                        f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"MNIST not found in {tmp_path}/MNIST/raw" in result.stderr


def test_a_file_that_is_not_a_training_checkpoint_is_reported(make_cfg, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an mnist-add checkpoint"):
        train(make_cfg(f"trainer.resume={foreign}"))


@pytest.mark.parametrize("mistake", [
    "optim.lr=-1", "optim.lr=nan", "model.width=0", "trainer.log_every_steps=0", "optim.warmup_fraction=1.5",
    "loss.label_smoothing=2", "trainer.num_threads=-1", "data.train_samples=-5", "run.dir=UNDER_A_FILE",
    "--config=INVALID_YAML", "optim.swa_epochs=1",
])
def test_every_user_mistake_is_one_line_and_exit_2(mistake, data_root, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "bad.yaml").write_text("trainer: {epochs: 3\n")
    mistake = mistake.replace("UNDER_A_FILE", str(tmp_path / "file" / "run")).replace(
        "INVALID_YAML", str(tmp_path / "bad.yaml"))
    assert main(["--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path / 'run'}", mistake]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert " ERROR " in err


def test_divergence_stops_with_an_error_and_saves_no_non_finite_weights(data_root, tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path}",
                        "optim.lr=1e6", "trainer.save_every_steps=2", "trainer.num_threads=1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = re.search(r"training diverged: the (loss|weights) was not finite at step (\d+); .* the last good "
                      r"checkpoint is (\S+)\. Lower optim.lr", result.stderr)
    assert error, result.stderr[-3000:]
    saved = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert saved and Path(error.group(3)) in saved and int(error.group(2)) > checkpoint_step(Path(error.group(3)))
    for path in saved:  # best.pt too, if an evaluation came before the divergence
        assert all(t.isfinite().all() for t in checkpoint.load(path)[checkpoint.MODEL].values()), path
    assert not (tmp_path / "summary.json").exists()
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def checkpoint_step(path: Path) -> int:
    return checkpoint.load(path)[checkpoint.PROGRESS]["step"]


def test_weights_that_turned_non_finite_are_never_saved(make_cfg, tmp_path):
    progress, checkpointer = Progress(step=7), Checkpointer(tmp_path, 2, write=True)
    model = torch.nn.Linear(2, 2)
    check_weights_finite(make_cfg(), model, progress, checkpointer)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(DivergenceError, match="the weights was not finite at step 7; .* no checkpoint was saved"):
        check_weights_finite(make_cfg(), model, progress, checkpointer)


def test_fp16_steps_that_the_scaler_skips_are_not_divergence(make_cfg):
    from mnist_add.distributed import StopSignals
    cfg = make_cfg("trainer.precision=fp16")
    learner = build_learner(cfg, Runtime(), total_steps=10)
    learner.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # scaled gradients overflow: skipped
    before = {k: v.clone() for k, v in learner.model.named_parameters()}
    dataset = MNISTAdd(cfg.data.root, train=True, num_samples=64)
    indices = torch.arange(32)
    batch = dataset.batch(indices)
    stats = learner.forward_backward(batch)
    learner.update()
    assert learner.scaler.get_scale() == 2.0 ** 119  # it skipped, and backed off
    assert all(torch.equal(before[k], v) for k, v in learner.model.named_parameters())
    agreement = Agreement(torch.device("cpu"))
    agreement.add(1, indices, batch.addends, loss=stats[0])
    assert agreement.agree(Progress(), StopSignals()) == ([], None)


@pytest.mark.parametrize("key,other", [("trainer.seed", 1), ("trainer.batch_size", 64), ("trainer.epochs", 3),
                                       ("data.train_samples", 256), ("data.val_samples", 128), ("optim.swa_epochs", 1),
                                       ("model.activation", "relu"), ("model.overlap_last_pool", True)])
def test_resuming_with_another_data_sequence_schedule_or_activation_is_refused(make_cfg, key, other):
    train(make_cfg("trainer.epochs=2", "trainer.max_steps=8"))
    with pytest.raises(CheckpointError, match=rf"written with {re.escape(key)}=\S+, this run has {re.escape(key)}="
                                              rf"{other}; resume with the same value"):
        train(make_cfg("trainer.epochs=2", f"{key}={other}"))


def test_best_pt_holds_the_validation_with_the_highest_sum_accuracy_across_resumes(make_cfg, tmp_path):
    train(make_cfg("trainer.epochs=3", "trainer.max_steps=24"))  # stops mid-epoch 2, after one evaluation
    summary = train(make_cfg("trainer.epochs=3"))
    evaluations = [r for r in read_metrics(tmp_path / "run") if "val/acc_sum" in r]
    assert [r["step"] for r in evaluations] == [16, 24, 32, 48]  # max_steps ends with an evaluation too
    best = max(evaluations, key=lambda r: r["val/acc_sum"])
    saved = checkpoint.load(tmp_path / "run/checkpoints/best.pt")
    assert saved[checkpoint.PROGRESS]["step"] == best["step"] == summary["best"]["step"]
    assert saved[checkpoint.PROGRESS]["best_acc_sum"] == best["val/acc_sum"] == summary["best"]["val"]["acc_sum"]


@pytest.mark.parametrize("case", ["test would choose another epoch", "best is not the final epoch"])
def test_best_pt_is_the_validation_argmax_and_is_scored_on_test_at_the_end(make_cfg, tmp_path, case):
    # Which seed shows the case depends on the CPU's kernels: the first one that does.
    for seed in range(20):
        run = tmp_path / f"seed-{seed}"
        summary = train(make_cfg("trainer.epochs=4", "optim.lr=0.05", f"trainer.seed={seed}",
                                 "trainer.test_every_epoch=true", run_dir=run))
        records = [r for r in read_metrics(run) if "val/acc_sum" in r]
        val, test = ({r["step"]: r[f"{split}/acc_sum"] for r in records} for split in ("val", "test"))
        best = max(val, key=val.get)
        shown = max(test, key=test.get) != best if case == "test would choose another epoch" else \
            best != summary["step"]
        if shown and list(val.values()).count(val[best]) == 1:  # no tie decides it
            break
    else:
        pytest.fail(f"no seed of 0-19 shows the case: {case}")
    assert checkpoint_step(run / "checkpoints/best.pt") == best == summary["best"]["step"]
    assert summary["best"]["test"]["acc_sum"] == test[best]  # best.pt scored on test at the end
    assert summary["test"]["acc_sum"] == test[summary["step"]]


def test_the_test_set_is_scored_only_after_training_unless_asked_every_epoch(make_cfg, tmp_path, monkeypatch):
    scored = []  # (split, steps trained when scored)
    real_evaluate, real_step = mnist_add.train.evaluate, TrainStep.__call__

    def evaluate(model, dataset, *args, **kwargs):
        scored.append(("test" if not dataset.train else "val", steps[0]))
        return real_evaluate(model, dataset, *args, **kwargs)

    def step(self, *args, **kwargs):
        steps[0] += 1
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(mnist_add.train, "evaluate", evaluate)
    monkeypatch.setattr(TrainStep, "__call__", step)
    steps = [0]
    train(make_cfg("trainer.epochs=2", run_dir=tmp_path / "a"))
    assert [split for split, at in scored if at < 32] == ["val"]  # epoch 1: validation only
    assert sorted(split for split, at in scored if at == 32) in (["test", "val"], ["test", "test", "val"])
    scored.clear(), steps.clear(), steps.append(0)
    train(make_cfg("trainer.epochs=2", "trainer.test_every_epoch=true", run_dir=tmp_path / "b"))
    assert sorted(split for split, at in scored if at < 32) == ["test", "val"]


def test_with_nothing_held_out_training_uses_every_image_and_best_pt_is_the_final_weights(make_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mnist_add")
    summary = train(make_cfg("trainer.epochs=2", "data.val_samples=0", "data.train_samples=0",
                             "trainer.max_steps=20"))
    assert summary["val"] is None and summary["best"]["step"] == summary["step"] == 20
    assert summary["best"]["test"] == summary["test"]
    best, final = weights(tmp_path / "run", "best.pt"), weights(tmp_path / "run", "step-00000020.pt")
    assert all(torch.equal(best[key], final[key]) for key in final)
    # And after a resume: best.pt follows the final weights still.
    resumed = make_cfg("trainer.epochs=3", "data.val_samples=0", "data.train_samples=512", run_dir=tmp_path / "b")
    train(make_cfg("trainer.epochs=3", "data.val_samples=0", "data.train_samples=512", "trainer.max_steps=20",
                   run_dir=tmp_path / "b"))
    assert train(resumed)["best"]["step"] == 48 == checkpoint_step(tmp_path / "b/checkpoints/best.pt")
    said = ("data.val_samples=0: training on all 60000 images, nothing held out to choose on; "
            "best.pt is the final weights")
    assert [r.getMessage() for r in caplog.records].count(said) == 1


def test_compiled_training_matches_eager_and_saves_plain_keys(make_cfg, tmp_path, monkeypatch):
    # The "eager" backend traces with dynamo as any backend does, but skips code generation, which takes
    # minutes on two CPU cores; inductor's own numerics are measured by bench/compile_and_precision.py.
    real_compile = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or real_compile(model, backend="eager"))
    eager = train(make_cfg("trainer.max_steps=12", run_dir=tmp_path / "eager"))
    train(make_cfg("trainer.compile=true", "trainer.max_steps=6", run_dir=tmp_path / "compiled"))
    resumed = train(make_cfg("trainer.compile=true", "trainer.max_steps=12", run_dir=tmp_path / "compiled"))
    assert len(compiled) == 2  # one model trains and evaluates, in both segments
    assert resumed["resumed_from"].endswith("step-00000006.pt")
    assert resumed["test"] == pytest.approx(eager["test"], abs=1e-6)
    saved = checkpoint.load(tmp_path / "compiled/checkpoints/step-00000012.pt")[checkpoint.MODEL]
    assert not [key for key in saved if "_orig_mod" in key]
    assert all(torch.allclose(tensor, weights(tmp_path / "eager", "step-00000012.pt")[key], atol=1e-6)
               for key, tensor in saved.items())


def test_the_log_opens_with_the_plan_and_each_line_counts_steps_and_time_left(make_cfg, caplog):
    caplog.set_level(logging.INFO, logger="mnist_add")
    train(make_cfg("trainer.max_steps=12"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("training steps 1-12 (16 per epoch, global batch 32): world size 1 on cpu, precision fp32, "
                        "eager step, 1 CPU thread(s) per rank")  # num_threads set: no hint about it
    progress = [line for line in lines if line.startswith("step ") and "loss" in line]
    assert [line.split(" epoch")[0] for line in progress] == ["step 4/12", "step 8/12", "step 12/12"]
    assert progress[-1].split(", ")[1].startswith("0s left: loss")
    assert re.fullmatch(r"\d+m\d\ds|\d+s", progress[0].split(", ")[1].split(" left")[0])


@pytest.mark.parametrize("seconds, shown", [(45.4, "45s"), (192, "3m12s"), (3725, "1h02m"), (0.2, "0s")])
def test_time_left_reads_in_hours_minutes_and_seconds(seconds, shown):
    assert duration(seconds) == shown


def final_weights_equal(run_a: Path, run_b: Path, step: int) -> bool:
    a, b = (weights(run, f"step-{step:08d}.pt") for run in (run_a, run_b))
    return all(torch.equal(a[name], b[name]) for name in a)


def test_resume_path_into_a_new_run_dir_finishes_with_its_own_best_pt(make_cfg, tmp_path):
    # The old run's best was an earlier epoch than the checkpoint resumed from, which no later validation of the
    # new run.dir beats: best.pt must still be written there (issue #32, the run that could never finish).
    old = train(make_cfg("trainer.epochs=4", run_dir=tmp_path / "old"))
    assert old["best"]["step"] < 56
    late = tmp_path / "old/checkpoints/step-00000056.pt"
    new = make_cfg("trainer.epochs=4", f"trainer.resume={late}", run_dir=tmp_path / "new")
    summary = train(new)
    assert summary["status"] == "completed" and summary["resumed_from"] == str(late)
    assert checkpoint_step(tmp_path / "new/checkpoints/best.pt") == summary["best"]["step"] == 64
    assert final_weights_equal(tmp_path / "old", tmp_path / "new", 64)
    assert train(new) == summary  # the same command again: complete, nothing to do


def test_resume_path_starts_a_run_dir_once_and_a_relaunch_continues_from_the_run_dirs_own(make_cfg, tmp_path):
    train(make_cfg("trainer.epochs=3", "trainer.max_steps=16", run_dir=tmp_path / "old"))
    start = tmp_path / "old/checkpoints/step-00000016.pt"
    stopped = train(make_cfg("trainer.epochs=3", f"trainer.resume={start}", "trainer.max_steps=40",
                             run_dir=tmp_path / "new"))
    assert stopped["resumed_from"] == str(start) and stopped["step"] == 40
    # A requeue of the same command (here without its max_steps) goes on from step 40 of run.dir, not from PATH.
    summary = train(make_cfg("trainer.epochs=3", f"trainer.resume={start}", run_dir=tmp_path / "new"))
    assert summary["resumed_from"] == str(tmp_path / "new/checkpoints/step-00000040.pt") and summary["step"] == 48
    train(make_cfg("trainer.epochs=3", run_dir=tmp_path / "whole"))
    assert final_weights_equal(tmp_path / "whole", tmp_path / "new", 48)


def test_a_lost_best_pt_is_written_again_by_the_next_validation_or_else_by_the_final_weights(make_cfg, tmp_path,
                                                                                              caplog):
    cfg = make_cfg("trainer.epochs=3", "trainer.max_steps=24")
    train(cfg)
    (tmp_path / "run/checkpoints/best.pt").unlink()
    summary = train(make_cfg("trainer.epochs=3"))
    assert checkpoint_step(tmp_path / "run/checkpoints/best.pt") == summary["best"]["step"] >= 32
    # Lost after the final checkpoint, before the summary: no validation is left to choose, the final weights serve.
    (tmp_path / "run/checkpoints/best.pt").write_bytes(b"damaged")
    (tmp_path / "run/summary.json").unlink()
    summary = train(make_cfg("trainer.epochs=3"))
    assert checkpoint_step(tmp_path / "run/checkpoints/best.pt") == summary["best"]["step"] == 48
    assert "the final weights are best.pt" in caplog.text


def test_the_training_rate_and_the_time_left_leave_evaluations_out(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(mnist_add.train.time, "perf_counter", lambda: clock[0])
    window = StepWindow(torch.device("cpu"))
    window.sums += torch.tensor([0, 0, 0, 0, 0, 640], dtype=torch.float64)
    clock[0] += 10  # 640 samples trained in 10 s, and an evaluation of 30 s in between
    with window.paused():
        clock[0] += 30
    assert window.flush(lr=0.1, epoch=1.0)["samples_per_s"] == 64 and window.last_pause_s == 30


def test_a_thread_hint_only_where_torch_takes_several_threads(make_cfg, caplog, monkeypatch, tmp_path):
    caplog.set_level(logging.INFO, logger="mnist_add")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    for threads, hinted in ((1, False), (2, True)):  # 1: as under torchrun, which sets OMP_NUM_THREADS=1
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        caplog.clear()
        train(make_cfg("trainer.num_threads=0", "trainer.max_steps=1", "data.train_samples=100",
                       "trainer.batch_size=48", run_dir=tmp_path / str(threads)))
        plan = caplog.records[0].getMessage()
        assert ("on a shared machine set trainer.num_threads=1" in plan) == hinted
        assert "(3 per epoch, global batch 48, the last of 4)" in plan


def speedrun(data_root, run_dir, *overrides):
    """The speed recipe on a small subset: 64 steps of 32."""
    return load_config(["speedrun"], [f"data.root={data_root}", f"run.dir={run_dir}", "data.train_samples=2048",
                                      "data.val_samples=500", "data.test_samples=1000", "trainer.deterministic=true",
                                      "trainer.num_threads=1", "trainer.save_every_steps=16", "trainer.log_every_steps=8",
                                      *overrides])


def test_the_speed_recipe_learns_on_a_small_subset(data_root, tmp_path):
    summary = train(speedrun(data_root, tmp_path))
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert summary["step"] == 64 and losses[-1] < losses[0] / 2
    assert summary["test"]["acc_sum"] > 0.8 and summary["val"]["acc_sum"] > 0.8  # chance: 0.1


def test_the_speed_recipe_resumes_bitwise(data_root, tmp_path):
    train(speedrun(data_root, tmp_path / "whole"))
    train(speedrun(data_root, tmp_path / "cut", "trainer.max_steps=40"))
    resumed = train(speedrun(data_root, tmp_path / "cut"))
    assert resumed["resumed_from"].endswith("step-00000040.pt")
    assert final_weights_equal(tmp_path / "whole", tmp_path / "cut", 64)
