"""The evaluation CLI: a checkpoint's exact scores on the test set, or on the run's validation split.

    python -m mnist_add.evaluate --checkpoint runs/default/checkpoints/final.pt [--split val] [--exhaustive] [--json]
    torchrun --nproc_per_node=N -m mnist_add.evaluate --checkpoint ...   # sharded, same numbers

The checkpoint's path is checked before torch is imported (seconds; half a minute on a busy machine), so a
mistyped path, or a final.pt that the run has not written yet, is said at once. It prints what it scored (the
checkpoint, the split, the pairs) and the scores in percent; --json gives the same as fractions.
"""

from __future__ import annotations

import argparse
import json
import sys

from mnist_add import checkpoint
from mnist_add.config import cli_parser, positive_int, refuse


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint.check_file(args.checkpoint)
    except checkpoint.CheckpointError as err:
        return refuse(err)
    return evaluate_checkpoint(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser("mnist_add.evaluate", "Evaluate a checkpoint on the MNIST-add test (or validation) set.")
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by mnist_add.train")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the test set, or the validation images the run held out (data.val_samples)")
    parser.add_argument("--exhaustive", action="store_true", help="score every test image with all ten addends")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--data-root", help="folder holding MNIST/raw/ (default: the checkpoint's data.root)")
    parser.add_argument("--batch-size", type=positive_int, default=1000, help="images per evaluation batch")
    return parser.parse_args(argv)


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    import torch  # here, after the path is checked: see the module's docstring

    from mnist_add import distributed
    from mnist_add.config import ConfigError, DistConfig
    from mnist_add.data import DatasetError
    from mnist_add.scoring import evaluate, load_model, load_split

    try:
        runtime = distributed.setup(DistConfig())
        model, cfg = load_model(args.checkpoint, runtime.device)
        if cfg.trainer.compile:  # evaluate as the run did
            model = torch.compile(model)
        dataset = load_split(args.split, args.data_root or cfg.data.root, cfg.data.val_samples).to(runtime.device)
        result = evaluate(model, dataset, runtime, args.batch_size, cfg.loss.sum, exhaustive=args.exhaustive,
                          progress=runtime.is_main and sys.stderr.isatty())
    except (checkpoint.CheckpointError, ConfigError, DatasetError) as err:  # ConfigError: the launcher's variables
        return refuse(err)
    finally:
        distributed.teardown()
    if not runtime.is_main:
        return 0
    if args.json:
        print(json.dumps({"pairs": result.num_pairs, **result.metrics(prefix="")}))
    else:
        print(f"{args.checkpoint} on the {'test set' if args.split == 'test' else 'validation split'}: "
              f"{result.num_pairs:,} (image, addend) pairs")
        print("\n".join(f"{key:>20}: {value:.2%}" if key.startswith("acc") else f"{key:>20}: {value:.4f}"
                        for key, value in result.metrics(prefix="").items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
