"""Predict the digit and the sum for one image and an addend, with a trained checkpoint.

    python -m mnist_add.predict --checkpoint runs/default/checkpoints/best.pt digit.png 4 [--json]
    python -m mnist_add.predict --checkpoint runs/default/checkpoints/best.pt --index 123 4 [--data-root DIR]

An image of any size is brought into MNIST's form first: grey levels, white digit on black
(a dark-on-light image is inverted), fitted into 20x20 and centred by centre of mass in 28x28.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from mnist_add.checkpoint import CheckpointError
from mnist_add.config import cli_parser, refuse
from mnist_add.data import IMAGE_SHAPE, MEAN, NUM_ADDENDS, STD, DatasetError, MNISTAdd
from mnist_add.scoring import load_model

DIGIT_BOX = 20  # MNIST fitted each digit into 20x20 (keeping its aspect ratio) before centring it in 28x28
INK_THRESHOLD = 0.1  # of the stretched grey range: fainter pixels (paper grain, noise) do not widen the box


class InputError(ValueError):
    """An image, addend or index the tool cannot use; the message says which and why."""


def prepare_image(image: Image.Image) -> torch.Tensor:
    """A digit image of any size and mode -> [1, 1, 28, 28] float, normalised as the training data."""
    image = ImageOps.exif_transpose(image)  # a phone photo stores "rotate me" apart from its pixels
    if "A" in image.getbands():  # transparent paper: lay it on white, as drawing programs show it
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    ink = _ink(grey_levels(image))
    rows, cols = torch.nonzero(ink > INK_THRESHOLD, as_tuple=True)
    digit = _fit_into_box(ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    return _centre_by_mass(digit).sub(MEAN).div(STD)[None, None]


def grey_levels(image: Image.Image) -> torch.Tensor:
    """[H, W] in [0, 1]. 8-bit images by 255; a float or 16/32-bit integer image (a float TIFF in 0..1, a 16-bit
    PNG) by its own range, which converting it to 8 bits would clip to black."""
    if image.mode not in ("F", "I", "I;16", "I;16B", "I;16L"):
        return pil_to_tensor(image.convert("L"))[0].float().div(255)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64).copy())
    if not pixels.isfinite().all():
        raise InputError("the image holds NaN or infinite pixel values")
    low, high = pixels.min(), pixels.max()
    return ((pixels - low) / (high - low) if high > low else pixels * 0).float()


def _ink(pixels: torch.Tensor) -> torch.Tensor:
    """[H, W] grey levels -> ink in [0, 1] on a background of 0, whatever the polarity and contrast."""
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.median() > 0.5:  # the frame is mostly background: light paper means a dark digit
        pixels, border = 1 - pixels, 1 - border
    background = border.median()
    contrast = pixels.max() - background
    if contrast < 1 / 255:
        raise InputError("the image is one flat colour: no digit to read")
    return ((pixels - background) / contrast).clamp(0, 1)


def _fit_into_box(digit: torch.Tensor) -> torch.Tensor:
    """Scale [h, w] so that its longer side is DIGIT_BOX pixels, antialiased like MNIST's grey edges."""
    scale = DIGIT_BOX / max(digit.shape)
    size = [max(1, round(side * scale)) for side in digit.shape]
    return F.interpolate(digit[None, None], size=size, mode="bilinear", antialias=True)[0, 0].clamp(0, 1)


def _centre_by_mass(digit: torch.Tensor) -> torch.Tensor:
    """Place [h, w] in a black 28x28 field with its centre of mass on pixel (14, 14), as MNIST did.

    (14, 14), not (13.5, 13.5): the mean centre of mass of the MNIST test images is (13.99, 14.01).
    """
    height, width = IMAGE_SHAPE
    field = torch.zeros(IMAGE_SHAPE)
    mass = digit.sum()
    centre_y = (digit.sum(1) * torch.arange(digit.shape[0])).sum() / mass
    centre_x = (digit.sum(0) * torch.arange(digit.shape[1])).sum() / mass
    # A lopsided digit would be pushed over the edge; keeping it whole matters more than exact centring.
    top = min(max(round(float(height // 2 - centre_y)), 0), height - digit.shape[0])
    left = min(max(round(float(width // 2 - centre_x)), 0), width - digit.shape[1])
    field[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return field


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor, addend: int) -> dict:
    """The most likely digit and sum for one normalised image [1, 1, 28, 28], with their probabilities."""
    device = next(model.parameters()).device
    digit_logits, sum_logits = model(image.to(device), torch.tensor([addend], device=device))
    digit_probs, sum_probs = (logits.float().softmax(1)[0] for logits in (digit_logits, sum_logits))
    digit, total = int(digit_probs.argmax()), int(sum_probs.argmax())
    return {"digit": digit, "digit_probability": float(digit_probs[digit]), "addend": addend,
            "sum": total, "sum_probability": float(sum_probs[total])}


def read_image(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return prepare_image(image)
    except (OSError, Image.DecompressionBombError) as err:  # missing, not an image, truncated
        raise InputError(f"cannot read image {path}: {err}") from err


def mnist_test_image(data_root: str, index: int) -> tuple[torch.Tensor, int]:
    """MNIST test image `index`, normalised as in training, and its true digit."""
    test_set = MNISTAdd(data_root, train=False)
    if not 0 <= index < len(test_set):
        raise InputError(f"--index {index} is out of range: the test set has images 0..{len(test_set) - 1}")
    image, digit, _, _ = test_set[index]
    return image[None], digit


def addend_arg(text: str) -> int:
    if not text.isdigit() or int(text) >= NUM_ADDENDS:
        raise argparse.ArgumentTypeError(f"must be an integer 0..{NUM_ADDENDS - 1}, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser("mnist_add.predict", __doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by mnist_add.train")
    # IMAGE and ADDEND are read together, so that a mistake names the argument that is wrong or missing.
    parser.add_argument("inputs", nargs="+", metavar="[IMAGE] ADDEND",
                        help="a PNG/JPEG/TIFF of one digit, any size (or --index N), and the number added to it, 0..9")
    parser.add_argument("--index", type=int, metavar="N", help="use MNIST test image N instead of an IMAGE file")
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder holding MNIST/raw/ for --index (default: the checkpoint's data.root)")
    parser.add_argument("--json", action="store_true", help="print the prediction as one JSON object")
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, cfg = load_model(args.checkpoint)
        if args.index is None:
            image, extra = read_image(args.image), {}
        else:
            image, digit = mnist_test_image(args.data_root or cfg.data.root, args.index)
            extra = {"index": args.index, "true_digit": digit, "true_sum": digit + args.addend}
    except (InputError, CheckpointError, DatasetError) as err:
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
