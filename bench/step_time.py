"""The training step's time: eager and captured (trainer.cuda_graph), at several batch sizes and precisions, beside
a bare captured step of the same network (the floor: forward, loss, backward and fused AdamW on one batch already
on the device, nothing gathered, nothing tallied), and the start-up costs apart. CUDA events time the GPU; on a CPU
only the eager rows run, timed by the clock.

    python bench/step_time.py [--data-root DIR] [--steps 200] [--batches 64,256,1024] [--precisions fp32,bf16]
"""

import argparse
import itertools
import os
import subprocess
import sys
import time

import torch

from mnist_add.agreement import Agreement
from mnist_add.config import load_config
from mnist_add.data import Batch, GlobalBatchSampler, build_datasets
from mnist_add.distributed import Runtime
from mnist_add.learner import build_learner
from mnist_add.precision import configure_kernels
from mnist_add.step import TrainStep

WARMUP = 20


class Timer:
    """Milliseconds of the work queued between start and stop: CUDA events on a GPU, the clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.events[0].record()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.events[1].record()
            self.events[1].synchronize()
            self.ms = self.events[0].elapsed_time(self.events[1])
        else:
            self.ms = (time.perf_counter() - self.started) * 1000


def the_step(data_root: str, batch: int, precision: str, graph: bool, device: torch.device,
             steps: int) -> tuple[float, float]:
    """(seconds of the first step, which captures; ms per step after warm-up) of the job's own step: gather,
    augmentation, forward, backward, AdamW, tallies."""
    cfg = load_config([], [f"data.root={data_root}", "data.download=false", f"trainer.batch_size={batch}",
                           f"trainer.precision={precision}", f"trainer.cuda_graph={str(graph).lower()}"])
    train_set = build_datasets(cfg.data, cfg.trainer.seed, device).train
    sampler = GlobalBatchSampler(train_set, batch, 1, 0, cfg.trainer.seed, drop_last=True)  # one shape
    learner = build_learner(cfg, Runtime(device=device), total_steps=10 * sampler.steps_per_epoch)
    step = TrainStep(learner, train_set, torch.zeros(6, dtype=torch.float64, device=device), Agreement(device), 0,
                     capture=graph)
    def epochs():
        for epoch in itertools.count():
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch)
            yield from sampler
    batches = epochs()
    with Timer(device) as first:
        step(next(batches), average=False)
    for _ in range(WARMUP):
        step(next(batches), average=False)
    with Timer(device) as timer:
        for _ in range(steps):
            step(next(batches), average=False)
    return first.ms / 1000, timer.ms / steps


def bare_step(batch: int, precision: str, device: torch.device, steps: int) -> float:
    """ms per replay of forward, loss, backward (with the step's statistics) and fused AdamW, captured in one graph,
    on a fixed random batch."""
    cfg = load_config([], [f"trainer.batch_size={batch}", f"trainer.precision={precision}"])
    learner = build_learner(cfg, Runtime(device=device), total_steps=1000)
    digits, addends = torch.randint(0, 10, (batch,), device=device), torch.randint(0, 10, (batch,), device=device)
    fixed = Batch(torch.randn(batch, 1, 28, 28, device=device), digits, addends, digits + addends)

    def body():
        learner.forward_backward(fixed)
        learner.optimizer.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(WARMUP):
        graph.replay()
    with Timer(device) as timer:
        for _ in range(steps):
            graph.replay()
    return timer.ms / steps


def start_up(data_root: str, device: torch.device) -> None:
    """Seconds of the process start (the imports train needs), the data's copy to the device, and the first
    captured step (warm-up and capture) beyond an eager one."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mnist_add.train"], check=True)
    imports = time.perf_counter() - started
    cfg = load_config([], [f"data.root={data_root}", "data.download=false"])
    started = time.perf_counter()
    build_datasets(cfg.data, cfg.trainer.seed, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    data = time.perf_counter() - started
    line = f"start-up: process and imports {imports:.2f} s, data to {device.type} {data:.2f} s"
    if device.type == "cuda":
        first = {graph: the_step(data_root, 64, "fp32", graph, device, steps=1)[0] for graph in (False, True)}
        line += f", the first step: {first[False]:.2f} s eager, {first[True]:.2f} s captured (warm-up and capture)"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_ADD_DATA_ROOT", "data"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_kernels(deterministic=False)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    start_up(args.data_root, device)
    print("batch precision    eager ms  captured ms  bare graph ms  captured/bare  eager/captured")
    for batch in map(int, args.batches.split(",")):
        for precision in args.precisions.split(","):
            eager = the_step(args.data_root, batch, precision, False, device, args.steps)[1]
            if device.type != "cuda":
                print(f"{batch:5d} {precision:9s} {eager:9.2f}  (captured and bare: CUDA only)", flush=True)
                continue
            captured = the_step(args.data_root, batch, precision, True, device, args.steps)[1]
            bare = bare_step(batch, precision, device, args.steps)
            print(f"{batch:5d} {precision:9s} {eager:9.3f} {captured:12.3f} {bare:14.3f} {captured / bare:14.2f} "
                  f"{eager / captured:15.2f}", flush=True)


if __name__ == "__main__":
    main()
