"""Where this process sits in the job: launcher environment, process group, stop signals, collectives,
and what a failed collective means.

The only module that reads launcher variables (torchrun's, SLURM's); the rest of the code sees a
frozen `Runtime`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mnist_add.config import ConfigError, DistConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launcher_ranks(env=os.environ) -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun/submitit (RANK, ...) or a bare `srun` step.

    An environment no launcher makes (a malformed number, RANK past WORLD_SIZE, WORLD_SIZE without RANK) raises
    ConfigError naming the variable: it would otherwise fail in the rendezvous, or quietly train as one process.
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        if "RANK" not in env or "WORLD_SIZE" not in env:
            given, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
            raise ConfigError(f"{given}={_quoted(env[given])} is set but {missing} is not; {_LAUNCHERS}")
        return _ranks(env, "RANK", "LOCAL_RANK", "WORLD_SIZE", local_default=0)
    # Inside an srun step (not the batch shell, which also has SLURM_PROCID=0): one task is one rank.
    if "SLURM_STEP_ID" in env and _whole_number(env, "SLURM_STEP_NUM_TASKS", default=1, least=1) > 1:
        return _ranks(env, "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS")
    return 0, 0, 1


_LAUNCHERS = ("launchers (torchrun, srun, submitit) set these variables together and consistently: launch through "
              "one, or unset them to train as one process")
_MOST_RANKS = 2**31 - 1  # torch.distributed numbers ranks with 32-bit integers


def _ranks(env, rank_name: str, local_name: str, world_name: str, local_default: int | None = None):
    world_size = _whole_number(env, world_name, least=1)
    rank = _whole_number(env, rank_name)
    if rank >= world_size:
        raise ConfigError(f"{rank_name}={rank} must be below {world_name}={world_size} (ranks count from 0); "
                          f"{_LAUNCHERS}")
    local_rank = _whole_number(env, local_name, default=local_default)
    if local_rank > rank:
        raise ConfigError(f"{local_name}={local_rank} cannot exceed {rank_name}={rank} (a node's ranks follow those of "
                          f"the nodes before it); {_LAUNCHERS}")
    return rank, local_rank, world_size


def _whole_number(env, name: str, default: int | None = None, least: int = 0, most: int = _MOST_RANKS) -> int:
    """The variable `name` as a whole number from `least` to `most`; ConfigError naming it when it is unset (without
    a default), malformed or out of that range."""
    text = env.get(name)
    if text is None:
        if default is None:
            raise ConfigError(f"{name} is not set; {_LAUNCHERS}")
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(most)) and least <= int(text) <= most):
        raise ConfigError(f"{name}={_quoted(text)} is not a whole number from {least} to {most}; {_LAUNCHERS}")
    return int(text)


def _quoted(text: str) -> str:
    """A variable's value as a one-line message shows it: quoted where it holds a space or an unprintable character
    (a newline stays visible) or nothing, a long one cut."""
    shown = text if text.isprintable() and text and " " not in text else repr(text)
    return shown if len(text) <= 20 else f"{shown[:20]}... ({len(text)} characters)"


def local_world_size(env=os.environ) -> int:
    """How many ranks share this node: torchrun's and submitit's LOCAL_WORLD_SIZE; elsewhere (srun) at least the
    ranks below this one."""
    _, local_rank, world_size = launcher_ranks(env)
    if "LOCAL_WORLD_SIZE" not in env:
        return local_rank + 1
    ranks_here = _whole_number(env, "LOCAL_WORLD_SIZE", least=1)
    if not local_rank < ranks_here <= world_size:
        raise ConfigError(f"LOCAL_WORLD_SIZE={ranks_here} must exceed the local rank ({local_rank}) and be at most the "
                          f"world size ({world_size}); {_LAUNCHERS}")
    return ranks_here


def rendezvous_env(env=os.environ) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT, where the ranks of a job of several meet: torchrun's, or for an srun step that
    did not set them, the first node and a port from the job id. ConfigError names one missing or malformed."""
    slurm_step = "RANK" not in env  # launcher_ranks read SLURM's variables
    found = {name: env[name] for name in ("MASTER_ADDR", "MASTER_PORT") if name in env}
    if not slurm_step and len(found) < 2:
        raise ConfigError(f"{' and '.join(n for n in ('MASTER_ADDR', 'MASTER_PORT') if n not in found)} not set, "
                          f"though WORLD_SIZE={env['WORLD_SIZE']} asks for several processes; torchrun sets them: "
                          f"launch through it, or set MASTER_ADDR and MASTER_PORT to where rank 0 listens")
    if "MASTER_ADDR" not in found:
        found["MASTER_ADDR"] = _first_node(env)
    if "MASTER_PORT" not in found:
        found["MASTER_PORT"] = str(20_000 + _whole_number(env, "SLURM_JOB_ID", most=2**32 - 1) % 20_000)
    if not re.fullmatch(r"[^\s\x00-\x1f]+", found["MASTER_ADDR"]):
        raise ConfigError(f"MASTER_ADDR={_quoted(found['MASTER_ADDR'])} is not a host name or address; set it to "
                          f"rank 0's host")
    _whole_number(found, "MASTER_PORT", least=1, most=65_535)
    return found


def _first_node(env) -> str:
    """The first host of an srun step's SLURM_STEP_NODELIST (`node[1-4]` -> node1), which scontrol expands."""
    nodes, hosts, why = env.get("SLURM_STEP_NODELIST", ""), [], "it is unset"
    try:
        if nodes:
            why = "it names no host"
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True, capture_output=True,
                                   text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        why = getattr(err, "strerror", None) or type(err).__name__
    if not hosts:
        raise ConfigError(f"MASTER_ADDR is not set, and scontrol finds no first node in SLURM_STEP_NODELIST="
                          f"{_quoted(nodes)} ({why}); set MASTER_ADDR to rank 0's host")
    return hosts[0]


def choose_device(local_rank: int, ranks_here: int, num_gpus: int, backend: str) -> torch.device:
    """This rank's device: its own GPU; GPUs shared round-robin when the node has more ranks than GPUs, which gloo
    allows and NCCL refuses; the CPU when no GPU is visible."""
    if num_gpus == 0:
        return torch.device("cpu")
    if ranks_here > num_gpus and backend == "nccl":
        raise ConfigError(f"{ranks_here} ranks on this node but {num_gpus} GPU(s), and NCCL runs one rank per GPU: "
                          f"launch --nproc_per_node={num_gpus}, set dist.backend=gloo to share the GPUs, or choose "
                          f"the GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank % num_gpus)


def setup(cfg: DistConfig) -> Runtime:
    """Join the process group when launched as several ranks; pick this rank's device."""
    rank, local_rank, world_size = launcher_ranks()
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if num_gpus else "gloo")
    device = choose_device(local_rank, local_world_size(), num_gpus, backend)
    if num_gpus:
        torch.cuda.set_device(device)
    elif os.environ.get("CUDA_VISIBLE_DEVICES") == "" and rank == 0:
        log.info("CUDA_VISIBLE_DEVICES is empty: running on the CPU")
    if world_size > 1 and not dist.is_initialized():
        warn_about_shared_torchrun_store()
        os.environ.update(rendezvous_env())
        if rank != 0:
            wait_for_rank_zero(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), cfg.timeout_s,
                               f"rank {rank} of {world_size}")
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=cfg.timeout_s))
    return Runtime(rank, local_rank, world_size, device)


class RankZeroNeverCame(RuntimeError):
    """Rank 0's rendezvous did not answer within dist.timeout_s; the message says so in one line."""


def wait_for_rank_zero(address: str, port: int, timeout_s: float, me: str) -> None:
    """Wait, at most timeout_s, until rank 0 listens at MASTER_ADDR:MASTER_PORT. torch's own client waits as long,
    but logs every failed try with a C++ stack trace; a bare connection, closed at once, is not counted as a rank."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((address, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise RankZeroNeverCame(
                    f"{me} could not reach rank 0 at {address}:{port} within {timeout_s:g} s (dist.timeout_s): rank 0 "
                    f"never came (not started, listening elsewhere, or behind a firewall); start it, or fix "
                    f"MASTER_ADDR/MASTER_PORT, then relaunch") from None
            time.sleep(0.1)


def warn_about_shared_torchrun_store(env=os.environ) -> None:
    """torchrun shares its TCPStore with the ranks and keeps it across restarts, so restarted ranks can
    read the previous attempt's addresses and fail to connect (pytorch/pytorch#135712)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        log.warning("torchrun --max-restarts with a shared store: restarts can fail to connect; "
                    "launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity on one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks, in place; the identity on one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any."""
    return bool(all_reduce_sum(torch.tensor([int(flag)], device=device)).item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# What gloo and NCCL (torch 2.14) say when a peer rank hangs or dies in the middle of a collective. gloo raises a
# plain RuntimeError in the waiting rank; NCCL a DistBackendError, or (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) its
# watchdog logs the timeout and ends the process itself.
_HUNG = (re.compile(r"Timed out waiting (?P<ms>\d+)ms for (?P<op>recv|send) operation"),  # gloo
         re.compile(r"Watchdog caught collective operation timeout: WorkNCCL\(.*?OpType=(?P<op>\w+).*?"
                    r"Timeout\(ms\)=(?P<ms>\d+)"),  # NCCL
         re.compile(r"Application timeout caused pair closure"))  # gloo, a collective after a timed-out one
_DIED = (re.compile(r"(?:Connection closed by peer|Read error|Write error) \[(?P<addr>[^\]]+)\]:(?P<port>\d+)"),  # gloo
         re.compile(r"Connection reset by peer|Broken pipe|failed to recv, got 0 bytes"),  # gloo, the TCPStore
         re.compile(r"NCCL communicator was aborted|remote process exited or there was a network error"))  # NCCL
# What torch 2.14's TCPStore says when ranks never join rank 0, which listens (the others wait for it before they
# connect: see wait_for_rank_zero).
_NEVER_JOINED = re.compile(r"Timed out after (?P<s>\d+) seconds waiting for clients\. (?P<joined>\d+)/(?P<total>\d+) "
                           r"clients joined")
_RESUME = ("relaunch the same command to resume from the last checkpoint (torchrun --max-restarts=N or a "
           "SLURM requeue does it by itself)")


def explain_collective_failure(err: BaseException, env=os.environ) -> str | None:
    """One line for a collective that failed because a peer rank hung or died, or None for any other error.

    Says which rank gave up, on what, after how long (dist.timeout_s bounds it), who the peer was when it can
    be known (with two ranks, the other one), and what to do.
    """
    if isinstance(err, RankZeroNeverCame):
        return str(err)
    text = " ".join(str(e) for e in _exception_chain(err))
    rank, _, world_size = launcher_ranks(env)
    me = f"rank {rank} of {world_size}"
    peer = f"rank {1 - rank}" if world_size == 2 else "a peer rank"
    if message := _explain_rendezvous(text, me):
        return message
    for pattern in _HUNG:
        if found := pattern.search(text):
            what = f" ({found['op'].lower()}) after {int(found['ms']) / 1000:g} s" if found.groupdict() else ""
            return (f"{me} gave up on a collective{what} waiting for {peer}, which stopped responding "
                    f"(hung, stopped, or its node is gone; dist.timeout_s bounds this wait): look at that "
                    f"rank's log and node, then {_RESUME}")
    for pattern in _DIED:
        if found := pattern.search(text):
            where = f" at {found['addr']}:{found['port']}" if found.groupdict() else ""
            return (f"{me} lost {peer}{where} in the middle of a collective: that rank died (crashed, killed, out "
                    f"of memory, or its node failed); its log or the launcher's says why. Then {_RESUME}")
    return None


def _explain_rendezvous(text: str, me: str) -> str | None:
    """One line for a rendezvous that rank 0 gave up after dist.timeout_s, naming the ranks that never came."""
    if found := _NEVER_JOINED.search(text):
        joined, total = int(found["joined"]), int(found["total"])
        missing = "rank 1" if total == 2 else f"{total - joined} of ranks 1..{total - 1}"
        return (f"{me} waited {found['s']} s (dist.timeout_s) for the other ranks to join it at MASTER_ADDR:"
                f"MASTER_PORT, but {missing} never came (not started, or cannot reach this host); start every rank "
                f"(torchrun starts them all), or fix MASTER_ADDR/MASTER_PORT, then relaunch")
    return None


def _exception_chain(err: BaseException):
    """The error and the errors it was raised from or during, each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def stop_signals(env=os.environ) -> tuple[signal.Signals, ...]:
    """The signals that mean "checkpoint and stop": a scheduler's (TERM; USR1/USR2 ahead of a time limit),
    Ctrl-C (INT), a closed terminal (HUP), and submitit's preemption signal, whatever
    SUBMITIT_PREEMPT_SIGNAL makes it."""
    found = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2]
    preempt = getattr(signal, "SIG" + env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG"), None)
    if isinstance(preempt, signal.Signals) and preempt not in found:
        found.append(preempt)
    return tuple(found)


class StopSignals:
    """Remembers why this process should stop; the signal handler only sets a flag.

    Acting on it (agreeing across ranks, saving, exiting) happens at the next step boundary, in
    normal code. A second Ctrl-C aborts at once, as people expect. Under torchrun a worker also
    stops when its agent dies (SIGKILL, the OOM killer): nobody would watch or restart it, and a
    relaunch would train beside it. `previous` keeps the handlers that were there before
    (submitit's, for example) so that a launcher can hand the signal on once the checkpoint is safe.
    """

    AGENT_DIED = "the death of the torchrun agent"

    def __init__(self, env=os.environ):
        self.signals = stop_signals(env)
        self.reasons = tuple(signum.name for signum in self.signals) + (self.AGENT_DIED,)  # the same on every rank
        self.received: signal.Signals | None = None
        self.aborting = False
        self.previous: dict[signal.Signals, object] = {}
        # torchrun starts each worker as a child of its agent, in a session of its own.
        self.agent_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in env else None

    def __enter__(self) -> "StopSignals":
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            if not (signum == signal.SIGINT and self.aborting):  # further Ctrl-Cs would interrupt the clean-up
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            # A second Ctrl-C: the user does not want to wait for the checkpoint. A third, while the process
            # winds down, would only add a traceback, so from now on Ctrl-C is ignored.
            self.aborting = True
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise KeyboardInterrupt
        if self.received is None:  # the stop line names the first signal: torchrun follows a Ctrl-C with TERM
            self.received = signal.Signals(signum)

    def reason(self) -> str | None:
        """Why this process should stop at the next step boundary (one of `reasons`), or None."""
        if self.received is not None:
            return self.received.name
        if self.agent_pid is not None and os.getppid() != self.agent_pid:
            return self.AGENT_DIED
        return None

    def vote(self) -> list[int]:
        """One count per reason, 1 for this process's: summed over ranks, it says who saw what."""
        reason = self.reason()
        return [int(reason == name) for name in self.reasons]
