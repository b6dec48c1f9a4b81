"""One training step as one function over static buffers: run eagerly on the CPU, captured once per batch shape as
a CUDA graph and replayed on a GPU (trainer.cuda_graph).

The body gathers its batch from the dataset (indices copied into a buffer of fixed address, the epoch's addends
and warps in tables refilled in place), runs forward, loss and backward, adds the window's and the agreement's
tallies into device tensors, and updates the weights with a fused AdamW that reads its learning rate from a device
tensor. It reads nothing back to the host. On several ranks it is two parts, split around one all-reduce of the
flat gradient buffer (eager, outside any graph), so the CPU with gloo runs the same structure a GPU replays.
Only `CudaGraphs` needs CUDA: capture and replay, a few dozen lines that know nothing of the model or the loss.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Callable

import torch

from mnist_add.agreement import Agreement
from mnist_add.config import ConfigError, Precision, switch
from mnist_add.data import MNISTAdd
from mnist_add.learner import Learner
from mnist_add.precision import resolve

log = logging.getLogger(__name__)

# Where a GPU run has measured the captured step faster than the eager one, by device name: trainer.cuda_graph=auto
# turns it on there. Empty until a GPU run measures it (bench/gpu_check.sh).
MEASURED_FASTER: tuple[str, ...] = ()


def use_cuda_graph(setting: str, device: torch.device, precision: Precision, compiled: bool) -> tuple[bool, str]:
    """Whether to capture the step, and the plan line's words for it. `true` where it cannot be is a ConfigError."""
    wanted = switch(setting)
    if device.type != "cuda":
        if wanted:
            raise ConfigError("trainer.cuda_graph=true needs a CUDA device and this rank runs on the CPU; "
                              "set trainer.cuda_graph=auto or false")
        return False, "eager step"
    if resolve(precision, device) == Precision.fp16:
        if wanted:
            log.warning("trainer.cuda_graph=true with fp16: its GradScaler steps eagerly; bf16 and fp32 capture")
        return False, "eager step (fp16)"
    if compiled:
        if wanted:
            raise ConfigError("trainer.cuda_graph=true and trainer.compile=true do not go together; choose one")
        return False, "eager step (compiled)"
    if wanted is None:
        measured = torch.cuda.get_device_name(device) in MEASURED_FASTER
        return measured, "CUDA graph (auto: measured faster here)" if measured else \
            "eager step (cuda_graph auto: not yet measured faster on a GPU)"
    return wanted, "CUDA graph" if wanted else "eager step"


class TrainStep:
    """The training step: `step(indices, average)` trains this rank's share of one global batch."""

    def __init__(self, learner: Learner, train_set: MNISTAdd, window_sums: torch.Tensor, agreement: Agreement,
                 steps_done: int, capture: bool):
        self.learner, self.train_set, self.window_sums, self.agreement = learner, train_set, window_sums, agreement
        self.step_number = torch.full((), steps_done, dtype=torch.int64, device=window_sums.device)  # the step running
        self.indices: dict[int, torch.Tensor] = {}  # the body's input: a buffer per batch size, at a fixed address
        self.graphs = CudaGraphs(self.static_state) if capture else None

    def __call__(self, indices: torch.Tensor, average: bool) -> None:
        """Train on `indices` ([B] int64, this rank's share, on the data's device); then the schedule's next learning
        rate, and with `average` the weights folded into their running average."""
        self.body(self.input(indices))
        self.learner.advance(average)

    def input(self, indices: torch.Tensor) -> torch.Tensor:
        """`indices` copied into the body's input buffer for their batch size, whose address never changes."""
        buffer = self.indices.get(len(indices))
        if buffer is None:
            buffer = self.indices[len(indices)] = torch.empty_like(indices)
        return buffer.copy_(indices, non_blocking=True)

    def body(self, indices: torch.Tensor) -> None:
        """The step's device work on an input buffer: replayed where captured, else run."""
        parts = (lambda: self.forward_backward(indices), self.learner.update)
        if self.graphs is None:
            run(parts, self.learner.reduce_gradients)
        else:  # a graph per batch size, and per warp on or off: Python's branches are fixed when captured
            self.graphs.run((len(indices), self.train_set.warp), parts, self.learner.reduce_gradients)

    def forward_backward(self, indices: torch.Tensor) -> None:
        """The body's first part: gather, forward, loss, backward, tallies; device work only."""
        self.step_number += 1
        batch = self.train_set.batch(indices)
        stats = self.learner.forward_backward(batch)
        self.window_sums += stats
        self.agreement.add(self.step_number, indices, batch.addends, loss=stats[0])

    def static_state(self) -> list[torch.Tensor]:
        """Every tensor the body writes whose value must outlive a capture's warm-up."""
        learner = self.learner
        optimizer_state = [t for s in learner.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return [*learner.model.parameters(), *learner.model.buffers(), learner.gradients, *optimizer_state,
                self.window_sums, self.agreement.fingerprint_share, self.agreement.first_bad_step, self.step_number]


Part = Callable[[], None]


def run(parts: tuple[Part, Part], between: Part) -> None:
    """The body: its first part, then `between` (the gradients' all-reduce), then its second part."""
    first, second = parts
    first()
    between()
    second()


class CudaGraphs:
    """The body's two parts captured per key (batch size, warp) and replayed; only this needs CUDA.

    The gradients' all-reduce runs eagerly between the two graphs. Before a capture the body runs a few times on a
    side stream (lazy initialisation, cuDNN's choice of kernels, AdamW's state), which trains: what it changed is
    put back afterwards, and AdamW's new state to zero, so that a run with graphs computes what it would without the
    warm-up, and a resume stays exact.
    """

    WARMUP = 3

    def __init__(self, static_state: Callable[[], list[torch.Tensor]]):
        self.static_state = static_state
        self.captured: dict[tuple, tuple[Part, Part]] = {}

    def run(self, key: tuple, parts: tuple[Part, Part], between: Part) -> None:
        if key not in self.captured:
            self.captured[key] = self.capture(parts, between)
        run(self.captured[key], between)

    def capture(self, parts: tuple[Part, Part], between: Part) -> tuple[Part, Part]:
        before = {id(t): t.detach().clone() for t in self.static_state()}
        with self.side_stream():
            for _ in range(self.WARMUP):
                run(parts, between)
        replays = tuple(self.record(part) for part in parts)
        with torch.no_grad():  # parameters among them
            for tensor in self.static_state():
                tensor.copy_(before[id(tensor)]) if id(tensor) in before else tensor.zero_()
        return replays

    @contextmanager
    def side_stream(self):
        """Work inside runs on a stream of its own, which the current stream then waits for."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def record(self, part: Part) -> Part:
        """`part` captured as a graph (its kernels recorded, not run); returns what replays it. One memory pool for
        every graph: their intermediates never live at the same time."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            part()
        return graph.replay

    @functools.cached_property
    def pool(self):
        return torch.cuda.graph_pool_handle()
