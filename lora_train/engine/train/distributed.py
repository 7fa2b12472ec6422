"""Training one LoRA on N processes (``torchrun`` / ``accelerate launch``) with PyTorch's DistributedDataParallel.

A run on N processes is the run one process would make with ``batch_size x N``: every process walks the same
global batches (``epoch_batches`` at ``batch_size x N``), takes its rows of each, draws the whole batch's noise
and timesteps and keeps its rows, and DDP averages the LoRA gradients. Steps, epochs and schedules therefore
count global steps. Rank 0 writes every file; the others only train.

``Team`` is what the trainer asks (which rows are mine, did anyone ask to stop, the mean loss); ``SOLO``, a
team of one, answers without any collective, so the single-process path (the WebUI's too) runs the same code
unchanged. accelerate adds nothing the loop needs beyond its launcher (which sets the same environment as
torchrun), so the engine does not import it.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

# Long enough for rank 0 to draw sample images or write a checkpoint while the others wait at the next
# all-reduce; a rank that is stuck longer than this ends the run instead of hanging it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)
_FAILED_KEY = "lora_train/failed"

T = TypeVar("T")


def launched() -> bool:
    """True inside a process torchrun or accelerate started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def under_launcher() -> bool:
    """True in any process a launcher started (torchrun, accelerate launch), also as the only one."""
    return "RANK" in os.environ


@dataclass(frozen=True)
class Share:
    """This process's part of one global batch: its item indices, their rows in the batch, and the weight that
    makes DDP's gradient average equal the gradient of the whole batch's mean loss.

    A short last batch of a bucket can leave a process without rows: it then trains one row with weight 0, so
    its backward still joins the all-reduce and adds nothing.
    """

    indices: list[int]
    rows: slice
    total: int
    weight: float


class _Adapters(torch.nn.Module):
    """The trainable LoRA parameters as one module for DDP (the frozen base stays outside, never synced);
    its forward runs the loss closure, so DDP sees every use of them."""

    def __init__(self, params: list[torch.nn.Parameter]):
        super().__init__()
        self.params = torch.nn.ParameterList(params)

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(*args, **kwargs)


class Team:
    """The processes of one run. A team of one (``SOLO``) does no collective at all."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self._ddp: torch.nn.parallel.DistributedDataParallel | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and talks to the user."""
        return self.rank == 0

    def use_device(self, name: str) -> str:
        """The device this process trains on: ``auto``/``cuda`` give each process its own GPU
        (``cuda:<local rank>``, made the current one; with fewer GPUs than processes they share, which checks the
        path); ``cpu`` trains every process on the CPU. One GPU named for all processes is refused."""
        if self.world == 1 or name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
            return name
        if name not in ("auto", "cuda"):
            from lora_train.engine.config.checks import ConfigError

            raise ConfigError("device", f"{name!r} would put every process on one device; with several processes "
                                        "use auto (each takes its own GPU) or cpu")
        index = self.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"

    def share(self, batch: list[int], per_process: int) -> Share:
        """Rows ``[rank x per_process, (rank + 1) x per_process)`` of the global ``batch``."""
        if self.world == 1:
            return Share(batch, slice(0, len(batch)), len(batch), 1.0)
        start = min(self.rank * per_process, len(batch))
        stop = min(start + per_process, len(batch))
        if start == stop:
            return Share([batch[0]], slice(0, 1), len(batch), 0.0)
        return Share(batch[start:stop], slice(start, stop), len(batch), self.world * (stop - start) / len(batch))

    def part(self, items: Iterable[T]) -> list[T]:
        """Every world-th item from rank on: this process's share of work done once for all (caches)."""
        return list(items)[self.rank :: self.world]

    # --- collectives (no-ops for a team of one) ---

    def wrap(self, params: list[torch.nn.Parameter], device: torch.device) -> None:
        """Put the trainable LoRA parameters under DDP: their gradients are averaged over the processes."""
        if self.world == 1:
            return
        trainable = [p for p in params if p.requires_grad]
        ids = [device.index] if device.type == "cuda" else None
        self._ddp = torch.nn.parallel.DistributedDataParallel(_Adapters(trainable), device_ids=ids)

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the loss ``fn`` through DDP (when wrapped), which then all-reduces its backward's gradients."""
        return self._ddp(fn, *args, **kwargs) if self._ddp is not None else fn(*args, **kwargs)

    def accumulating(self, sync: bool):
        """Around forward and backward of a micro-batch: gradients are all-reduced only when ``sync`` (the last
        micro-batch of a step); before it they add up locally (DDP's ``no_sync``)."""
        return self._ddp.no_sync() if self._ddp is not None and not sync else nullcontext()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (a stop asked for on one rank stops all at one step)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes (the logged loss of the global batch)."""
        if self.world == 1:
            return value
        total = value.detach().clone()
        torch.distributed.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.world

    def from_main(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, its result on every rank (decisions such as the run's file names)."""
        if self.world == 1:
            return make()
        box = [make() if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, mine: dict) -> dict:
        """Every process's ``mine`` merged, on every process (cache entries each computed once)."""
        if self.world == 1:
            return dict(mine)
        parts: list[dict | None] = [None] * self.world
        torch.distributed.all_gather_object(parts, mine)
        return {key: value for part in parts for key, value in (part or {}).items()}

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def first_to_fail(self) -> bool:
        """True for the first process that fails; the rest stay silent (one message, not one per process).

        Uses the rendezvous store, which works while the other processes are blocked in a collective.
        """
        if self.world == 1:
            return True
        try:
            store = torch.distributed.distributed_c10d._get_default_store()
            return store.add(_FAILED_KEY, 1) == 1
        except Exception:  # no store reachable: better one message per process than none
            return True


SOLO = Team()


@contextmanager
def started() -> Iterator[Team]:
    """The process group of a launched run (gloo for CPU tensors, NCCL for CUDA ones), closed at the end;
    ``SOLO`` when not launched."""
    if not launched():
        yield SOLO
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    # NCCL wants one GPU per process; processes sharing a GPU (a check of the path) all-reduce through gloo
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    own_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    backend = "cpu:gloo,cuda:nccl" if own_gpus else "gloo"
    torch.distributed.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Team(rank, world, local_rank)
    finally:
        torch.distributed.destroy_process_group()


def launch_command(processes: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs ``lora_train argv`` on ``processes`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "-m", "lora_train", *argv]
