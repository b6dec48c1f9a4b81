"""One prediction: a digit image of any size brought into MNIST's form, and what a network reads in it with an
addend. The command line is `mnist_add.predict`.

An image is brought into MNIST's form first: grey levels, white digit on black (a dark-on-light image is
inverted), fitted into 20x20 and centred by centre of mass in 28x28.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from mnist_add.data import IMAGE_SHAPE, MEAN, STD, MNISTAdd

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
