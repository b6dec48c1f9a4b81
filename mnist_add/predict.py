"""Predict the digit and the sum for one image and an addend, with a trained checkpoint.

    python -m mnist_add.predict --checkpoint runs/default/checkpoints/final.pt digit.png 4 [--json]
    python -m mnist_add.predict --checkpoint runs/default/checkpoints/final.pt --index 123 4 [--data-root DIR]

An image of any size is brought into MNIST's form first (`mnist_add.prediction`). The arguments and the paths
they name are checked before torch is imported (seconds; half a minute on a busy machine), so a mistyped one is
said at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mnist_add import checkpoint
from mnist_add.config import cli_parser, refuse
from mnist_add.files import kind_of, present
from mnist_add.task import NUM_ADDENDS


def addend_arg(text: str) -> int:
    if not text.isdigit() or int(text) >= NUM_ADDENDS:
        raise argparse.ArgumentTypeError(f"must be an integer 0..{NUM_ADDENDS - 1}, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser("mnist_add.predict", __doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by mnist_add.train")
    # IMAGE and ADDEND are read together, so that a mistake names the argument that is wrong or missing; intermixed,
    # so that `IMAGE --index 0 3` reads as an IMAGE given beside --index, not as a stray 3.
    parser.add_argument("inputs", nargs="+", metavar="[IMAGE] ADDEND",
                        help="a PNG/JPEG/TIFF of one digit, any size (or --index N), and the number added to it, 0..9")
    parser.add_argument("--index", type=int, metavar="N", help="use MNIST test image N instead of an IMAGE file")
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder holding MNIST/raw/ for --index (default: the checkpoint's data.root)")
    parser.add_argument("--json", action="store_true", help="print the prediction as one JSON object")
    args = parser.parse_intermixed_args(argv)
    args.image, addend = image_and_addend(parser, args.inputs, args.index)
    try:
        args.addend = addend_arg(addend)
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument ADDEND: {err}")
    return args


def image_and_addend(parser: argparse.ArgumentParser, inputs: list[str], index: int | None) -> tuple[str | None, str]:
    """(IMAGE or None with --index, ADDEND) from the positional arguments, or a usage error naming what is off."""
    if index is not None and len(inputs) == 1:
        return None, inputs[0]
    if index is None and len(inputs) == 2:
        return inputs[0], inputs[1]
    if index is not None:
        parser.error("give --index N or an IMAGE, not both; then the ADDEND (0..9)")
    if len(inputs) == 1 and not inputs[0].isdigit():
        parser.error(f"the ADDEND (0..9) is missing after IMAGE {inputs[0]}")
    parser.error("give an IMAGE file (or --index N) and then the ADDEND (0..9)")


def image_problem(path: str) -> str | None:
    """What can be said of IMAGE without reading it (a FIFO or a device is never opened), or None."""
    if not present(Path(path)):
        return f"cannot read image {path}: it does not exist"
    if (kind := kind_of(Path(path))) is not None:
        return f"cannot read image {path}: it is {kind}, not an image file"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint.check_file(args.checkpoint)
    except checkpoint.CheckpointError as err:
        return refuse(err)
    if args.image is not None and (problem := image_problem(args.image)):
        return refuse(problem)
    return predict_and_print(args)


def predict_and_print(args: argparse.Namespace) -> int:
    from mnist_add.data import DatasetError  # here, after the paths are checked: see the module's docstring
    from mnist_add.prediction import InputError, mnist_test_image, predict, read_image
    from mnist_add.scoring import load_model

    try:
        model, cfg = load_model(args.checkpoint)
        if args.index is None:
            image, extra = read_image(args.image), {}
        else:
            image, digit = mnist_test_image(args.data_root or cfg.data.root, args.index)
            extra = {"index": args.index, "true_digit": digit, "true_sum": digit + args.addend}
    except (InputError, checkpoint.CheckpointError, DatasetError) as err:
        return refuse(err)
    result = {**predict(model, image, args.addend), **extra}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"digit {result['digit']} (p={result['digit_probability']:.3f})")
        print(f"sum   {result['sum']} (p={result['sum_probability']:.3f}) with addend {args.addend}")
        if extra:
            print(f"true: digit {extra['true_digit']}, sum {extra['true_sum']} (MNIST test image {args.index})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
