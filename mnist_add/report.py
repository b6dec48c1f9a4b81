"""Figures of a run, finished or not: learning curves from metrics.jsonl, and test-set figures of its checkpoint.

    python -m mnist_add.report runs/default [--out DIR] [--data-root DIR]

Writes into RUN_DIR/report/ (or --out) and prints the paths written:
    loss.png                        per task, training and validation loss over steps, and the final test
                                    score as a point; the training loss is label-smoothed (as config.yaml
                                    says), so it levels off above the others
    accuracy.png                    per task, training and validation error rate (1 - accuracy) over steps and
                                    the final test point, log scale; one panel for a structured sum head,
                                    whose sum is right exactly when its digit is
    confusion_digit.png, confusion_sum.png (not for a structured sum head), misclassified.png
                                    the test set scored by final.pt (else the newest step checkpoint)
A run that is still going or was preempted works too: no summary.json is needed, and a run
without a checkpoint yet gets the learning curves only.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator
from omegaconf import DictConfig

from mnist_add.checkpoint import FINAL_NAME, Checkpointer, CheckpointError
from mnist_add.config import ConfigError, SumHead, cli_parser, load_config, refuse
from mnist_add.data import DatasetError, MNISTAdd
from mnist_add.files import UnreadableFile, present
from mnist_add.distributed import Runtime
from mnist_add.scoring import evaluate, load_model
from mnist_add.model import NUM_DIGITS, Criterion
from mnist_add.task import NUM_SUMS
from mnist_add import tracking
from mnist_add.tracking import METRICS_NAME

TASKS = ("digit", "sum")
NUM_CLASSES = {"digit": NUM_DIGITS, "sum": NUM_SUMS}
# metrics.jsonl key prefix of each split, and how it is drawn: validation after every epoch, the test set at the end
# (and every epoch with trainer.test_every_epoch)
SPLITS = {"train": ("train/", "-"), "val": ("val/", "o-"), "test": ("test/", "s")}
CONFIG_NAME = "config.yaml"  # the run's resolved config, beside metrics.jsonl
MAX_SHOWN = 32  # misclassified test images in the grid: enough to see patterns, few enough to read
GRID_COLUMNS = 8
EVAL_BATCH_SIZE = 1000
CELL_FONT_SIZE = 10  # counts in confusion-matrix cells: as large as the tick labels


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A figure drawn by Agg: PNG files on a headless node, and no pyplot state to leak between figures."""
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has `key`: train and evaluation records interleave."""
    points = [(r["step"], r[key]) for r in records if key in r]
    return [step for step, _ in points], [value for _, value in points]


def label_smoothing(run_dir: Path) -> dict[str, float] | None:
    """Per task, the label smoothing of the run's training loss (its test loss has none); None without config.yaml."""
    if (cfg := run_config(run_dir)) is None:
        return None
    criterion = Criterion(cfg.loss, cfg.model.sum_head)  # the training loss's own rule: which heads are smoothed
    return {"digit": cfg.loss.label_smoothing, "sum": criterion.sum_smoothing}


def smoothed_loss_floor(smoothing: float, num_classes: int) -> float:
    """The least cross-entropy against smoothed targets: their entropy, reached by a perfect fit to them."""
    true_share, other_share = 1 - smoothing + smoothing / num_classes, smoothing / num_classes
    return -true_share * math.log(true_share) - (num_classes - 1) * other_share * math.log(other_share)


def draw_losses(records: list[dict], smoothing: dict[str, float] | None) -> Figure:
    """One panel per task: training and test loss, labelled with the smoothing each was computed with."""
    figure, axes = new_figure(1, len(TASKS), (10, 4))
    for ax, task in zip(axes[0], TASKS):
        eps = None if smoothing is None else smoothing[task]
        train_label = "train" if eps is None else f"train (label smoothing {eps:g})" if eps else "train (no smoothing)"
        plot_splits(ax, records, f"loss_{task}", {"train": train_label, "val": "validation (no smoothing)",
                                                   "test": "test (no smoothing)"})
        if eps:
            floor = smoothed_loss_floor(eps, NUM_CLASSES[task])
            ax.axhline(floor, color="C0", linestyle=":", linewidth=1,
                       label=f"lowest train loss possible (smoothing {eps:g}): {floor:.2f}")
        ax.set(title=f"{task} loss", xlabel="step", ylim=(0, None))
        if ax.has_data():
            ax.legend()
    return figure


def sum_follows_digit(run_dir: Path) -> bool:
    """Whether the run's sum head is structured: its sum is right exactly when its digit is."""
    return (cfg := run_config(run_dir)) is not None and cfg.model.sum_head == SumHead.structured


def run_config(run_dir: Path) -> DictConfig | None:
    """The run's config.yaml, None where there is none; ConfigError naming it when it is damaged (or a FIFO...)."""
    path = run_dir / CONFIG_NAME
    return load_config([str(path)]) if present(path) else None


def draw_error_rates(records: list[dict], one_panel: bool = False) -> Figure:
    """One panel per task (or one for both, where they agree by construction): training, validation and test
    error rate (1 - accuracy), on a log scale so that the last tenths of a percent, where runs differ, are as far
    apart as the first tens."""
    tasks = TASKS[:1] if one_panel else TASKS
    figure, axes = new_figure(1, len(tasks), (5 * len(tasks), 4))
    for ax, task in zip(axes[0], tasks):
        lines = plot_splits(ax, records, f"acc_{task}", {"train": "train", "val": "validation", "test": "test"},
                            lambda acc: 1 - acc)
        title = "digit and sum error rate\n(equal: a structured sum head)" if one_panel else f"{task} error rate"
        ax.set(title=title, xlabel="step", ylabel="error rate (1 - accuracy)")
        ax.set_yscale("log")  # an error-free window (rate 0) leaves a gap: log(0) has no place
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(percent))
        # Less than a decade shown: label the minor ticks too, in percent (matplotlib's own would read 6x10^-2).
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda rate, _, ax=ax: percent(rate) if narrow(ax) else ""))
        ax.grid(True, which="major", alpha=0.3)
        for line in lines:  # the last value, where the eye looks first
            line.set_label(f"{line.get_label()}, last {100 * line.get_ydata()[-1]:.2f}%")
        if ax.has_data():
            ax.legend()
    return figure


def percent(rate: float, _=None) -> str:
    return f"{100 * rate:g}%"


def narrow(ax) -> bool:
    low, high = ax.get_ylim()
    return low > 0 and high / low < 10


def plot_splits(ax, records: list[dict], metric: str, labels: dict[str, str], transform=lambda value: value) -> list:
    """The training and validation curves and the test points of `metric` (e.g. loss_digit); returns the lines
    drawn."""
    lines = []
    for split, (prefix, style) in SPLITS.items():
        steps, values = series(records, prefix + metric)
        if steps:  # a run cut short may not have evaluated yet
            lines += ax.plot(steps, [transform(value) for value in values], style, label=labels[split], markersize=4)
    return lines


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path)
    return path


def newest_checkpoint(run_dir: Path) -> Path | None:
    """final.pt when the run has completed (the weights the tools serve), else the newest complete step checkpoint,
    else None."""
    directory = run_dir / "checkpoints"
    if (directory / FINAL_NAME).is_file():
        return directory / FINAL_NAME
    step_paths = Checkpointer(directory, keep=0, write=False).step_paths()
    return step_paths[0] if step_paths else None


def draw_confusion(confusion: torch.Tensor, task: str, title: str) -> Figure:
    """Colour: the share of each true class (rows sum to 1), so rare classes show as clearly; text: counts."""
    n = len(confusion)
    figure, axes = new_figure(1, 1, (0.5 * n + 2, 0.5 * n + 1.5))
    ax = axes[0, 0]
    shares = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for true, predicted in confusion.nonzero().tolist():
        count = int(confusion[true, predicted])
        ax.text(predicted, true, count, ha="center", va="center", fontsize=CELL_FONT_SIZE,
                color="white" if shares[true, predicted] > 0.5 else "black")
    ax.set(title=title, xlabel=f"predicted {task}", ylabel=f"true {task}", xticks=range(n), yticks=range(n))
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return figure


@torch.no_grad()
def misclassified(model: torch.nn.Module, test_set: MNISTAdd, limit: int) -> list[dict]:
    """The first `limit` test pairs whose digit or sum is wrong, in test-set order."""
    found = []
    for indices in torch.arange(len(test_set)).split(EVAL_BATCH_SIZE):
        images, digits, addends, sums = test_set.batch(indices)
        digit_pred, sum_pred = (logits.argmax(1) for logits in model(images, addends))
        for i in ((digit_pred != digits) | (sum_pred != sums)).nonzero()[:, 0].tolist():
            found.append({"index": int(indices[i]), "digit": int(digit_pred[i]), "true_digit": int(digits[i]),
                          "sum": int(sum_pred[i]), "true_sum": int(sums[i]), "addend": int(addends[i])})
        if len(found) >= limit:  # enough for the grid: no need to score the rest
            return found[:limit]
    return found


def draw_misclassified(errors: list[dict], total: int, test_set: MNISTAdd, title: str) -> Figure:
    """The first misclassified pairs of `total`, each captioned with the predicted digit, then the addend and
    the predicted sum, each with the truth beside it."""
    rows = max(1, -(-len(errors) // GRID_COLUMNS))
    figure, axes = new_figure(rows, GRID_COLUMNS, (GRID_COLUMNS * 1.3, rows * 1.6 + 0.5))
    figure.suptitle(f"{len(errors)} of {total} errors, {title}" if errors else f"no errors, {title}")
    for ax in axes.flat:
        ax.axis("off")
    for ax, error in zip(axes.flat, errors):
        ax.imshow(test_set.data[error["index"]].cpu().numpy(), cmap="gray")
        ax.set_title(f"pred {error['digit']} (true {error['true_digit']})\n"
                     f"{error['digit']}+{error['addend']} \u2192 {error['sum']} (true {error['true_sum']})", fontsize=7)
    return figure


def plot_test_set(checkpoint_path: Path, data_root: str | None, out: Path) -> list[Path]:
    """Confusion matrices (the digit's alone where the sum follows it) and misclassified images of the checkpoint
    on the whole test set."""
    model, cfg = load_model(str(checkpoint_path))
    test_set = MNISTAdd(data_root or cfg.data.root, train=False)
    result = evaluate(model, test_set, Runtime(), EVAL_BATCH_SIZE, cfg.loss.sum)
    title = f"{checkpoint_path.name}, {result.num_pairs} test pairs"
    errors = misclassified(model, test_set, MAX_SHOWN)
    written = [save(draw_confusion(result.digit_confusion, "digit", f"digit, {title}"), out / "confusion_digit.png")]
    if cfg.model.sum_head != SumHead.structured:  # a structured sum is wrong exactly when its digit is
        written.append(save(draw_confusion(result.sum_confusion, "sum", f"sum, {title}"), out / "confusion_sum.png"))
    return written + [save(draw_misclassified(errors, result.num_pairs - result.both_correct, test_set, title),
                           out / "misclassified.png")]


def metrics_records(run_dir: Path) -> list[dict]:
    """The records of the run's metrics.jsonl that can be drawn: objects with a whole-number step and numbers. Others
    (a line of another program, a value of the wrong type) are left out with a warning; a file that is not text, or
    not a file, raises UnreadableFile."""
    path = run_dir / METRICS_NAME
    records, damaged = tracking.metrics_records(path)  # a FIFO, a device or a folder: UnreadableFile, never read
    if not records and path.stat().st_size:
        raise UnreadableFile(f"{path} holds no record: none of its lines is a JSON object with a step (binary, cut, "
                             f"or another program's); restore it, or delete its damaged lines")
    drawable = [record for record in records if _drawable(record)]
    if damaged or len(drawable) < len(records):
        print(f"warning: {path}: {damaged + len(records) - len(drawable)} of its {damaged + len(records)} lines are "
              f"not metrics (a step and numbers) and are left out of the figures", file=sys.stderr)
    return drawable


def _drawable(record) -> bool:
    numbers = (int, float, type(None))  # null: a NaN or infinity as metrics.jsonl writes it
    return (isinstance(record, dict) and type(record.get("step")) is int
            and all(type(value) in numbers for value in record.values()))


def write_report(run_dir: Path, out: Path, data_root: str | None = None) -> list[Path]:
    """All figures this run allows; returns the paths written."""
    records = metrics_records(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [save(draw_losses(records, label_smoothing(run_dir)), out / "loss.png"),
               save(draw_error_rates(records, sum_follows_digit(run_dir)), out / "accuracy.png")]
    checkpoint_path = newest_checkpoint(run_dir)
    if checkpoint_path is None:
        print(f"note: no checkpoint in {run_dir / 'checkpoints'} yet: test-set figures skipped", file=sys.stderr)
        return written
    return written + plot_test_set(checkpoint_path, data_root, out)


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("mnist_add.report", __doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run directory of mnist_add.train")
    parser.add_argument("--out", type=Path, help="where the figures go (default: RUN_DIR/report)")
    parser.add_argument("--data-root", help="folder holding MNIST/raw/ (default: the checkpoint's data.root)")
    args = parser.parse_args(argv)
    try:
        if not present(args.run_dir / METRICS_NAME):
            return refuse(f"{args.run_dir} has no {METRICS_NAME}: not a run directory of mnist_add.train, "
                          f"or the run has not logged a step yet")
        written = write_report(args.run_dir, args.out or args.run_dir / "report", args.data_root)
    except (CheckpointError, ConfigError, DatasetError, UnreadableFile) as err:
        return refuse(err)
    except OSError as err:  # a path too long, a folder that cannot be written
        return refuse(f"{err.filename}: {err.strerror}")
    print("\n".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
