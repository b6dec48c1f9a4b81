"""What updates the model: the network, its optimiser and schedule, precision, the gradients and the weight
average; one object to step, checkpoint and restore. mnist_add.step runs its parts as one training step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.optim.swa_utils import SWALR, AveragedModel

from mnist_add import checkpoint
from mnist_add.config import OptimConfig
from mnist_add.data import Batch, MNISTAdd
from mnist_add.distributed import Runtime
from mnist_add.model import Criterion, build_model
from mnist_add.precision import Autocast, build_precision

# What an optimiser's param group says of how this process steps it, not of the run: never taken from a checkpoint
# (a CPU-written one would turn a GPU's captured step uncapturable).
_HOW_TO_STEP = ("lr", "fused", "capturable", "foreach")


@dataclass
class Learner:
    """The model and what updates it: one object to step, checkpoint and restore."""

    model: torch.nn.Module  # unwrapped: what is saved (no `_orig_mod.` of torch.compile in its keys)
    compiled: torch.nn.Module  # what trains and evaluates: the model, compiled with trainer.compile
    optimizer: torch.optim.Optimizer  # fused AdamW, reading its learning rate from `lr`
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Autocast
    criterion: Criterion
    gradients: torch.Tensor  # every parameter's .grad is a view into this one buffer: one all-reduce, fixed addresses
    world_size: int = 1
    average: AveragedModel | None = None  # of the weights after each step since averaging began (optim.swa_epochs)

    @property
    def served(self) -> torch.nn.Module:
        """The network that evaluates and that checkpoints serve: the weight average once it has begun."""
        return self.average.module if self.average is not None else self.compiled

    @property
    def lr(self) -> torch.Tensor:
        """The learning rate: a device tensor that the schedule fills in place, so a captured step reads it."""
        return self.optimizer.param_groups[0]["lr"]

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """The batch's gradients into `gradients`; returns [loss, loss_digit, loss_sum, right digits, right sums, n]
        summed over the batch, on the device."""
        self.gradients.zero_()
        with self.autocast():
            outputs = self.compiled(batch.images, batch.addends)
        loss, loss_digit, loss_sum = self.criterion(outputs, batch.digits, batch.sums)
        self.scaler.scale(loss).backward()
        n = len(batch.digits)
        right = [(o.argmax(1) == y).sum() for o, y in zip(outputs, (batch.digits, batch.sums))]
        count = loss.new_full((), n)  # filled on the device: no copy from the host, no sync
        return torch.stack([loss * n, loss_digit * n, loss_sum * n, *right, count]).detach().double()

    def reduce_gradients(self) -> None:
        """The mean of the ranks' gradients, as DDP makes it: each rank's divided by their number, then summed."""
        if self.world_size > 1:
            self.gradients.div_(self.world_size)
            dist.all_reduce(self.gradients)

    def update(self) -> None:
        """The optimiser's step on the (reduced) gradients; fp16's scaler skips a step whose gradients overflowed."""
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def advance(self, average: bool) -> None:
        """After a step, on the host: the next learning rate; with `average` the new weights folded into their
        running average. Begun as a copy of the model, whose BatchNorm statistics serve until recompute_batchnorm
        measures the average's own. update_parameters reads its count from the device: on a GPU, a sync per
        averaged step (as does SWALR's next learning rate)."""
        self.scheduler.step()
        if average:
            if self.average is None:
                self.average = AveragedModel(self.model)
            self.average.update_parameters(self.model)

    def state_dict(self) -> dict:
        """The learning rate is saved as a number, so that a checkpoint resumes on any device."""
        optimizer = self.optimizer.state_dict()
        optimizer["param_groups"] = [{**group, "lr": float(group["lr"])} for group in optimizer["param_groups"]]
        return {checkpoint.MODEL: self.model.state_dict(), checkpoint.OPTIMIZER: optimizer,
                checkpoint.SCHEDULER: _numbers(self.scheduler.state_dict()),
                checkpoint.SCALER: self.scaler.state_dict(),
                checkpoint.AVERAGE: self.average.state_dict() if self.average is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state[checkpoint.MODEL])
        own = [{key: group[key] for key in _HOW_TO_STEP} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state[checkpoint.OPTIMIZER])
        for group, mine in zip(self.optimizer.param_groups, own):
            mine["lr"].fill_(float(group["lr"]))  # into the tensor a captured step reads
            group.update(mine)
            for param in group["params"]:  # fused keeps its step counters on the device, as floats
                if "step" in self.optimizer.state.get(param, {}):
                    self.optimizer.state[param]["step"] = self.optimizer.state[param]["step"].to(param.device,
                                                                                                  torch.float32)
        self.scheduler.load_state_dict(state[checkpoint.SCHEDULER])
        self.scaler.load_state_dict(state[checkpoint.SCALER])
        if state.get(checkpoint.AVERAGE) is not None:
            self.average = AveragedModel(self.model)
            self.average.load_state_dict(state[checkpoint.AVERAGE])


def _numbers(state):
    """A schedule's state with each one-element tensor (its copies of the learning rate) as a number."""
    if isinstance(state, torch.Tensor) and state.numel() == 1:
        return state.item()
    if isinstance(state, dict):
        return {key: _numbers(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_numbers(value) for value in state]
    return state


def build_learner(cfg: DictConfig, runtime: Runtime, total_steps: int) -> Learner:
    torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
    model = build_model(cfg.model).to(runtime.device)
    if runtime.is_distributed:  # and rank 0's, whatever happened elsewhere
        for tensor in (*model.parameters(), *model.buffers()):
            dist.broadcast(tensor.data, 0)
    compiled = torch.compile(model) if cfg.trainer.compile else model
    one_cycle_steps = total_steps * (cfg.trainer.epochs - cfg.optim.swa_epochs) // cfg.trainer.epochs
    optimizer, scheduler = build_optimizer(model, cfg.optim, one_cycle_steps, runtime.device)
    autocast, scaler = build_precision(cfg.trainer.precision, runtime.device)
    return Learner(model, compiled, optimizer, scheduler, scaler, autocast, Criterion(cfg.loss, cfg.model.sum_head),
                   flat_gradients(model), runtime.world_size)


def flat_gradients(model: torch.nn.Module) -> torch.Tensor:
    """One zeroed buffer whose slices are the parameters' .grad, each laid out as its parameter (channels-last
    convolutions too): backward adds into them in place, and the buffer never moves."""
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    offset = 0
    for param in params:
        param.grad = flat[offset:offset + param.numel()].as_strided(param.shape, param.stride())
        offset += param.numel()
    return flat


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, one_cycle_steps: int, device: torch.device):
    """Fused AdamW (capturable on CUDA) under a one-cycle schedule, then, for the last optim.swa_epochs, the constant
    swa_lr: the schedule is a function of the step, nothing to lose. The learning rate is a tensor on the device,
    which the schedule fills in place."""
    lr = torch.tensor(cfg.lr, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True,
                                  capturable=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=one_cycle_steps,
                                                    pct_start=cfg.warmup_fraction)
    if cfg.swa_epochs:
        constant = SWALR(optimizer, swa_lr=cfg.swa_lr, anneal_epochs=0)  # swa_lr from its first step on
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [scheduler, constant], [one_cycle_steps])
    return optimizer, scheduler


def recompute_batchnorm(model: torch.nn.Module, train_set: MNISTAdd, batch_size: int, device: torch.device,
                        autocast: Autocast) -> None:
    """BatchNorm statistics of averaged weights, measured afresh over the training images of the epoch just
    trained (the running statistics belong to the weights that made them). As torch.optim.swa_utils.update_bn,
    for a network of two inputs; every rank computes the same."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain mean over the batches
    model.train()
    with torch.no_grad(), autocast():
        for start in range(0, len(train_set), batch_size):
            batch = train_set.batch(torch.arange(start, min(start + batch_size, len(train_set)))).to(device)
            model(batch.images, batch.addends)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
