"""What updates the model: the network, its optimiser and schedule, precision, the step, and the weight
average; one object to step, checkpoint and restore."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import SWALR, AveragedModel

from mnist_add import checkpoint
from mnist_add.config import OptimConfig
from mnist_add.data import Batch, MNISTAdd
from mnist_add.distributed import Runtime
from mnist_add.model import Criterion, build_model
from mnist_add.precision import Autocast, build_precision


@dataclass
class Learner:
    """The model and what updates it: one object to step, checkpoint and restore."""

    model: torch.nn.Module  # unwrapped: what is saved (no `_orig_mod.` of torch.compile in its keys)
    ddp_model: torch.nn.Module  # what is trained: DDP-wrapped when distributed, compiled with trainer.compile
    eval_model: torch.nn.Module  # what evaluates: the model, compiled with trainer.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Autocast
    criterion: Criterion
    average: AveragedModel | None = None  # of the weights after each step since averaging began (optim.swa_epochs)

    @property
    def served(self) -> torch.nn.Module:
        """The network that evaluates and that checkpoints serve: the weight average once it has begun."""
        return self.average.module if self.average is not None else self.eval_model

    def step(self, batch: Batch, average: bool = False) -> torch.Tensor:
        """One optimiser step, then with `average` the new weights folded into their running average; returns
        [loss, loss_digit, loss_sum, right digits, right sums, n] summed."""
        with self.autocast():
            outputs = self.ddp_model(batch.images, batch.addends)
        loss, loss_digit, loss_sum = self.criterion(outputs, batch.digits, batch.sums)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if average:
            # Begun as a copy of the model, whose BatchNorm statistics serve until recompute_batchnorm measures the
            # average's own. update_parameters reads its count from the device: on a GPU, a sync per averaged step.
            if self.average is None:
                self.average = AveragedModel(self.model)
            self.average.update_parameters(self.model)
        n = len(batch.digits)
        right = [(o.argmax(1) == y).sum() for o, y in zip(outputs, (batch.digits, batch.sums))]
        count = loss.new_full((), n)  # filled on the device: no copy from the host, no sync
        return torch.stack([loss * n, loss_digit * n, loss_sum * n, *right, count]).detach().double()

    def state_dict(self) -> dict:
        return {checkpoint.MODEL: self.model.state_dict(), checkpoint.OPTIMIZER: self.optimizer.state_dict(),
                checkpoint.SCHEDULER: self.scheduler.state_dict(), checkpoint.SCALER: self.scaler.state_dict(),
                checkpoint.AVERAGE: self.average.state_dict() if self.average is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state[checkpoint.MODEL])
        self.optimizer.load_state_dict(state[checkpoint.OPTIMIZER])
        self.scheduler.load_state_dict(state[checkpoint.SCHEDULER])
        self.scaler.load_state_dict(state[checkpoint.SCALER])
        if state.get(checkpoint.AVERAGE) is not None:
            self.average = AveragedModel(self.model)
            self.average.load_state_dict(state[checkpoint.AVERAGE])


def build_learner(cfg: DictConfig, runtime: Runtime, total_steps: int) -> Learner:
    torch.manual_seed(cfg.trainer.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = build_model(cfg.model).to(runtime.device)
    ddp_model = DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None) \
        if runtime.is_distributed else model
    # torch.compile after the DDP wrap, as torch's DDP notes advise: DDP then splits the graph at its buckets.
    ddp_model, eval_model = (torch.compile(ddp_model), torch.compile(model)) if cfg.trainer.compile else (ddp_model, model)
    one_cycle_steps = total_steps * (cfg.trainer.epochs - cfg.optim.swa_epochs) // cfg.trainer.epochs
    optimizer, scheduler = build_optimizer(model, cfg.optim, one_cycle_steps)
    autocast, scaler = build_precision(cfg.trainer.precision, runtime.device)
    return Learner(model, ddp_model, eval_model, optimizer, scheduler, scaler, autocast,
                   Criterion(cfg.loss, cfg.model.sum_head))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, one_cycle_steps: int):
    """AdamW under a one-cycle schedule, then, for the last optim.swa_epochs, the constant swa_lr: the schedule is
    a function of the step, nothing to lose."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
