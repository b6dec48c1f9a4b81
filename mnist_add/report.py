"""Figures of a run, finished or not: learning curves from metrics.jsonl, and test-set figures of its checkpoint.

    python -m mnist_add.report runs/default [--out DIR] [--data-root DIR]

Writes into RUN_DIR/report/ (or --out) and prints the paths written:
    loss.png, accuracy.png          per task, training and validation, over steps
    confusion_digit.png, confusion_sum.png, misclassified.png
                                    the test set scored by best.pt (else the newest step checkpoint)
A run that is still going or was preempted works too: no summary.json is needed, and a run
without a checkpoint yet gets the learning curves only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mnist_add.checkpoint import BEST_NAME, Checkpointer, CheckpointError
from mnist_add.data import DatasetError, MNISTAdd
from mnist_add.distributed import Runtime
from mnist_add.evaluate import evaluate, load_model
from mnist_add.tracking import METRICS_NAME, read_metrics

TASKS = ("digit", "sum")
MAX_SHOWN = 32  # misclassified test images in the grid: enough to see patterns, few enough to read
GRID_COLUMNS = 8
EVAL_BATCH_SIZE = 1000


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A figure drawn by Agg: PNG files on a headless node, and no pyplot state to leak between figures."""
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has `key`: train and evaluation records interleave."""
    points = [(r["step"], r[key]) for r in records if key in r]
    return [step for step, _ in points], [value for _, value in points]


def plot_curves(records: list[dict], metric: str, path: Path) -> Path:
    """One panel per task: the training curve and the validation points of `metric` (loss or acc)."""
    figure, axes = new_figure(1, len(TASKS), (10, 4))
    for ax, task in zip(axes[0], TASKS):
        for split, style in (("train", "-"), ("val", "o-")):
            steps, values = series(records, f"{split}/{metric}_{task}")
            if steps:  # a run cut short may not have evaluated yet
                ax.plot(steps, values, style, label=split, markersize=4)
        ax.set(title=f"{task} {metric}", xlabel="step")
        if ax.has_data():
            ax.legend()
    figure.savefig(path)
    return path


def newest_checkpoint(run_dir: Path) -> Path | None:
    """best.pt when the run has evaluated once, else the newest complete step checkpoint, else None."""
    directory = run_dir / "checkpoints"
    if (directory / BEST_NAME).is_file():
        return directory / BEST_NAME
    step_paths = Checkpointer(directory, keep=0, write=False).step_paths()
    return step_paths[0] if step_paths else None


def plot_confusion(confusion: torch.Tensor, task: str, title: str, path: Path) -> Path:
    """Colour: the share of each true class (rows sum to 1), so rare classes show as clearly; text: counts."""
    n = len(confusion)
    figure, axes = new_figure(1, 1, (0.45 * n + 2, 0.45 * n + 1.5))
    ax = axes[0, 0]
    shares = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for true, predicted in confusion.nonzero().tolist():
        count = int(confusion[true, predicted])
        ax.text(predicted, true, count, ha="center", va="center", fontsize=6,
                color="white" if shares[true, predicted] > 0.5 else "black")
    ax.set(title=title, xlabel=f"predicted {task}", ylabel=f"true {task}", xticks=range(n), yticks=range(n))
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    figure.savefig(path)
    return path


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


def plot_misclassified(errors: list[dict], test_set: MNISTAdd, title: str, path: Path) -> Path:
    rows = max(1, -(-len(errors) // GRID_COLUMNS))
    figure, axes = new_figure(rows, GRID_COLUMNS, (GRID_COLUMNS * 1.3, rows * 1.6 + 0.5))
    figure.suptitle(title if errors else f"{title}: none misclassified")
    for ax in axes.flat:
        ax.axis("off")
    for ax, error in zip(axes.flat, errors):
        ax.imshow(test_set.data[error["index"]].cpu().numpy(), cmap="gray")
        ax.set_title(f"digit {error['digit']} (true {error['true_digit']})\n"
                     f"+{error['addend']}: sum {error['sum']} ({error['true_sum']})", fontsize=7)
    figure.savefig(path)
    return path


def plot_test_set(checkpoint_path: Path, data_root: str | None, out: Path) -> list[Path]:
    """Confusion matrices and misclassified images of the checkpoint on the whole test set."""
    model, cfg = load_model(str(checkpoint_path))
    test_set = MNISTAdd(data_root or cfg.data.root, train=False)
    result = evaluate(model, test_set, Runtime(), EVAL_BATCH_SIZE, cfg.loss.sum)
    title = f"{checkpoint_path.name}, {result.num_pairs} test pairs"
    return [plot_confusion(result.digit_confusion, "digit", f"digit, {title}", out / "confusion_digit.png"),
            plot_confusion(result.sum_confusion, "sum", f"sum, {title}", out / "confusion_sum.png"),
            plot_misclassified(misclassified(model, test_set, MAX_SHOWN), test_set,
                               f"misclassified, {title}", out / "misclassified.png")]


def write_report(run_dir: Path, out: Path, data_root: str | None = None) -> list[Path]:
    """All figures this run allows; returns the paths written."""
    records = read_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(records, "loss", out / "loss.png"), plot_curves(records, "acc", out / "accuracy.png")]
    checkpoint_path = newest_checkpoint(run_dir)
    if checkpoint_path is None:
        print(f"note: no checkpoint in {run_dir / 'checkpoints'} yet: test-set figures skipped", file=sys.stderr)
        return written
    return written + plot_test_set(checkpoint_path, data_root, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run directory of mnist_add.train")
    parser.add_argument("--out", type=Path, help="where the figures go (default: RUN_DIR/report)")
    parser.add_argument("--data-root", help="folder holding MNIST/raw/ (default: the checkpoint's data.root)")
    args = parser.parse_args(argv)
    if not (args.run_dir / METRICS_NAME).is_file():
        print(f"error: {args.run_dir} has no {METRICS_NAME}: not a run directory of mnist_add.train, "
              f"or the run has not logged a step yet", file=sys.stderr)
        return 1
    try:
        written = write_report(args.run_dir, args.out or args.run_dir / "report", args.data_root)
    except (CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
