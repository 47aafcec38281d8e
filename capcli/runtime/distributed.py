"""Training on several processes with PyTorch's DistributedDataParallel, started by torchrun.

``torchrun --nproc-per-node N -m capcli train ...`` starts N copies of ``capcli train``; torchrun
sets WORLD_SIZE, RANK, LOCAL_RANK (and the rendezvous address) in their environment, and
``setup()`` joins them into one process group: NCCL for CUDA tensors, Gloo for CPU tensors
(``"cpu:gloo,cuda:nccl"`` where CUDA is available, so small CPU-side messages never need a GPU).
Without WORLD_SIZE > 1 every helper here is a no-op and training is the plain single process.

Every collective has a timeout, CAPCLI_DIST_TIMEOUT seconds (default 1800): a process that dies or
hangs makes the others stop with a clear error instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn, Sequence, TypeVar

import torch

from capcli.runtime.devices import resolve_device
from capcli.errors import CapcliError

log = logging.getLogger("capcli")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0

_joined = False  # see exit_process


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; the defaults describe a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # as given to init_process_group
    owns_group: bool = False  # setup() made the process group, so cleanup() ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


class DistributedError(CapcliError):
    """Another process of the job died, hung, or cannot be reached: this one stops too."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise CapcliError(f"environment variable {name}={value!r} is not a number") from None


def timeout_from_env() -> datetime.timedelta:
    """CAPCLI_DIST_TIMEOUT: seconds a collective may wait for the other processes (default 1800)."""
    value = os.environ.get("CAPCLI_DIST_TIMEOUT", "")
    try:
        seconds = float(value) if value.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise CapcliError(f"CAPCLI_DIST_TIMEOUT={value!r}: expected seconds") from None
    if seconds <= 0:
        raise CapcliError(f"CAPCLI_DIST_TIMEOUT={value!r}: must be positive")
    return datetime.timedelta(seconds=seconds)


def setup() -> DistContext:
    """Join the process group torchrun describes in the environment; SINGLE when there is none."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise CapcliError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise CapcliError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: start distributed runs with torchrun")
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # before NCCL starts: one GPU per process
        backend = "cpu:gloo,cuda:nccl"
    else:  # CPU processes (more of them than GPUs can only train on the CPU; see training_device)
        backend = "gloo"
    owns = not dist.is_initialized()  # else set up by the caller (a test, an API user): use it as it is
    if owns:
        global _joined
        dist.init_process_group(backend=backend, timeout=timeout_from_env())
        _joined = True
    else:
        backend = str(dist.get_backend())
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                      local_world_size=local_world, backend=backend, owns_group=owns)
    if not ctx.is_main:
        log.setLevel(max(log.level, logging.ERROR))  # rank 0 speaks for the job
    return ctx


def cleanup(ctx: DistContext) -> None:
    """End the process group on every rank together, after the last collective has finished."""
    if ctx.enabled and ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def joined_a_group() -> bool:
    """Has this process started Gloo/NCCL threads (setup() joined a process group)?"""
    return _joined


def exit_process(code: int) -> NoReturn:
    """End a process that joined a process group, without Python's interpreter shutdown.

    DistributedDataParallel keeps the group referenced from C++, so destroy_process_group() cannot
    join Gloo's worker threads; one of them that drops the last reference to a finished collective
    during shutdown takes the GIL, is torn down and aborts the process ("terminate called without
    an active exception", SIGABRT), which torchrun reports as a failed job (docs/performance-notes.md).
    Everything capcli writes is complete (checkpoints are renamed into place), so flush and leave.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def training_device(ctx: DistContext, name: str) -> torch.device:
    """The device of this process: cuda:LOCAL_RANK for auto/cuda under torchrun, else as asked."""
    device = resolve_device(name)
    if not ctx.enabled or device.type != "cuda":
        return device
    if ctx.local_rank >= torch.cuda.device_count():
        raise CapcliError(f"process {ctx.rank} has LOCAL_RANK {ctx.local_rank} but this machine has only "
                          f"{torch.cuda.device_count()} GPUs: start at most that many processes per machine "
                          f"(--nproc-per-node), or train with --device cpu")
    if device.index is not None and device.index != ctx.local_rank:
        log.warning("--device %s ignored under torchrun: process %d uses cuda:%d", name, ctx.rank, ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


def backend_name(ctx: DistContext, device: torch.device) -> str:
    """The backend that carries the gradients: nccl on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``net``, on this process's device."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # BatchNorm is frozen (eval mode): no buffers to sync at every forward.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def log_batch_plan(ctx: DistContext, device: torch.device, batch_size: int, lr: float) -> None:
    """Say how the global batch is shared out and that the learning rate is not scaled."""
    import math

    per_rank = batch_size / ctx.world_size
    log.info(
        "distributed: %d processes on %d machine(s), %s on %s; global batch %d captions "
        "(--batch-size is the global batch: %s per process); learning rate %g as given, not scaled "
        "with the number of processes: a run matches one process with the same --batch-size",
        ctx.world_size, max(1, ctx.world_size // max(ctx.local_world_size, 1)), backend_name(ctx, device),
        device.type, batch_size,
        f"{per_rank:g}" if per_rank == int(per_rank) else f"{math.floor(per_rank)}-{math.ceil(per_rank)}", lr)
    if batch_size < ctx.world_size:
        log.warning("--batch-size %d is smaller than the %d processes: some have nothing to do at each step",
                    batch_size, ctx.world_size)


# --------------------------------------------------------------------------- errors

_MARKERS = ("gloo", "nccl", "c10d", "connection closed", "connection reset", "timed out", "timeout", "broken pipe",
            "processgroup", "socket")


def is_failure(exc: BaseException) -> bool:
    """Is ``exc`` a collective that failed because another process died, hung or is unreachable?"""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _MARKERS)


def failure_message(ctx: DistContext, exc: BaseException, run_dir: str | Path | None, task: str = "training") -> str:
    text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    text = text.split("] ", 1)[-1] if text.startswith("[") else text  # drop gloo's source location
    text = text.split(" This is typically caused", 1)[0]  # and its advice, which is ours below
    seconds = timeout_from_env().total_seconds()
    if "timeout" in text.lower() and "timed out" not in text.lower():  # gloo's "Application timeout caused pair closure"
        text = f"timed out: {text}"
    message = (f"distributed {task} stopped on rank {ctx.rank} of {ctx.world_size}: another process died, hung or "
               f"cannot be reached ({text[:300]}); collectives wait at most {seconds:g} s (CAPCLI_DIST_TIMEOUT). "
               f"See the other processes' output for the cause")
    if run_dir is not None:
        message += f"; continue from the last checkpoint with: torchrun ... -m capcli train --resume {run_dir}"
    return message


# --------------------------------------------------------------------------- collectives (no-ops alone)

def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(ctx: DistContext, obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for small things and state dicts)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(ctx: DistContext, obj: T) -> list[T]:
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (and returned)."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over the ranks, in place (and returned)."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a CapcliError it raises is
    raised on every rank (so no rank is left waiting for an answer that never comes)."""
    if not ctx.enabled:
        return fn()
    result: tuple = (None, None)
    if ctx.is_main:
        try:
            result = (fn(), None)
        except CapcliError as e:
            result = (None, (e.message, e.exit_code))
    value, error = broadcast_object(ctx, result)
    if error is not None:
        raise CapcliError(*error)
    return value


def broadcast_module(ctx: DistContext, module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (already on its device)."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=src)


# --------------------------------------------------------------------------- sharding

def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's share of n items: contiguous, sizes differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shard_batch(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's part of one global batch: contiguous, so a length-bucketed batch stays bucketed."""
    lo, hi = shard_range(len(batch), rank, world)
    return list(batch[lo:hi])


# --------------------------------------------------------------------------- shared folders

def storage_leaders(ctx: DistContext, directory: Path) -> list[int]:
    """For every rank, the lowest rank that sees the same ``directory`` (the same files).

    On one machine, or on machines that share the folder, that is rank 0 for all; on machines
    with their own local folder it is each machine's first rank. Found by a probe file that the
    leader writes and the others look for, one round per distinct folder.
    """
    if not ctx.enabled:
        return [0]
    directory.mkdir(parents=True, exist_ok=True)
    token = broadcast_object(ctx, uuid.uuid4().hex)
    leaders: list[int | None] = [None] * ctx.world_size
    while None in leaders:
        leader = leaders.index(None)
        probe = directory / f".capcli-probe-{token}-{leader}"
        if ctx.rank == leader:
            probe.write_bytes(b"")
        barrier(ctx)
        sees = leaders[ctx.rank] is None and probe.exists()
        for r, flag in enumerate(all_gather_object(ctx, sees)):
            if flag:
                leaders[r] = leader
        if leaders[leader] is None:  # cannot see its own file: give up on sharing, be alone
            leaders[leader] = leader
        barrier(ctx)
        if ctx.rank == leader:
            probe.unlink(missing_ok=True)
    return [int(x) for x in leaders]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- checks (tests, debugging)

def sync_check_enabled() -> bool:
    return os.environ.get("CAPCLI_DEBUG_SYNC_CHECK", "") not in ("", "0")


def parameter_checksums(module: torch.nn.Module) -> torch.Tensor:
    """Two float64 numbers per parameter (plain and position-weighted sum): equal weights, equal sums."""
    sums = []
    for p in module.parameters():
        x = p.detach().double().flatten()
        w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) % 97
        sums += [x.sum(), (x * w).sum()]
    return torch.stack(sums).cpu()


def check_in_sync(ctx: DistContext, module: torch.nn.Module, where: str) -> None:
    """Raise if the ranks' parameters differ (bit for bit, through their checksums)."""
    if not ctx.enabled:
        return
    sums = all_gather_object(ctx, parameter_checksums(module))
    names = [n for n, _ in module.named_parameters()]
    for r, theirs in enumerate(sums):
        if not torch.equal(theirs, sums[0]):  # the same verdict on every rank
            k = int((theirs != sums[0]).nonzero()[0, 0]) // 2
            raise CapcliError(f"{where}: the parameters of rank {r} differ from rank 0's (first: {names[k]})", exit_code=1)
