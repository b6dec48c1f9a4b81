import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from mnist_add.checkpoint import BEST_NAME, Checkpointer, CheckpointError, load, save_atomic


def test_save_keeps_the_newest_k_and_best_apart(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, write=True)
    for step in (1, 2, 3):
        ckpt.save({"step": step}, step, best=step == 1)
    assert [p.name for p in ckpt.step_paths()] == ["step-00000003.pt", "step-00000002.pt"]
    assert load(tmp_path / BEST_NAME) == {"step": 1}


def test_a_reader_rank_writes_nothing(tmp_path):
    Checkpointer(tmp_path / "ckpt", keep=2, write=False).save({"step": 1}, 1, best=True)
    assert not (tmp_path / "ckpt").exists()


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path):
    # A real process is SIGKILLed in the middle of writing its second checkpoint.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from mnist_add.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r}, keep=2, write=True)
        ckpt.save({{"weights": torch.ones(1000)}}, 1)
        def dying_fsync(fd):  # half the file reached the disk when the process died
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = dying_fsync
        ckpt.save({{"weights": torch.zeros(1000)}}, 2)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    assert any(p.name.startswith(".step-00000002.pt.tmp") for p in tmp_path.iterdir())  # the half-written file
    ckpt = Checkpointer(tmp_path, keep=2, write=True)
    assert [p.name for p in ckpt.step_paths()] == ["step-00000001.pt"]
    assert torch.equal(load(ckpt.step_paths()[0])["weights"], torch.ones(1000))


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep=3, write=True)
    ckpt.save({"step": 1}, 1)
    ckpt.save({"step": 2}, 2)
    newest = ckpt.step_paths()[0]
    newest.write_bytes(newest.read_bytes()[:40])
    restored = []
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore_newest(lambda state, path: restored.append(state)) == tmp_path / "step-00000001.pt"
    assert restored == [{"step": 1}]
    assert "step-00000002.pt is truncated or corrupt" in caplog.text


def test_a_checkpoint_that_does_not_fit_falls_back_too(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, write=True)
    ckpt.save({"step": 1}, 1)
    ckpt.save({"step": 2}, 2)

    def restore(state, path):
        if state["step"] == 2:
            raise CheckpointError("does not fit this model")
    assert ckpt.restore_newest(restore).name == "step-00000001.pt"


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, write=True)
    ckpt.save({"step": 1}, 1)
    ckpt.step_paths()[0].write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.restore_newest(lambda state, path: None)


def test_an_empty_folder_means_a_fresh_start(tmp_path):
    assert Checkpointer(tmp_path / "none", keep=2, write=False).restore_newest(lambda state, path: None) is None


def test_loading_a_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope.pt")


@pytest.mark.parametrize("name, kind", [("fifo.pt", "a FIFO (named pipe)"), ("/dev/zero", "a device"),
                                        ("/dev/urandom", "a device"), ("link.pt", "a dangling link (to gone.pt)")])
def test_a_fifo_a_device_or_a_dangling_link_is_said_so_and_never_opened(name, kind, tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")  # opening it would wait for a writer forever
    (tmp_path / "link.pt").symlink_to("gone.pt")
    path = tmp_path / name
    with pytest.raises(CheckpointError, match=f"^checkpoint {path} is {re.escape(kind)}, not a regular file; pass a "):
        load(path)


def test_save_atomic_replaces_the_file_whole(tmp_path):
    path = tmp_path / "ckpt" / "x.pt"
    path.parent.mkdir()
    save_atomic({"a": 1}, path)
    save_atomic({"a": 2}, path)
    assert load(path) == {"a": 2} and [p.name for p in path.parent.iterdir()] == ["x.pt"]


def make_bad(kind: str, path):
    """A file where a checkpoint should be that is not one, of each kind a user may meet."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 40)
    elif kind == "directory":
        path.mkdir()
    elif kind == "foreign torch dict":
        torch.save({"weights": torch.ones(3)}, path)
    elif kind == "bare tensor":
        torch.save(torch.ones(3), path)
    return path


BAD_KINDS = ["empty", "text", "random bytes", "directory", "foreign torch dict", "bare tensor"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_bad_file_is_one_checkpoint_error_naming_it(kind, tmp_path):
    bad = make_bad(kind, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as raised:
        load(bad, keys=("model", "config"))
    message = str(raised.value)
    assert str(bad) in message and "\n" not in message and "weights_only" not in message


@pytest.mark.parametrize("tool", ["evaluate", "predict", "train"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_tool_reports_a_bad_checkpoint_in_one_line(tool, kind, data_root, tmp_path, capsys):
    from mnist_add import evaluate, predict, train
    bad = str(make_bad(kind, tmp_path / "bad.pt"))
    argv, entry, code = {
        "evaluate": (["--checkpoint", bad, "--data-root", data_root], evaluate.main, 2),
        "predict": (["--checkpoint", bad, "--index", "0", "3", "--data-root", data_root], predict.main, 2),
        "train": (["--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path / 'run'}",
                   f"trainer.resume={bad}"], train.main, 2),
    }[tool]
    assert entry(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and bad in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_auto_resume_skips_every_bad_file_for_an_older_one(kind, make_cfg, tmp_path, caplog):
    from mnist_add.train import train
    train(make_cfg("trainer.max_steps=8"))
    bad = make_bad(kind, tmp_path / "run/checkpoints/step-00000012.pt")
    summary = train(make_cfg())
    assert summary["resumed_from"].endswith("step-00000008.pt") and summary["status"] == "completed"
    assert "skipping checkpoint: " in caplog.text and str(bad) in caplog.text
