import logging
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
        real_save = torch.save
        def dying_save(obj, f):
            real_save(obj, f)
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
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
        assert ckpt.restore_newest(restored.append) == tmp_path / "step-00000001.pt"
    assert restored == [{"step": 1}]
    assert "step-00000002.pt is truncated or corrupt" in caplog.text


def test_a_checkpoint_that_does_not_fit_falls_back_too(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, write=True)
    ckpt.save({"step": 1}, 1)
    ckpt.save({"step": 2}, 2)

    def restore(state):
        if state["step"] == 2:
            raise CheckpointError("does not fit this model")
    assert ckpt.restore_newest(restore).name == "step-00000001.pt"


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3, write=True)
    ckpt.save({"step": 1}, 1)
    ckpt.step_paths()[0].write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.restore_newest(lambda state: None)


def test_an_empty_folder_means_a_fresh_start(tmp_path):
    assert Checkpointer(tmp_path / "none", keep=2, write=False).restore_newest(lambda s: None) is None


def test_loading_a_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope.pt")


def test_save_atomic_replaces_the_file_whole(tmp_path):
    path = tmp_path / "ckpt" / "x.pt"
    path.parent.mkdir()
    save_atomic({"a": 1}, path)
    save_atomic({"a": 2}, path)
    assert load(path) == {"a": 2} and [p.name for p in path.parent.iterdir()] == ["x.pt"]
