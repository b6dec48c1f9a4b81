"""The CUDA path: run by `bash bench/gpu_check.sh` on a machine with a GPU (`pytest -m cuda`); CI, which has
none, deselects them (`-m "not cuda"`)."""

import json
import signal

import pytest
import torch

from conftest import run_module, start_and_wait_for_checkpoint, torchrun
from mnist_add import checkpoint
from mnist_add.scoring import evaluate, load_model
from mnist_add.data import MNISTAdd
from mnist_add.distributed import Runtime
from mnist_add.learner import Learner
from mnist_add.train import build_datasets, train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")]

CUDA = torch.device("cuda", 0)


def weights(run_dir, step):
    return checkpoint.load(f"{run_dir}/checkpoints/step-{step:08d}.pt")


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_trains_in_its_dtype_and_resumes_exactly(make_cfg, tmp_path, monkeypatch, precision, dtype):
    seen = []
    real_forward_backward = Learner.forward_backward

    def forward_backward(self, batch):
        with self.autocast():
            seen.append(self.compiled(batch.images, batch.addends)[0].dtype)
        return real_forward_backward(self, batch)

    monkeypatch.setattr(Learner, "forward_backward", forward_backward)
    common = (f"trainer.precision={precision}", "trainer.max_steps=12")
    whole = train(make_cfg(*common, run_dir=tmp_path / "whole"))
    train(make_cfg(f"trainer.precision={precision}", "trainer.max_steps=6", run_dir=tmp_path / "cut"))
    resumed = train(make_cfg(*common, run_dir=tmp_path / "cut"))
    assert set(seen) == {dtype} and resumed["test"] == whole["test"]
    cut, uncut = weights(tmp_path / "cut", 12), weights(tmp_path / "whole", 12)
    assert cut[checkpoint.SCALER] == uncut[checkpoint.SCALER]
    if precision == "fp16":
        assert cut[checkpoint.SCALER]["scale"] > 0  # an active scaler, its state carried over the resume
    assert "cuda" in cut[checkpoint.RNG]  # the CUDA generator is saved, and restored on resume
    assert all(torch.equal(cut[checkpoint.MODEL][k], uncut[checkpoint.MODEL][k]) for k in cut[checkpoint.MODEL])


def test_the_dataset_stays_on_the_gpu(make_cfg):
    train_set, test_set = build_datasets(make_cfg().data, seed=0, device=CUDA)
    assert train_set.data.device == test_set.data.device == CUDA
    assert train_set.batch(torch.arange(8, device=CUDA)).images.device == CUDA


def test_a_cpu_dataset_feeds_the_gpu_too(make_cfg, tmp_path):
    summary = train(make_cfg("data.on_device=false", "trainer.max_steps=8"))
    assert summary["status"] == "completed"


@pytest.mark.parametrize("graph", ["false", "true"])
def test_no_step_between_agreements_waits_for_the_gpu(make_cfg, monkeypatch, graph):
    from mnist_add import train as train_module
    real_should_agree = train_module.should_agree

    def should_agree(*args):  # syncs are an error from the end of a non-agreeing step to the next step's end
        agree = real_should_agree(*args)
        torch.cuda.set_sync_debug_mode("default" if agree else "error")
        return agree

    monkeypatch.setattr(train_module, "should_agree", should_agree)
    try:
        train(make_cfg("trainer.epochs=2", "trainer.log_every_steps=10", "trainer.agree_every_steps=6",
                       f"trainer.cuda_graph={graph}"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_evaluation_on_the_gpu_counts_as_on_the_cpu(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=8"))
    model, cfg = load_model(tmp_path / "run/checkpoints/best.pt")
    test_set = MNISTAdd(cfg.data.root, train=False)
    on_cpu = evaluate(model, test_set, Runtime(), 1000, cfg.loss.sum)
    on_gpu = evaluate(model.to(CUDA), test_set.to(CUDA), Runtime(device=CUDA), 1000, cfg.loss.sum)
    assert torch.equal(on_cpu.digit_confusion, on_gpu.digit_confusion)
    assert torch.equal(on_cpu.sum_confusion, on_gpu.sum_confusion)


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_ddp_on_the_gpus(data_root, tmp_path, backend):
    nproc = 2 if backend == "gloo" or torch.cuda.device_count() >= 2 else 1  # gloo: 2 ranks may share a GPU
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path}",
                        f"dist.backend={backend}", "trainer.deterministic=true", launcher=torchrun(nproc),
                        env={"CUDA_VISIBLE_DEVICES": "0"} if backend == "gloo" else None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == nproc


def test_nccl_with_two_ranks_on_one_gpu_is_refused_in_one_line(data_root, tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path}",
                        "dist.backend=nccl", launcher=torchrun(2), env={"CUDA_VISIBLE_DEVICES": "0"})
    assert result.returncode != 0  # torchrun's own, for workers that exit 2
    assert "ERROR 2 ranks on this node but 1 GPU(s), and NCCL runs one rank per GPU" in result.stderr


def test_sigterm_stops_and_the_relaunch_ends_bitwise_equal(data_root, tmp_path):
    args = ["--config", "debug", f"data.root={data_root}", "trainer.deterministic=true", "trainer.epochs=2"]
    job = start_and_wait_for_checkpoint([*args, f"run.dir={tmp_path / 'cut'}"], tmp_path / "cut", step=8)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0 and "stopping on SIGTERM" in output, output[-3000:]
    for run in ("cut", "whole"):
        assert run_module("mnist_add.train", *args, f"run.dir={tmp_path / run}").returncode == 0
    cut, whole = weights(tmp_path / "cut", 32), weights(tmp_path / "whole", 32)
    assert all(torch.equal(cut[checkpoint.MODEL][k], whole[checkpoint.MODEL][k]) for k in cut[checkpoint.MODEL])


# The captured step (mnist_add/step.py). 512 images in batches of 48: a short batch of 32 ends each epoch, so two
# graphs per warp; the last epoch averages (SWA) and trains on unwarped images.
GRAPHED = ("data.train_samples=512", "trainer.batch_size=48", "trainer.epochs=5", "optim.swa_epochs=1",
           "data.clean_epochs=1", "trainer.save_every_steps=11", "trainer.keep_checkpoints=100")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_and_eager_steps_train_the_same_weights(make_cfg, tmp_path, precision):
    runs = {graph: train(make_cfg(*GRAPHED, f"trainer.precision={precision}", f"trainer.cuda_graph={graph}",
                                  run_dir=tmp_path / graph)) for graph in ("false", "true")}
    assert runs["true"]["fingerprint"] == runs["false"]["fingerprint"]
    eager, graphed = weights(tmp_path / "false", 55), weights(tmp_path / "true", 55)
    for key in (checkpoint.MODEL, checkpoint.AVERAGE):  # deterministic kernels: the same arithmetic, replayed
        for name, tensor in eager[key].items():
            assert torch.equal(tensor, graphed[key][name]), (key, name)
    assert runs["true"]["test"] == runs["false"]["test"]


def test_a_mid_epoch_resume_with_graphs_is_bitwise(make_cfg, tmp_path):
    whole = train(make_cfg(*GRAPHED, "trainer.cuda_graph=true", run_dir=tmp_path / "whole"))
    train(make_cfg(*GRAPHED, "trainer.cuda_graph=true", "trainer.max_steps=27", run_dir=tmp_path / "cut"))
    resumed = train(make_cfg(*GRAPHED, "trainer.cuda_graph=true", run_dir=tmp_path / "cut"))  # captures again
    assert resumed["resumed_from"].endswith("step-00000027.pt") and resumed["test"] == whole["test"]
    cut, uncut = weights(tmp_path / "cut", 55), weights(tmp_path / "whole", 55)
    assert all(torch.equal(cut[checkpoint.MODEL][k], uncut[checkpoint.MODEL][k]) for k in cut[checkpoint.MODEL])


def test_sigterm_with_graphs_saves_and_the_relaunch_ends_bitwise_equal(data_root, tmp_path):
    args = ["--config", "debug", f"data.root={data_root}", "trainer.deterministic=true", "trainer.epochs=2",
            "trainer.cuda_graph=true"]
    job = start_and_wait_for_checkpoint([*args, f"run.dir={tmp_path / 'cut'}"], tmp_path / "cut", step=8)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0 and "stopping on SIGTERM" in output and "CUDA graph" in output, output[-3000:]
    for run in ("cut", "whole"):
        assert run_module("mnist_add.train", *args, f"run.dir={tmp_path / run}").returncode == 0
    cut, whole = weights(tmp_path / "cut", 32), weights(tmp_path / "whole", 32)
    assert all(torch.equal(cut[checkpoint.MODEL][k], whole[checkpoint.MODEL][k]) for k in cut[checkpoint.MODEL])


def test_fp16_steps_eagerly_and_says_so(make_cfg, caplog):
    train(make_cfg("trainer.precision=fp16", "trainer.cuda_graph=true", "trainer.max_steps=4"))
    assert "trainer.cuda_graph=true with fp16: its GradScaler steps eagerly" in caplog.text
