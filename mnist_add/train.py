"""Train the MNIST-add network. One entry point for every launcher:

    python -m mnist_add.train [--config FILE ...] [key=value ...]      # one process (CPU or one GPU)
    torchrun --nproc_per_node=N -m mnist_add.train [...]               # DDP, one rank per process
    srun python -m mnist_add.train [...]  /  python -m job.submit [...] # SLURM

Rank 0 writes the run directory: config.yaml, metrics.jsonl, checkpoints/, summary.json.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mnist_add import checkpoint, distributed
from mnist_add.agreement import Agreement
from mnist_add.checkpoint import Checkpointer, CheckpointError
from mnist_add.config import ConfigError, flatten, parse_args, refuse, to_dict, upgraded
from mnist_add.data import DatasetError, GlobalBatchSampler, MNISTAdd, Splits, build_datasets
from mnist_add.distributed import Runtime, StopSignals
from mnist_add.scoring import Evaluation, evaluate, model_from
from mnist_add.learner import Learner, build_learner, recompute_batchnorm
from mnist_add.precision import configure_kernels, resolve
from mnist_add.step import TrainStep, use_cuda_graph
from mnist_add.rundir import (SUMMARY_NAME, RunDirError, RunDirLock, completed_run, explain_os_error,
                              summary_line, write_config, write_summary)
from mnist_add.tracking import build_tracker

log = logging.getLogger("mnist_add")

# What a resumed run must share with its checkpoint: the data and schedule it continues, and what its weights
# compute (another activation or last pool loads the same tensors without complaint).
RESUME_KEYS = ("trainer.seed", "trainer.batch_size", "trainer.epochs", "data.train_samples", "data.val_samples",
               "trainer.drop_last", "optim.swa_epochs", "model.activation", "model.overlap_last_pool")


@dataclass
class Progress:
    """Counters of completed work: all a resumed run needs to find its place."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # global batches completed in the current epoch
    step: int = 0  # optimiser steps completed in total
    best_acc_sum: float = -1.0  # best validation sum accuracy so far (decides best.pt)
    fingerprint: int = 0  # running checksum of the (index, addend) pairs trained on, in order

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {f.name for f in fields(self)}:
            raise CheckpointError(f"progress keys {sorted(state)} do not match this version's")
        for key, value in state.items():
            setattr(self, key, value)


def train(cfg: DictConfig) -> dict:
    """Train as configured, resuming from the run directory when it has checkpoints.

    Returns the summary: status "completed", or "stopped" when a signal asked the job to stop
    (a checkpoint was saved at a step boundary first). A run directory whose run is already
    complete is left as it is, and its summary returned.
    """
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    configure_kernels(cfg.trainer.deterministic)
    runtime = distributed.setup(cfg.dist)
    lock = RunDirLock(Path(cfg.run.dir))
    try:
        take_run_dir(lock, runtime)
        if summary := completed_run(cfg):
            log.info("%s already holds this run, completed: %s (%s); nothing to do", cfg.run.dir,
                     summary_line(summary), SUMMARY_NAME)
            return summary
        with StopSignals() as signals:
            return _train(cfg, runtime, signals)
    finally:
        lock.release()
        distributed.teardown()


def take_run_dir(lock: RunDirLock, runtime: Runtime) -> None:
    """Rank 0 locks run.dir for the job's life; every rank learns together whether the job may go on."""
    refusal = None
    if runtime.is_main:
        try:
            lock.acquire()
        except (RunDirError, OSError) as err:
            refusal = err
    if distributed.any_rank(refusal is not None, runtime.device):
        raise refusal or RunDirError("rank 0 could not take the run directory (its message says why)")


def _train(cfg: DictConfig, runtime: Runtime, signals: StopSignals) -> dict:
    started = time.perf_counter()
    run_dir = Path(cfg.run.dir)

    # Data: the same global batches on any world size, on the GPU when training there.
    splits = build_datasets(cfg.data, cfg.trainer.seed, runtime.device)
    train_set = splits.train
    sampler = GlobalBatchSampler(train_set, cfg.trainer.batch_size, runtime.world_size, runtime.rank,
                                 cfg.trainer.seed, cfg.trainer.drop_last)
    total_steps = cfg.trainer.epochs * sampler.steps_per_epoch
    last_step = min(total_steps, cfg.trainer.max_steps or total_steps)  # where this launch ends

    # Model and what updates it, and how it steps.
    learner = build_learner(cfg, runtime, total_steps)
    capture, stepping = use_cuda_graph(cfg.trainer.cuda_graph, runtime.device, cfg.trainer.precision,
                                       cfg.trainer.compile)
    progress = Progress()

    # Resume; only then write to run.dir (a refused launch leaves it as it was), and open tracking
    # with the checkpoint's run id so that a requeued job continues its W&B run.
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.trainer.keep_checkpoints, write=runtime.is_main)
    resumed = maybe_resume(cfg, checkpointer, learner, progress)
    best_on_disk = resumed.best_on_disk
    if runtime.is_main:
        checkpointer.prepare()
        write_config(cfg)
    tracker = build_tracker(cfg, runtime.is_main, resumed.run_id)
    bar = tqdm(total=last_step, initial=progress.step, disable=not (runtime.is_main and sys.stderr.isatty()),
               unit="step", dynamic_ncols=True)
    window, agreement = StepWindow(runtime.device), Agreement(runtime.device)
    step = TrainStep(learner, train_set, window.sums, agreement, progress.step, capture)
    validation = None  # the latest evaluation on the validation split
    if runtime.is_main:
        log.info("%s", plan_line(cfg, runtime, progress, last_step, sampler, stepping))
        if splits.val is None:
            log.info("data.val_samples=0: training on all %d images, nothing held out to choose on; best.pt is the "
                     "final weights", len(train_set))

    def save(best: bool = False, final: bool = False) -> Path:
        nonlocal best_on_disk
        check_weights_finite(cfg, learner.model, progress, checkpointer)
        state = {**learner.state_dict(), checkpoint.PROGRESS: progress.state_dict(), checkpoint.RNG: rng_state(),
                 checkpoint.CONFIG: to_dict(cfg), checkpoint.TRACKING_RUN_ID: tracker.run_id}
        best_on_disk |= best
        return checkpointer.save(state, progress.step, best=best, final=final)

    with logging_redirect_tqdm():  # log lines above the progress bar, not onto its line
        try:
            while not finished(progress, cfg):
                train_set.set_epoch(progress.epoch, warp=progress.epoch < cfg.trainer.epochs - cfg.data.clean_epochs)
                average = progress.epoch >= cfg.trainer.epochs - cfg.optim.swa_epochs > 0
                sampler.set_epoch(progress.epoch)
                sampler.set_start_step(progress.step_in_epoch)
                for indices in sampler:
                    # One step on this rank's share of the global batch; nothing here waits for the device.
                    step(indices, average)
                    progress.step += 1
                    progress.step_in_epoch += 1
                    bar.update()
                    if not should_agree(progress, cfg, sampler.steps_per_epoch):
                        continue

                    # Diverge, log, stop on a signal, checkpoint: decisions every rank takes together.
                    verdict = agreement.agree(progress, signals)
                    if verdict.diverged_at:
                        raise DivergenceError(divergence_message(cfg, verdict.diverged_at, checkpointer))
                    if should_log(progress, cfg):
                        metrics = window.flush(float(learner.lr),
                                               progress.epoch + progress.step_in_epoch / sampler.steps_per_epoch)
                        tracker.log(metrics, progress.step)
                        # Each epoch's end, and the final scoring: the test set, twice the validation's images.
                        evaluations_left = cfg.trainer.epochs - progress.epoch + 2
                        report_progress(bar, progress.step, last_step, cfg.trainer.batch_size, metrics,
                                        evaluations_left * window.last_pause_s)
                    if verdict.stop_reasons:
                        return stop(runtime, verdict.stop_reasons, save(), tracker, progress)
                    if should_save_mid_epoch(progress, cfg, sampler.steps_per_epoch):
                        with window.paused():
                            save()
                    if finished(progress, cfg):
                        break

                # End of epoch (or of max_steps): validate, then checkpoint with the verdict on best.pt.
                if progress.step_in_epoch == sampler.steps_per_epoch:
                    progress.epoch += 1
                    progress.step_in_epoch = 0
                with window.paused():
                    check_weights_finite(cfg, learner.model, progress, checkpointer)
                    validation = evaluate_and_log(cfg, runtime, learner, splits, tracker, progress)
                    acc_sum = None if validation is None else validation.metrics("")["acc_sum"]
                    best = acc_sum is None or acc_sum > progress.best_acc_sum  # nothing held out: the newest is best
                    if acc_sum is not None:
                        progress.best_acc_sum = max(progress.best_acc_sum, acc_sum)
                    save(best=best)
        except BaseException:
            tracker.finish(exit_code=1)
            raise

    if not best_on_disk and runtime.is_main:  # no validation since this run.dir started, or since best.pt was lost
        log.warning("no validation in %s chose a best.pt (it started from trainer.resume=PATH at its end, or its "
                    "best.pt was lost): the final weights are best.pt", run_dir)
    # final.pt: the weights the tools serve, which beat best.pt's validation argmax on held-out images
    # (docs/results.md, "Which weights to serve").
    save(best=not best_on_disk, final=True)

    # The test set scores the final weights and best.pt, once, after every choice was made.
    scores = final_scores(cfg, runtime, learner, splits, checkpointer, progress, validation)
    summary = {"status": "completed", "step": progress.step, "epoch": progress.epoch,
               "world_size": runtime.world_size, "fingerprint": progress.fingerprint,
               "resumed_from": str(resumed.path) if resumed.path else None,
               "segment_wall_time_s": round(time.perf_counter() - started, 2), **scores}
    bar.close()  # the last line on its own, not glued to the bar
    finish_run(runtime, run_dir, summary, tracker)
    return summary


class Resumed(NamedTuple):
    path: Path | None  # the checkpoint restored, None for a fresh start
    run_id: str | None  # the W&B run it continues
    best_on_disk: bool  # whether run.dir's best.pt belongs to the state restored


def maybe_resume(cfg: DictConfig, checkpointer: Checkpointer, learner: Learner, progress: Progress) -> Resumed:
    """Restore per trainer.resume: `auto` (newest good checkpoint here, if any), `never`, or a PATH that starts
    the run only while run.dir holds no step checkpoint of its own: the same command, requeued, then continues
    from run.dir's newest instead of going back to PATH.

    Where run.dir's best.pt does not belong to the state restored (a start from PATH, a lost or damaged best.pt),
    the next validation writes best.pt whatever it scores: every run.dir holds its own best.pt once it has
    validated.
    """
    found: dict = {}

    def restore(state: dict, path: Path) -> None:
        try:
            check_resume_keys(cfg, state[checkpoint.CONFIG], path)
            learner.load_state_dict(state)
            progress.load_state_dict(state[checkpoint.PROGRESS])
            set_rng_state(state[checkpoint.RNG])
            found["run_id"] = state[checkpoint.TRACKING_RUN_ID]
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as err:  # another model, or not our checkpoint
            raise CheckpointError(misfit(cfg, state[checkpoint.CONFIG], path, err)) from err

    if cfg.trainer.resume == "never":
        return Resumed(None, None, False)
    own = checkpointer.step_paths()
    if cfg.trainer.resume == "auto" or own:
        if own and cfg.trainer.resume != "auto":
            log.info("%s holds checkpoints of its own: continuing from its newest, not from trainer.resume=%s",
                     checkpointer.directory, cfg.trainer.resume)
        path = checkpointer.restore_newest(restore, keys=checkpoint.TRAINING_KEYS)
        best_on_disk = path is not None and checkpointer.best_usable()
    else:
        path = Path(cfg.trainer.resume)
        restore(checkpoint.load(path, keys=checkpoint.TRAINING_KEYS), path)
        found["run_id"], best_on_disk = None, False  # another run's W&B run and best.pt are not this one's
    if path:
        log.info("resumed from %s at step %d (epoch %d, step %d in it)",
                 path, progress.step, progress.epoch, progress.step_in_epoch)
    if not best_on_disk:
        progress.best_acc_sum = -1.0
    return Resumed(path, found.get("run_id"), best_on_disk)


def check_resume_keys(cfg: DictConfig, saved: dict, path: Path) -> None:
    # As plain values, so that the message reads activation=relu rather than Activation.relu.
    cfg, saved = OmegaConf.create(to_dict(cfg)), OmegaConf.create(to_dict(upgraded(saved)))
    for key in RESUME_KEYS:
        ours, theirs = OmegaConf.select(cfg, key), OmegaConf.select(saved, key)
        if ours != theirs:
            raise CheckpointError(f"checkpoint {path} was written with {key}={theirs}, this run has {key}={ours}; "
                                  f"resume with the same value, or start a new run.dir")


def misfit(cfg: DictConfig, saved: dict, path: Path, err: Exception) -> str:
    """Why a checkpoint's tensors do not load into this run's network: every model key whose value differs,
    else the loader's own first line."""
    try:
        theirs = flatten(to_dict(upgraded(saved)))
    except Exception:  # not a config at all: the loader's message is all there is to say
        theirs = None
    differ = [] if theirs is None else [f"{key}={theirs.get(key)} there, {value} here"
                                        for key, value in flatten(to_dict(cfg)).items()
                                        if key.startswith("model.") and theirs.get(key) != value]
    if differ:
        return (f"checkpoint {path} holds another network ({'; '.join(differ)}); resume with the same model.* "
                f"values, or start a new run.dir")
    return f"checkpoint {path} does not fit this run's network: {type(err).__name__}: {str(err).splitlines()[0]}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights; nothing from then on was saved."""


def divergence_message(cfg: DictConfig, step: int, checkpointer: Checkpointer, what: str = "loss") -> str:
    saved = checkpointer.step_paths()
    last = f"the last good checkpoint is {saved[0]}" if saved else "no checkpoint was saved before it"
    return (f"training diverged: the {what} was not finite at step {step}; nothing from it on was saved "
            f"and {last}. Lower optim.lr (now {cfg.optim.lr}) and train into a new run.dir")


def check_weights_finite(cfg: DictConfig, model: torch.nn.Module, progress: Progress,
                         checkpointer: Checkpointer) -> None:
    """Before weights are evaluated or saved: an update can turn them (or BatchNorm's running statistics)
    non-finite while the loss that made it was still finite. Every rank holds the same weights (the
    statistics are rank 0's once broadcast for evaluation), so every rank decides alike."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not torch.stack([t.isfinite().all() for t in tensors]).all():
        raise DivergenceError(divergence_message(cfg, progress.step, checkpointer, what="weights"))


class StepWindow:
    """Training statistics summed since the last log line, reduced over ranks when read; its rate counts the time
    spent training, not evaluating or saving."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)  # the training step adds into it
        self.started = time.perf_counter()
        self.last_pause_s = 0.0  # how long the last evaluation (with its save) took

    @contextmanager
    def paused(self):
        """Time spent inside is left out of the training rate (and measured on its own)."""
        started = time.perf_counter()
        yield
        self.last_pause_s = time.perf_counter() - started
        self.started += self.last_pause_s

    def flush(self, lr: float, epoch: float) -> dict[str, float]:
        loss, loss_digit, loss_sum, right_digit, right_sum, n = distributed.all_reduce_sum(self.sums).tolist()
        elapsed = time.perf_counter() - self.started
        self.sums.zero_()
        self.started = time.perf_counter()
        return {"train/loss": loss / n, "train/loss_digit": loss_digit / n, "train/loss_sum": loss_sum / n,
                "train/acc_digit": right_digit / n, "train/acc_sum": right_sum / n,
                "lr": lr, "samples_per_s": n / elapsed, "epoch": epoch}


def finished(progress: Progress, cfg: DictConfig) -> bool:
    return progress.epoch >= cfg.trainer.epochs or 0 < cfg.trainer.max_steps <= progress.step


def should_agree(progress: Progress, cfg: DictConfig, steps_per_epoch: int) -> bool:
    """Whether the ranks agree on stopping and divergence after this step: every agree_every_steps, and at
    every step that reads the device anyway (log, save, the epoch's end and evaluation, the last step)."""
    return (progress.step % cfg.trainer.agree_every_steps == 0 or should_log(progress, cfg)
            or should_save_mid_epoch(progress, cfg, steps_per_epoch)
            or progress.step_in_epoch == steps_per_epoch or finished(progress, cfg))


def should_log(progress: Progress, cfg: DictConfig) -> bool:
    return progress.step % cfg.trainer.log_every_steps == 0


def should_save_mid_epoch(progress: Progress, cfg: DictConfig, steps_per_epoch: int) -> bool:
    every = cfg.trainer.save_every_steps
    return every > 0 and progress.step % every == 0 and progress.step_in_epoch < steps_per_epoch


def plan_line(cfg: DictConfig, runtime: Runtime, progress: Progress, last_step: int, sampler: GlobalBatchSampler,
              stepping: str) -> str:
    """The run's first line: what it will do, and where."""
    threads = f"{torch.get_num_threads()} CPU thread(s) per rank" + (
        " (torch's default: on a shared machine set trainer.num_threads=1)"
        if runtime.device.type == "cpu" and not cfg.trainer.num_threads and torch.get_num_threads() > 1 else "")
    last = f", the last of {sampler.last_batch_size}" if sampler.last_batch_size else ""
    left_out = f"; {sampler.left_out} images an epoch left out" + (
        " (trainer.drop_last)" if cfg.trainer.drop_last else " (fewer than one per rank)") if sampler.left_out else ""
    return (f"training steps {progress.step + 1}-{last_step} ({sampler.steps_per_epoch} per epoch, global batch "
            f"{cfg.trainer.batch_size}{last}{left_out}): world size {runtime.world_size} on {runtime.device.type}, "
            f"precision {resolve(cfg.trainer.precision, runtime.device).value}, {stepping}, {threads}")


def report_progress(bar: tqdm, step: int, last_step: int, batch_size: int, metrics: dict[str, float],
                    evaluations_s: float) -> None:
    """On a terminal the bar shows it (with its own count and time left); in a log file, a line per log step
    with the time left: the steps left at the recent training rate, and `evaluations_s` for the evaluations left."""
    line = f"loss {metrics['train/loss']:.4f} digit {metrics['train/acc_digit']:.4f} " \
           f"sum {metrics['train/acc_sum']:.4f} {metrics['samples_per_s']:.0f} samples/s"
    if bar.disable:
        left = (last_step - step) * batch_size / metrics["samples_per_s"] + evaluations_s
        log.info("step %d/%d epoch %.2f, %s left: %s", step, last_step, metrics["epoch"], duration(left), line)
    else:
        bar.set_postfix_str(line)


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 192 -> '3m12s', 45 -> '45s'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def evaluate_and_log(cfg: DictConfig, runtime: Runtime, learner: Learner, splits: Splits, tracker,
                     progress: Progress) -> Evaluation | None:
    """Score the served weights on the validation split (and with trainer.test_every_epoch on the test set, for
    curves only); returns the validation's Evaluation, None when nothing is held out."""
    settle_served(cfg, runtime, learner, splits.train)
    scored = {"val/": splits.val, **({"test/": splits.test} if cfg.trainer.test_every_epoch else {})}
    results = {prefix: evaluate(learner.served, dataset, runtime, cfg.trainer.eval_batch_size, cfg.loss.sum,
                                learner.autocast) for prefix, dataset in scored.items() if dataset is not None}
    metrics = {key: value for prefix, result in results.items() for key, value in result.metrics(prefix).items()}
    if metrics:
        tracker.log({**metrics, "epoch": progress.epoch}, progress.step)
    if runtime.is_main:
        for prefix, result in results.items():
            m = result.metrics("")
            log.info("step %d epoch %d: %s digit %.4f sum %.4f both %.4f", progress.step, progress.epoch,
                     "validation" if prefix == "val/" else "test", m["acc_digit"], m["acc_sum"], m["acc_both"])
    return results.get("val/")


def settle_served(cfg: DictConfig, runtime: Runtime, learner: Learner, train_set: MNISTAdd) -> None:
    """Before the served weights are evaluated or saved: an average's own BatchNorm statistics, and rank 0's
    statistics on every rank."""
    if learner.average is not None:
        recompute_batchnorm(learner.average.module, train_set, cfg.trainer.eval_batch_size, runtime.device,
                            learner.autocast)
    if runtime.is_distributed:
        for module in [learner.model] + ([learner.average] if learner.average is not None else []):
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, 0)


def final_scores(cfg: DictConfig, runtime: Runtime, learner: Learner, splits: Splits, checkpointer: Checkpointer,
                 progress: Progress, validation: Evaluation | None) -> dict:
    """The summary's scores: the final weights' on validation and test, and best.pt's step and scores.
    `validation` is the final weights' validation score when this segment evaluated them."""
    def scores(model: torch.nn.Module, dataset: MNISTAdd | None) -> Evaluation | None:
        return None if dataset is None else evaluate(model, dataset, runtime, cfg.trainer.eval_batch_size,
                                                     cfg.loss.sum, learner.autocast)

    validation = validation or scores(learner.served, splits.val)  # None: resumed at the end, or nothing held out
    test = scores(learner.served, splits.test)
    final = {"val": None if validation is None else validation.metrics(""), "test": test.metrics("")}
    distributed.barrier()  # rank 0 has written best.pt
    best_path = checkpointer.directory / checkpoint.BEST_NAME
    state = checkpoint.load(best_path, keys=(*checkpoint.MODEL_KEYS, checkpoint.PROGRESS))
    best = {"step": state[checkpoint.PROGRESS]["step"], **final}
    if best["step"] != progress.step:
        model, _ = model_from(state, best_path, runtime.device)
        best.update({split: None if result is None else result.metrics("") for split, result in
                     (("val", scores(model, splits.val)), ("test", scores(model, splits.test)))})
    return {**final, "per_class": test.per_class(), "best": best}


def stop(runtime: Runtime, reasons: list[str], saved: Path, tracker, progress: Progress) -> dict:
    """All ranks agreed to stop at this step boundary, and `saved` holds the state they agreed on."""
    if runtime.is_main:
        log.warning("stopping on %s at step %d; saved %s; run the same command again to resume",
                    " and ".join(reasons), progress.step, saved)
    tracker.finish()
    distributed.barrier()  # nobody exits before rank 0 has written the checkpoint
    return {"status": "stopped", "reasons": reasons, "step": progress.step, "checkpoint": str(saved)}


def finish_run(runtime: Runtime, run_dir: Path, summary: dict, tracker) -> None:
    tracker.log({**{f"test/{key}": value for key, value in summary["test"].items()},
                 **{f"best/test/{key}": value for key, value in summary["best"]["test"].items()}}, summary["step"])
    tracker.log_per_class(summary["per_class"], summary["step"])
    if runtime.is_main:
        write_summary(run_dir, summary)
        log.info("done: %s -> %s", summary_line(summary), run_dir / SUMMARY_NAME)
    tracker.finish()


def setup_logging(rank: int) -> None:
    """Human-facing logs: INFO from rank 0, warnings and errors from every rank."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr, force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done or stopped with a checkpoint, 1 when training diverged or a peer rank hung or died,
    2 for what the user can fix, 130 on a second Ctrl-C."""
    try:
        rank, local_rank, _ = distributed.launcher_ranks()
    except ConfigError as err:  # a malformed launcher environment: no rank to log as, so every process says it
        return refuse(err)
    setup_logging(rank)
    # What every rank finds alike is said once a node, by its first rank; the others end with the same code.
    say_once = log.error if local_rank == 0 else log.debug
    try:
        cfg = parse_args(argv, "mnist_add.train", __doc__.splitlines()[0])
        train(cfg)
    except (ConfigError, DatasetError, CheckpointError, RunDirError) as err:
        say_once("%s", err)
        return 2
    except DivergenceError as err:
        say_once("%s", err)
        return 1
    except RuntimeError as err:  # a peer rank hung or died in a collective (gloo; NCCL's DistBackendError)
        if (message := distributed.explain_collective_failure(err)) is None:
            raise
        log.error("%s", message)
        return 1
    except OSError as err:
        if (message := explain_os_error(err)) is None:
            raise
        log.error("%s", message)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted: no checkpoint saved since the last one")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
