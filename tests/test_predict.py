import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_module
from mnist_add.data import MEAN, STD, MNISTAdd
from mnist_add.scoring import load_model
from mnist_add.predict import main
from mnist_add.prediction import predict, prepare_image, read_image
from mnist_add.train import train

NUM_IMAGES = 20  # the first test images: nine of the ten digits, well under a second of work


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A small convnet with the structured sum head, good enough (>85%) that predictions mean something.
    6000 images: trained on 3000, the SiLU default read 4 of 20 re-rendered digits differently."""
    from mnist_add.config import load_config
    run = tmp_path_factory.mktemp("trained")
    # One thread: two processes' worth on the 2 shared cores makes this ten times slower.
    summary = train(load_config(["debug"], [
        f"data.root={data_root}", f"run.dir={run}", "data.augment=false", "data.train_samples=6000",
        "data.test_samples=1000", "trainer.epochs=2", "trainer.batch_size=64", "trainer.num_threads=1"]))
    assert summary["test"]["acc_digit"] > 0.85, summary["test"]
    model, _ = load_model(f"{run}/checkpoints/best.pt")
    return run / "checkpoints" / "best.pt", model


@pytest.fixture(scope="module")
def mnist_test(data_root):
    return MNISTAdd(data_root, train=False)


def render(digit: torch.Tensor, dark_on_light: bool) -> Image.Image:
    """An MNIST digit [28, 28] uint8 drawn twice as large, off-centre, on a 80x100 (w x h) page."""
    large = F.interpolate(digit[None, None].float(), scale_factor=2, mode="bilinear")[0, 0]
    page = torch.zeros(100, 80, dtype=torch.uint8)
    page[30:86, 11:67] = large.round().clamp(0, 255).byte()
    return Image.fromarray((255 - page if dark_on_light else page).numpy())


def original(mnist_test: MNISTAdd, index: int) -> torch.Tensor:
    return mnist_test[index][0][None]


def longest_ink_side(image: torch.Tensor) -> int:
    """The longer side of the box around the ink of a normalised [1, 1, 28, 28] digit, in pixels."""
    rows, cols = torch.nonzero(image[0, 0] * STD + MEAN > 0.1, as_tuple=True)
    return max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1


def test_prepare_image_turns_a_rerendered_digit_back_into_its_mnist_form(mnist_test):
    differences = []
    for index in range(NUM_IMAGES):
        prepared = prepare_image(render(mnist_test.data[index], dark_on_light=False))
        assert prepared.shape == (1, 1, 28, 28)
        # MNIST fitted every digit into a 20x20 box: a box 10% off makes every digit 2 pixels off.
        sides = longest_ink_side(prepared), longest_ink_side(original(mnist_test, index))
        assert sides == (20, 20), (index, sides)
        differences.append(float(((prepared - original(mnist_test, index)) * STD).abs().mean()))
    # Mean pixel differences in [0, 1] grey levels: shifting an MNIST digit by one pixel costs ~0.065.
    assert max(differences) < 0.1 and sum(differences) / NUM_IMAGES < 0.05, differences


def test_a_dark_digit_on_light_paper_is_inverted_to_the_same_input(mnist_test):
    for index in range(NUM_IMAGES):
        light = prepare_image(render(mnist_test.data[index], dark_on_light=True))
        dark = prepare_image(render(mnist_test.data[index], dark_on_light=False))
        assert torch.allclose(light, dark, atol=1e-5), index


@pytest.mark.parametrize("mode, scale", [("F", 1 / 255), ("F", 1.0), ("I;16", 257)])
def test_a_float_or_16_bit_image_reads_by_its_range_as_its_8_bit_twin(mnist_test, tmp_path, mode, scale):
    for index in range(NUM_IMAGES):
        page = np.asarray(render(mnist_test.data[index], dark_on_light=False), dtype=np.float32) * scale
        path = tmp_path / f"{index}.tiff"
        Image.fromarray(page.astype(np.uint16) if mode == "I;16" else page, mode=None).save(path)
        eight_bit = prepare_image(render(mnist_test.data[index], dark_on_light=False))
        assert torch.allclose(read_image(str(path)), eight_bit, atol=1e-4), index


def test_a_dark_digit_on_transparent_paper_reads_as_on_white_paper(mnist_test):
    on_white = render(mnist_test.data[0], dark_on_light=True)
    on_glass = Image.new("RGBA", on_white.size, (0, 0, 0, 0))  # transparent black, as drawing programs save it
    on_glass.putalpha(Image.eval(on_white, lambda grey: 255 - grey))  # ink opaque where the page is dark
    assert torch.allclose(prepare_image(on_glass), prepare_image(on_white), atol=1e-5)


def test_a_blank_image_is_refused():
    with pytest.raises(ValueError, match="flat colour"):
        prepare_image(Image.new("L", (50, 40), color=255))


def test_png_round_trip_predicts_what_the_original_predicts(trained, mnist_test, tmp_path):
    _, model = trained
    agree = right = 0
    for index in range(NUM_IMAGES):
        path = tmp_path / f"{index}.png"
        render(mnist_test.data[index], dark_on_light=index % 2 == 0).save(path)
        with Image.open(path) as image:
            from_png = predict(model, prepare_image(image), addend=3)["digit"]
        agree += from_png == predict(model, original(mnist_test, index), addend=3)["digit"]
        right += from_png == int(mnist_test.targets[index])
    assert agree >= NUM_IMAGES - 3 and right >= NUM_IMAGES - 3, (agree, right)  # a small model: borderline cases flip


def test_a_structured_head_predicts_sum_equal_to_digit_plus_addend(trained, mnist_test):
    _, model = trained
    for addend in range(10):
        result = predict(model, original(mnist_test, addend), addend)
        assert result["sum"] == result["digit"] + addend
        # The sum distribution is the digit distribution shifted by the addend.
        assert result["sum_probability"] == pytest.approx(result["digit_probability"])


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (a subprocess costs seconds of imports): exit code, stdout, stderr."""
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's way out
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_predicts_an_image_file(trained, mnist_test, tmp_path):
    checkpoint, model = trained
    path = tmp_path / "digit.png"
    render(mnist_test.data[0], dark_on_light=True).resize((300, 375)).save(path)
    result = run_module("mnist_add.predict", "--checkpoint", str(checkpoint), str(path), "6", "--json")
    assert result.returncode == 0, result.stderr
    with Image.open(path) as image:
        assert json.loads(result.stdout) == pytest.approx(predict(model, prepare_image(image), 6))


def test_cli_index_predicts_the_mnist_test_image(trained, mnist_test, data_root, capsys):
    checkpoint, model = trained
    code, out, _ = run_cli(capsys, "--checkpoint", str(checkpoint), "--index", "7", "2", "--json",
                           "--data-root", data_root)
    assert code == 0
    label = int(mnist_test.targets[7])
    assert json.loads(out) == pytest.approx(
        {**predict(model, original(mnist_test, 7), 2), "index": 7, "true_digit": label, "true_sum": label + 2})


@pytest.fixture
def not_an_image(tmp_path):
    path = tmp_path / "digit.png"
    path.write_text("not a PNG")
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("unreadable image", "cannot read image"), ("missing image", "cannot read image"),
    ("addend 10", "ADDEND: must be an integer 0..9"), ("image and --index", "--index N or an IMAGE, not both"),
    ("image, then --index", "--index N or an IMAGE, not both"),  # not 'unrecognized arguments: 3', the valid addend
    ("addend forgotten", "the ADDEND (0..9) is missing after IMAGE"), ("image forgotten", "give an IMAGE file"),
    ("missing checkpoint", "does not exist"), ("corrupt checkpoint", "truncated or corrupt"),
    ("index out of range", "out of range")])
def test_cli_bad_input_is_a_one_line_error(case, message, trained, not_an_image, tmp_path, data_root, capsys):
    checkpoint, _ = trained
    args = {"unreadable image": [str(checkpoint), not_an_image, "3"],
            "missing image": [str(checkpoint), str(tmp_path / "missing.png"), "3"],
            "addend 10": [str(checkpoint), "--index", "0", "10"],
            "image and --index": [str(checkpoint), "--index", "0", not_an_image, "3"],
            "image, then --index": [str(checkpoint), not_an_image, "--index", "0", "3"],
            "addend forgotten": [str(checkpoint), not_an_image],
            "image forgotten": [str(checkpoint), "3"],
            "missing checkpoint": [str(tmp_path / "missing.pt"), "--index", "0", "3"],
            "corrupt checkpoint": [not_an_image, "--index", "0", "3"],
            "index out of range": [str(checkpoint), "--index", "10000", "3", "--data-root", data_root]}[case]
    code, out, err = run_cli(capsys, "--checkpoint", *args)
    assert code != 0 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("case, said", [("missing checkpoint", "checkpoint {tmp}/missing.pt does not exist"),
                                        ("missing image", "cannot read image {tmp}/missing.png: it does not exist"),
                                        ("image a folder", "cannot read image {tmp}: it is a directory, not an image file")])
def test_a_mistyped_path_is_said_before_torch_is_imported(case, said, not_an_image, tmp_path):
    args = {"missing checkpoint": [str(tmp_path / "missing.pt"), "--index", "0", "3"],
            "missing image": [not_an_image, str(tmp_path / "missing.png"), "3"],  # a checkpoint is read after torch
            "image a folder": [not_an_image, str(tmp_path), "3"]}[case]
    result = run_module("mnist_add.predict", "--checkpoint", *args, launcher=(sys.executable, "-X", "importtime"))
    *imports, line = result.stderr.splitlines()
    assert result.returncode == 2 and line == f"error: {said.format(tmp=tmp_path)}", result.stderr[-2000:]
    imported = {entry.rpartition("|")[2].strip() for entry in imports}
    assert "omegaconf" in imported and "torch" not in imported


def test_an_error_on_the_command_line_is_one_line_without_traceback(trained, not_an_image):
    checkpoint, _ = trained
    result = run_module("mnist_add.predict", "--checkpoint", str(checkpoint), not_an_image, "3")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: cannot read image") and result.stderr.count("\n") == 1, result.stderr
