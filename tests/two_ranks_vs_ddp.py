"""Two ranks through the step body against the DDP step it replaced (run by tests/test_step.py under torchrun, gloo).

    torchrun --nproc_per_node=2 tests/two_ranks_vs_ddp.py DATA_ROOT

Each step starts the reference, a DDP-wrapped copy stepped as Learner.step did at 997f31a, from the body's
weights; the gradients each rank ends with (after DDP's all-reduce, and after the body's one flat all-reduce) and
each rank's statistics must be bitwise equal, the updated weights within two units in the last place.
"""

import copy
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mnist_add.agreement import Agreement
from mnist_add.config import load_config
from mnist_add.data import GlobalBatchSampler, build_datasets
from mnist_add.distributed import Runtime
from mnist_add.learner import build_learner
from mnist_add.step import TrainStep
from test_step import CROSSING, WEIGHTS, TodaysStep

EPOCHS = 2


def main(data_root: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank = dist.get_rank()
    cfg = load_config(["debug"], [f"data.root={data_root}", "data.download=false", *CROSSING,
                                  f"trainer.epochs={EPOCHS}", "optim.swa_epochs=0", "data.clean_epochs=0"])
    train_set = build_datasets(cfg.data, cfg.trainer.seed, torch.device("cpu")).train
    sampler = GlobalBatchSampler(train_set, cfg.trainer.batch_size, 2, rank, cfg.trainer.seed)
    total = EPOCHS * sampler.steps_per_epoch
    learner = build_learner(cfg, Runtime(rank, rank, 2), total)
    step = TrainStep(learner, train_set, torch.zeros(6, dtype=torch.float64), Agreement(torch.device("cpu")), 0,
                     capture=False)
    reference = TodaysStep(cfg, copy.deepcopy(learner.model), total)
    reference.model = DDP(reference.model)
    steps = 0
    for epoch in range(EPOCHS):
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for indices in sampler:
            reference.model.module.load_state_dict(learner.model.state_dict())
            before = step.window_sums.clone()
            expected = reference.forward_backward(train_set.batch(indices))  # DDP all-reduces in backward
            step.forward_backward(step.input(indices))
            learner.reduce_gradients()
            assert torch.equal(step.window_sums, before + expected), (rank, steps)
            for param, ref in zip(learner.model.parameters(), reference.model.module.parameters()):
                assert torch.equal(param.grad, ref.grad), (rank, steps)
            learner.update()
            learner.advance(average=False)
            reference.update(average=False)
            for param, ref in zip(learner.model.parameters(), reference.model.module.parameters()):
                assert torch.allclose(param, ref, **WEIGHTS), (rank, steps)
            steps += 1
    if rank == 0:
        print(f"2 ranks, {steps} steps (a short one each epoch): gradients bitwise equal to DDP's, weights within "
              f"two units in the last place", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
