"""The captured step's body, proven on the CPU (issue #33): what it computes is what the eager step of 997f31a
computed; it reads nothing back to the host; every tensor it reads keeps its address; and it is the switch
trainer.cuda_graph says. The capture itself runs on a GPU only (tests/test_cuda.py)."""

import contextlib
import copy
import itertools
import subprocess

import pytest
import torch
from torch.optim.swa_utils import SWALR, AveragedModel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, run_module, subprocess_env, torchrun
from mnist_add.agreement import NEVER, Agreement, fingerprint_share
from mnist_add.config import ConfigError, Precision
from mnist_add.data import GlobalBatchSampler, build_datasets
from mnist_add.distributed import Runtime
from mnist_add.learner import build_learner
from mnist_add.model import Criterion
from mnist_add.step import CudaGraphs, TrainStep, use_cuda_graph

CPU = torch.device("cpu")
# 512 images in batches of 48: ten full steps and a short one of 32 an epoch; one-cycle over four epochs, the fifth
# averaging at a constant rate on unwarped images. 55 steps.
CROSSING = ("data.train_samples=512", "trainer.batch_size=48", "trainer.epochs=5", "optim.swa_epochs=1",
            "data.clean_epochs=1")
# From equal weights and gradients, fused AdamW reading its learning rate from a float32 tensor and the foreach AdamW
# of a Python float update a weight to within one unit in its last place (measured: |difference| <= 2^-23 |w| +
# 1.4e-9, over the 55 steps below), keep the first moment bitwise equal and the second within a relative 4.2e-7.
# Stated with room for another CPU's kernels: two units, and 1e-6.
WEIGHTS, SECOND_MOMENT = {"rtol": 2 ** -22, "atol": 1e-8}, {"rtol": 1e-6, "atol": 0}


class TodaysStep:
    """Learner.step as it was before the captured step (997f31a): eager, AdamW with a Python float learning rate,
    gradients set to None and allocated by backward; the reference the body is proven against."""

    def __init__(self, cfg, model, total_steps):
        self.model, self.criterion, self.average = model, Criterion(cfg.loss, cfg.model.sum_head), None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        one_cycle_steps = total_steps * (cfg.trainer.epochs - cfg.optim.swa_epochs) // cfg.trainer.epochs
        one_cycle = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=cfg.optim.lr,
                                                        total_steps=one_cycle_steps, pct_start=cfg.optim.warmup_fraction)
        self.scheduler = torch.optim.lr_scheduler.SequentialLR(
            self.optimizer, [one_cycle, SWALR(self.optimizer, swa_lr=cfg.optim.swa_lr, anneal_epochs=0)],
            [one_cycle_steps])

    def forward_backward(self, batch):
        outputs = self.model(batch.images, batch.addends)
        loss, loss_digit, loss_sum = self.criterion(outputs, batch.digits, batch.sums)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        n = len(batch.digits)
        right = [(o.argmax(1) == y).sum() for o, y in zip(outputs, (batch.digits, batch.sums))]
        return torch.stack([loss * n, loss_digit * n, loss_sum * n, *right, loss.new_full((), n)]).detach().double()

    def update(self, average):
        self.optimizer.step()
        self.scheduler.step()
        if average:
            self.average = self.average or AveragedModel(self.model)
            self.average.update_parameters(self.model)


def training_run(make_cfg, *overrides):
    """The pieces train() steps with, on the CPU, and the epochs' batches as its loop draws them:
    (learner, step, window sums, agreement, [(indices, average)])."""
    cfg = make_cfg(*CROSSING, *overrides)
    train_set = build_datasets(cfg.data, cfg.trainer.seed, CPU).train
    sampler = GlobalBatchSampler(train_set, cfg.trainer.batch_size, 1, 0, cfg.trainer.seed)
    learner = build_learner(cfg, Runtime(), cfg.trainer.epochs * sampler.steps_per_epoch)
    window, agreement = torch.zeros(6, dtype=torch.float64), Agreement(CPU)

    def batches():
        for epoch in range(cfg.trainer.epochs):
            train_set.set_epoch(epoch, warp=epoch < cfg.trainer.epochs - cfg.data.clean_epochs)
            sampler.set_epoch(epoch)
            for indices in sampler:
                yield indices, epoch >= cfg.trainer.epochs - cfg.optim.swa_epochs
    step = TrainStep(learner, train_set, window, agreement, steps_done=0, capture=False)
    return cfg, learner, step, window, agreement, batches()


def test_the_body_computes_what_the_eager_step_computed_across_epochs_a_short_batch_and_averaging(make_cfg):
    cfg, learner, step, window, agreement, batches = training_run(make_cfg)
    reference = TodaysStep(cfg, copy.deepcopy(learner.model), total_steps=55)
    outputs = {"body": [], "reference": []}
    learner.model.register_forward_hook(lambda module, args, out: outputs["body"].append(out))
    reference.model.register_forward_hook(lambda module, args, out: outputs["reference"].append(out))
    fingerprint, sizes, lrs = torch.zeros((), dtype=torch.int64), [], []
    for number, (indices, average) in enumerate(batches, start=1):
        # From the same weights, the same batch: forward, loss, gradients and tallies are bitwise today's.
        reference.model.load_state_dict(learner.model.state_dict())
        batch = step.train_set.batch(indices)
        expected = window + reference.forward_backward(batch)
        fingerprint += fingerprint_share(number, indices, batch.addends)
        step.forward_backward(step.input(indices))
        assert all(torch.equal(a, b) for a, b in zip(outputs["body"][-1], outputs["reference"][-1])), number
        assert torch.equal(window, expected), number
        for (name, param), ref in zip(learner.model.named_parameters(), reference.model.parameters()):
            assert torch.equal(param.grad, ref.grad), (number, name)
        assert int(agreement.fingerprint_share) == int(fingerprint) and int(agreement.first_bad_step) == NEVER
        assert int(step.step_number) == number
        # The update: equal up to the last bits of a learning rate held in a tensor.
        learner.reduce_gradients()
        learner.update()
        learner.advance(average)
        reference.update(average)
        for param, ref in zip(learner.model.parameters(), reference.model.parameters()):
            assert torch.allclose(param, ref, **WEIGHTS), number
            ours, theirs = learner.optimizer.state[param], reference.optimizer.state[ref]
            assert torch.equal(ours["exp_avg"], theirs["exp_avg"]), number
            assert torch.allclose(ours["exp_avg_sq"], theirs["exp_avg_sq"], **SECOND_MOMENT), number
        assert float(learner.lr) == pytest.approx(reference.optimizer.param_groups[0]["lr"], rel=1e-6)
        sizes.append(len(indices)), lrs.append(float(learner.lr))
    assert len(sizes) == 55 and sizes[10::11] == [32] * 5 and set(sizes) == {48, 32}  # the short batches, trained
    assert learner.average.n_averaged == 11 and lrs[-11:] == [pytest.approx(cfg.optim.swa_lr)] * 11
    for param, ref in zip(learner.average.parameters(), reference.average.parameters()):
        assert torch.allclose(param, ref, **WEIGHTS)


# Every way a value crosses from the device to the host: on a GPU each one waits for the queued work.
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
DATA_DEPENDENT = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave")


class NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or (func is torch.Tensor.to and "cpu" in map(str, [*args[1:], *(kwargs or {}).values()])):
            raise AssertionError(f"the body read a value back to the host: {func.__name__}")
        return func(*args, **(kwargs or {}))


class NoDataDependentOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(DATA_DEPENDENT):
            raise AssertionError(f"the body read a value back to the host: {func}")
        return func(*args, **(kwargs or {}))


def test_the_body_reads_nothing_back_to_the_host(make_cfg):
    _, learner, step, _, _, batches = training_run(make_cfg)
    for indices, average in batches:  # every kind of step: warped and not, full and short, averaging
        buffer = step.input(indices)
        with NoHostReads(), NoDataDependentOps():
            step.body(buffer)
        learner.advance(average)


class ExternalReads(TorchDispatchMode):
    """The storages of the tensors an op reads that no op of this pass made: the body's inputs."""

    def __init__(self):
        super().__init__()
        self.made, self.read = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.made:
                self.read.add(tensor.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.made.add(tensor.untyped_storage().data_ptr())
        return out


def test_every_tensor_the_body_reads_keeps_its_address(make_cfg):
    _, learner, step, _, _, batches = training_run(make_cfg)
    read, kept = {}, []  # per kind of step, its inputs' addresses; every batch of indices stays alive
    for number, (indices, average) in enumerate(itertools.islice(batches, 24)):  # two of each kind of step
        kept.append(indices)
        buffer = step.input(indices)
        with ExternalReads() as reads:
            step.body(buffer)
        learner.advance(average)
        if number:  # the first step makes AdamW's state (on a GPU, the capture's warm-up does)
            key = (len(indices), step.train_set.warp)
            assert read.setdefault(key, reads.read) == reads.read, key
    assert len(read) == 2 and all(len(addresses) > 50 for addresses in read.values())


def test_true_on_a_cpu_is_one_line_and_auto_is_off_until_a_gpu_measured_it():
    with pytest.raises(ConfigError, match="^trainer.cuda_graph=true needs a CUDA device"):
        use_cuda_graph("True", CPU, Precision.fp32, compiled=False)
    assert use_cuda_graph("auto", CPU, Precision.fp32, compiled=False) == (False, "eager step")
    assert use_cuda_graph("False", CPU, Precision.fp32, compiled=False) == (False, "eager step")


def test_cuda_graph_true_on_the_cpu_exits_2_in_one_line(data_root, tmp_path):
    result = run_module("mnist_add.train", "--config", "debug", f"data.root={data_root}", f"run.dir={tmp_path}",
                        "trainer.cuda_graph=true")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("trainer.cuda_graph=true needs a CUDA device and this rank runs on the CPU; "
                                          "set trainer.cuda_graph=auto or false")
    assert not tmp_path.joinpath("checkpoints").exists()


def test_two_gloo_ranks_through_the_body_agree_with_the_ddp_step_it_replaced(data_root):
    result = subprocess.run([*torchrun(2), str(REPO / "tests/two_ranks_vs_ddp.py"), data_root], capture_output=True,
                            text=True, cwd=REPO, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks, 22 steps (a short one each epoch): gradients bitwise equal to DDP's" in result.stdout


class GraphsOnTheCpu(CudaGraphs):
    """CudaGraphs with the CUDA calls taken out: no side stream, and a part 'recorded' is the part itself. What is
    left is theirs: the warm-up, undoing it, the keys, and the all-reduce between the parts."""

    side_stream = staticmethod(contextlib.nullcontext)

    def record(self, part):
        return part


def test_a_run_through_captured_graphs_computes_what_the_eager_one_does(make_cfg):
    weights = []
    for capture in (False, True):
        _, learner, step, window, agreement, batches = training_run(make_cfg)
        if capture:
            step.graphs = GraphsOnTheCpu(step.static_state)
        for indices, average in batches:
            step(indices, average)
        weights.append([*learner.model.state_dict().values(), *learner.average.state_dict().values(), window,
                        agreement.fingerprint_share, *(t for s in learner.optimizer.state.values() for t in s.values())])
    assert set(step.graphs.captured) == {(48, True), (32, True), (48, False), (32, False)}
    assert all(torch.equal(a, b) for a, b in zip(*weights))
