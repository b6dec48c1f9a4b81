import errno
import http.server
import math
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import MNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from mnist_add.config import ConfigError, load_config
from mnist_add.data import (ELASTIC_GRID, MEAN, NUM_ADDENDS, STD, Augment, DatasetError, GlobalBatchSampler, MNISTAdd,
                            build_datasets)


@pytest.fixture(scope="module")
def train_set(data_root):
    return MNISTAdd(data_root, train=True, seed=7)


def test_training_addends_cover_zero_to_nine_uniformly(train_set):
    counts = torch.bincount(train_set.addends())
    assert len(counts) == NUM_ADDENDS  # nothing above 9 ...
    assert counts.min() > 5500  # ... and 9 as often as the rest: the seed's randrange(0, 9) bug is gone


def test_items_are_image_digit_addend_sum(train_set):
    image, digit, addend, total = train_set[123]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert digit == int(train_set.targets[123]) and total == digit + addend and 0 <= addend <= 9
    batch = train_set.batch(torch.tensor([123, 5]))
    assert torch.equal(batch.images[0], image) and batch.sums.tolist()[0] == total


def test_addends_are_a_function_of_seed_epoch_and_index(data_root, train_set):
    again = MNISTAdd(data_root, train=True, seed=7)  # a restart
    assert torch.equal(again.addends(), train_set.addends())
    again.set_epoch(1)
    assert not torch.equal(again.addends(), train_set.addends())
    again.set_epoch(0)
    assert torch.equal(again.addends(), train_set.addends())
    assert not torch.equal(MNISTAdd(data_root, train=True, seed=8).addends(), train_set.addends())


def test_subset_sees_the_same_addends_as_the_full_set(data_root, train_set):
    subset = MNISTAdd(data_root, train=True, seed=7, num_samples=100)
    assert len(subset) == 100 and torch.equal(subset.addends(), train_set.addends()[:100])


def test_worker_processes_see_the_same_addends(train_set):
    loader = DataLoader(train_set, batch_size=50, num_workers=2, sampler=range(100))
    addends = torch.cat([addend for _, _, addend, _ in loader])
    assert torch.equal(addends, train_set.addends()[:100])


def test_test_addends_never_change(data_root):
    a = MNISTAdd(data_root, train=False, seed=1)
    b = MNISTAdd(data_root, train=False, seed=2)
    b.set_epoch(5)
    assert torch.equal(a.addends(), b.addends())
    assert torch.bincount(a.addends()).min() > 900


@pytest.mark.parametrize("max_elastic_px", [0.0, 2.0])
def test_augmentation_is_deterministic_and_changes_images(data_root, max_elastic_px):
    aug = Augment(10, 2, 0.1, max_elastic_px)
    first = MNISTAdd(data_root, train=True, seed=3, num_samples=64, augment=aug).batch(torch.arange(64))
    second = MNISTAdd(data_root, train=True, seed=3, num_samples=64, augment=aug).batch(torch.arange(64))
    plain = MNISTAdd(data_root, train=True, seed=3, num_samples=64).batch(torch.arange(64))
    assert torch.equal(first.images, second.images)
    assert not torch.allclose(first.images, plain.images)
    assert (first.images - plain.images).abs().mean() < 0.5  # warped, not destroyed


def test_an_unwarped_epoch_has_the_plain_images_and_the_same_addends(data_root):
    warped = MNISTAdd(data_root, train=True, seed=3, num_samples=64, augment=Augment(10, 2, 0.1))
    warped.set_epoch(2)
    before = warped.batch(torch.arange(64))
    warped.set_epoch(2, warp=False)
    clean = warped.batch(torch.arange(64))
    plain = MNISTAdd(data_root, train=True, seed=3, num_samples=64)
    plain.set_epoch(2)
    assert torch.equal(clean.images, plain.batch(torch.arange(64)).images)
    assert torch.equal(clean.addends, before.addends) and not torch.equal(clean.images, before.images)


@pytest.mark.parametrize("train", [True, False])
def test_the_files_read_as_torchvision_reads_them(data_root, train):
    ours = MNISTAdd(data_root, train=train)
    raw = Path(data_root) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    assert torch.equal(ours.data, read_image_file(str(raw / f"{prefix}-images-idx3-ubyte")))
    assert torch.equal(ours.targets, read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte")))


def test_training_starts_without_importing_torchvision():
    """torchvision's import takes seconds (it pulls in torch._dynamo), on every rank of every launch: only a
    download, predict's image reading and these tests need it."""
    imported = subprocess.run([sys.executable, "-c", "import sys, mnist_add.train; print('torchvision' in sys.modules)"],
                              capture_output=True, text=True, check=True).stdout
    assert imported == "False\n"


def test_missing_dataset_error_names_the_path_and_both_fixes(tmp_path):
    with pytest.raises(DatasetError) as err:
        MNISTAdd(str(tmp_path), train=True, download=False)
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data.download=true" in message and "data.root=" in message


@pytest.fixture
def closed_port():
    """A loopback port bound but not listening: connecting is refused at once, and nothing else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def local_mirror(monkeypatch):
    """Start an HTTP server on 127.0.0.1 answering every GET with (status, body); returns its URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy in the environment must not see these requests
    servers = []

    def start(status: int, body: bytes = b"") -> str:
        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def download_error(monkeypatch, root, mirrors: list[str]) -> str:
    monkeypatch.setattr(MNIST, "mirrors", mirrors)
    with pytest.raises(DatasetError) as err:
        MNISTAdd(str(root), train=True, download=True)
    return str(err.value)


def assert_names_both_fixes_on_one_line(message: str, root) -> None:
    assert message.startswith(f"MNIST not found in {root / 'MNIST' / 'raw'} (downloading ")
    assert "data.download=true" in message and "\n" not in message
    assert "point MNIST_ADD_DATA_ROOT (or data.root=) at a folder that holds MNIST/raw/" in message


def test_failed_download_names_each_mirrors_reason_and_both_fixes(tmp_path, monkeypatch, closed_port, local_mirror):
    refusing, missing, root = f"http://127.0.0.1:{closed_port}/", local_mirror(404), tmp_path / "data"
    message = download_error(monkeypatch, root, [refusing, missing])
    assert not root.exists()  # no empty data/MNIST/raw/ left behind
    assert (f"downloading train-images-idx3-ubyte.gz failed: {refusing} gave [Errno {errno.ECONNREFUSED}] "
            f"Connection refused; "
            f"{missing} gave HTTP Error 404: Not Found)") in message
    assert_names_both_fixes_on_one_line(message, root)


def test_failed_download_names_a_proxy_refusal(tmp_path, monkeypatch, local_mirror):
    # What urllib raises when a proxy refuses an http:// request without credentials.
    message = download_error(monkeypatch, tmp_path, [local_mirror(407)])
    assert "gave HTTP Error 407: Proxy Authentication Required)" in message
    assert_names_both_fixes_on_one_line(message, tmp_path)


def test_failed_download_names_a_full_disk(tmp_path, monkeypatch, local_mirror):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").symlink_to("/dev/full")  # every write fails with ENOSPC
    message = download_error(monkeypatch, tmp_path, [local_mirror(200, b"x" * 1000)])
    assert f"(downloading failed: [Errno {errno.ENOSPC}] No space left on device)" in message
    assert_names_both_fixes_on_one_line(message, tmp_path)


def test_truncated_files_give_a_clear_error(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(f"{data_root}/MNIST/raw", raw)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        MNISTAdd(str(tmp_path), train=False)


@pytest.mark.parametrize("world_size", [2, 3])
def test_global_batches_do_not_depend_on_the_world_size(train_set, world_size):
    single = GlobalBatchSampler(train_set, 12, 1, 0, seed=5)
    ranks = [GlobalBatchSampler(train_set, 12, world_size, r, seed=5) for r in range(world_size)]
    for sampler in (single, *ranks):
        sampler.set_epoch(2)
    for whole, *shares in list(zip(single, *ranks))[:50]:
        assert torch.equal(whole, torch.cat(shares))


def test_sampler_resumes_at_a_step_and_changes_with_the_epoch(train_set):
    sampler = GlobalBatchSampler(train_set, 100, 1, 0, seed=0)
    full = list(sampler)
    assert len(full) == 600 and len(torch.cat(full).unique()) == len(train_set) == 60000
    sampler.set_start_step(598)
    assert len(sampler) == 2 and torch.equal(torch.cat(list(sampler)), torch.cat(full[598:]))
    sampler.set_epoch(1)
    assert not torch.equal(next(iter(sampler)), full[598])


@pytest.mark.parametrize("world_size, left_out", [(1, 0), (2, 0), (3, 2)])
def test_the_short_last_batch_is_trained_in_equal_shares_and_only_what_no_rank_can_share_is_left_out(
        train_set, world_size, left_out):
    subset = MNISTAdd(train_set.root, train=True, num_samples=512)  # 10 batches of 48 and 32 images over
    ranks = [GlobalBatchSampler(subset, 48, world_size, r, seed=5) for r in range(world_size)]
    assert ranks[0].steps_per_epoch == 11 and ranks[0].left_out == left_out
    steps = [torch.cat(shares) for shares in zip(*ranks)]
    assert [len(s) for s in steps] == [48] * 10 + [32 - left_out]
    assert len(set(len(share) for share in list(zip(*ranks))[-1])) == 1  # equal shares of the short batch
    assert len(torch.cat(steps).unique()) == 512 - left_out
    whole = GlobalBatchSampler(subset, 48, 1, 0, seed=5)
    assert torch.equal(torch.cat(steps), torch.cat(list(whole))[:512 - left_out])  # the same sequence
    dropped = GlobalBatchSampler(subset, 48, world_size, 0, seed=5, drop_last=True)
    assert dropped.steps_per_epoch == 10 and dropped.left_out == 32


def test_global_batch_must_divide_over_ranks(train_set):
    with pytest.raises(ConfigError, match="multiple of 3"):
        GlobalBatchSampler(train_set, 32, 3, 0, seed=0)



def test_batches_are_normalised_as_the_seed_did(train_set):
    images = train_set.batch(torch.tensor([0, 5])).images
    expected = (train_set.data[[0, 5]].float() / 255 - MEAN) / STD
    assert torch.allclose(images[:, 0], expected, atol=1e-5)


def test_a_shift_of_one_pixel_moves_the_image_by_one_pixel():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 10:14, 10:14] = 255
    one_px = Augment(max_rotation_deg=0, max_shift_px=1, max_scale_delta=0)
    warps = torch.tensor([[0.0, one_px.max_shift, 0.0, 1.0]])  # the largest shift the draw allows, along x
    moved = Augment.apply(image, warps)[0, 0]
    assert torch.allclose(moved[10:14, 9:13], torch.full((4, 4), 255.0), atol=1e-3)  # content one column left
    assert moved[10:14, 13].abs().max() < 1e-3


def test_a_uniform_elastic_offset_moves_the_image_as_the_same_shift_does():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 8:20, 11:15] = 255
    elastic = Augment(max_rotation_deg=0, max_shift_px=0, max_scale_delta=0, max_elastic_px=1)
    offsets = torch.cat([torch.full((ELASTIC_GRID ** 2,), elastic.max_elastic), torch.zeros(ELASTIC_GRID ** 2)])
    bent = elastic.apply(image, torch.cat([torch.tensor([0.0, 0.0, 0.0, 1.0]), offsets])[None])
    shifted = Augment.apply(image, torch.tensor([[0.0, 2 / 28, 0.0, 1.0]]))  # one pixel along x
    assert torch.allclose(bent, shifted, atol=1e-3) and not torch.allclose(bent, image)


def test_elastic_offsets_are_drawn_after_and_apart_from_the_affine_warps():
    affine = Augment(10, 2, 0.1).draw(10_000, torch.Generator().manual_seed(0))
    both = Augment(10, 2, 0.1, max_elastic_px=3).draw(10_000, torch.Generator().manual_seed(0))
    assert affine.shape == (10_000, 4) and both.shape == (10_000, 4 + 2 * ELASTIC_GRID ** 2)
    assert torch.equal(both[:, :4], affine)  # the affine-only recipe draws what it always drew
    offsets = both[:, 4:]
    assert offsets.abs().max() <= 2 * 3 / 28 and offsets.abs().max() > 2 * 3 / 28 * 0.99
    assert offsets.mean().abs() < 0.01 and offsets[:, 0].std() > 0.1  # centred, and drawn per sample


def test_draws_stay_within_the_configured_ranges():
    augment = Augment(max_rotation_deg=10, max_shift_px=2, max_scale_delta=0.1)
    angle, tx, ty, scale = augment.draw(10_000, torch.Generator().manual_seed(0)).unbind(1)
    assert angle.abs().max() <= math.radians(10) and angle.abs().max() > math.radians(9.9)
    assert tx.abs().max() <= 2 * 2 / 28 and ty.abs().max() > 2 * 2 / 28 * 0.99
    assert (scale - 1).abs().max() <= 0.1 and (scale - 1).abs().max() > 0.099


@pytest.mark.parametrize("corruption", ["label", "count"])
def test_loaded_files_with_a_bad_label_or_count_are_refused(data_root, tmp_path, corruption):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(Path(data_root) / "MNIST" / "raw", raw)
    labels = raw / "t10k-labels-idx1-ubyte"
    content = bytearray(labels.read_bytes())
    if corruption == "label":
        content[8] = 10  # the first label: a digit that does not exist
    else:
        content = content[:-1]  # one label short
        content[4:8] = (9_999).to_bytes(4, "big")
    labels.write_bytes(bytes(content))
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        MNISTAdd(str(tmp_path), train=False)


def test_one_global_batch_may_take_the_whole_dataset(train_set):
    sampler = GlobalBatchSampler(train_set, len(train_set), 1, 0, seed=0)
    assert sampler.steps_per_epoch == 1 and len(next(iter(sampler))) == len(train_set)


def test_the_validation_split_is_held_out_of_training_and_fixed(data_root):
    cfg = load_config(["debug"], [f"data.root={data_root}", "data.val_samples=5000", "data.train_samples=0"])
    splits = build_datasets(cfg.data, seed=1, device=torch.device("cpu"))
    train, val = set(splits.train.source.tolist()), set(splits.val.source.tolist())
    assert len(val) == 5000 and len(train) == 55_000 and not train & val  # disjoint, and together all 60k
    full = MNIST(data_root, train=True)
    assert torch.equal(splits.val.data, full.data[splits.val.source])
    assert torch.equal(splits.train.data, full.data[splits.train.source])
    again = build_datasets(cfg.data, seed=2, device=torch.device("cpu"))  # another run's seed: the same split
    assert torch.equal(again.val.source, splits.val.source)
    # Fixed pairs, unwarped: the validation split is scored as the test set is, whatever the epoch.
    first = splits.val.batch(torch.arange(64))
    splits.val.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(first, splits.val.batch(torch.arange(64))))
    plain = (full.data[splits.val.source[:64]].unsqueeze(1).float() / 255 - MEAN) / STD
    assert torch.allclose(first.images, plain, atol=1e-5)


def test_training_subsets_and_nothing_held_out_read_as_before(data_root):
    whole = MNISTAdd(data_root, train=True, seed=7, num_samples=300, holdout=0)
    assert torch.equal(whole.source, torch.arange(300))  # data.val_samples=0: the old training images and pairs
    held = MNISTAdd(data_root, train=True, seed=7, num_samples=300, holdout=5000)
    every = MNISTAdd(data_root, train=True, seed=7)
    assert torch.equal(held.addends(), every.addends()[held.source])  # a subset sees the full set's pairs
