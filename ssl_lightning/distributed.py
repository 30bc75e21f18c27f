"""The one place for torch.distributed: world size, rank, and gathers that keep gradients; and
``DelayedHostRead``, how the training step reads a device value without waiting for the device.

Every batch statistic in this suite (variance, covariance, cross-correlation, whitening,
Sinkhorn sums, centers, negatives) is computed on the GLOBAL batch through these helpers.
Outside a process group they are identities, so the same loss code runs on one device.
"""
from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ssl_lightning.console import first_line

_local_only = False


@contextmanager
def local_only() -> Iterator[None]:
    """Inside, every helper here acts as on one process although a process group exists: for work
    that ranks split into independent pieces, each on whole batches (the loss-landscape grid)."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


def is_distributed() -> bool:
    return not _local_only and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0. Backward: all_reduce(SUM) of the incoming gradient, then
    this rank's slice. Every rank computes the same global loss and DDP averages over W ranks, so
    the result is exactly the gradient of the single-process loss on the concatenated batch.
    (A plain all_reduce/all_gather carries no gradient: the 1/W bug of barlowtwins issue 8.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.local_size = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.local_size
        return grad[start : start + ctx.local_size]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Forward: all_reduce(SUM). Backward: all_reduce(SUM) of the gradient (every rank used the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


_sizes_checked = False


def _check_equal_sizes(x: torch.Tensor) -> None:
    """Once per process (a host read of every rank's size): with drop_last the sizes cannot change later,
    and every rank reaches its first check at the same gather, so the collectives stay matched."""
    global _sizes_checked
    if _sizes_checked:
        return
    _sizes_checked = True
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(
            f"per-rank batch sizes differ ({[int(s) for s in sizes]}); the global batch statistics need "
            "equal shards: keep drop_last=True for training and make batch_size divisible by the devices"
        )


def gather_with_grad(x: torch.Tensor, *, check_sizes: bool = False) -> torch.Tensor:
    """(b, ...) on each rank -> (W*b, ...) in rank order, differentiable w.r.t. this rank's x."""
    if not is_distributed():
        return x
    if check_sizes:
        _check_equal_sizes(x)
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) -> (W*b, ...) without gradient (queues, keys, evaluation banks)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (for sums of statistics such as BatchNorm moments)."""
    if not is_distributed():
        return x
    return _AllReduceSumWithGrad.apply(x)


@torch.no_grad()
def all_reduce_no_grad(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or "max") over ranks of a statistic that needs no gradient (Sinkhorn sums, DINO center)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle-BN: gather the global batch, permute it (rank 0's permutation, broadcast) and
    hand each rank a slice, so per-rank BatchNorm of the key encoder sees a random mix of ranks.
    Returns (this rank's shuffled slice, the index that batch_unshuffle needs). No-op on one process."""
    if not is_distributed():
        return x, torch.arange(x.shape[0], device=x.device)
    everything = gather_no_grad(x)
    perm = torch.randperm(everything.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    local = perm.view(world_size(), -1)[rank()]
    return everything[local], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Inverse of batch_shuffle for the outputs: this rank's own samples, in their original order."""
    if not is_distributed():
        return y
    everything = gather_no_grad(y)
    return everything[unshuffle_index.view(world_size(), -1)[rank()]]


class DelayedHostRead:
    """Reads small device tensors on the host one call later, without a device synchronisation.

    ``push(x, tag)`` queues a copy of ``x`` to host memory and returns ``(tag, values)`` of the push
    ``delay`` calls earlier (None until there are that many). On CUDA the copy is non-blocking into pinned memory and
    an event marks its end; by the time it is read the device has finished that work in the steady
    state (a whole step was queued since), so the event wait is (nearly) free and the CPU keeps one
    step queued ahead of the device. On the CPU the "copy" is the tensor itself. ``drain()`` returns
    every pending value at once (at a checkpoint, at the end of a fit): then the host does wait.
    """

    def __init__(self, delay: int = 1):
        self.delay = delay
        self._pending: deque = deque()

    def push(self, x: torch.Tensor, tag=None) -> tuple[object, list[float]] | None:
        x = x.detach().reshape(-1)
        if x.device.type == "cuda":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = x.clone(), None
        host._ssl_host_copy = True  # host memory: reading it never waits for the device (tests/sync_audit.py)
        self._pending.append((tag, host, event))
        return self._pop() if len(self._pending) > self.delay else None

    def _pop(self) -> tuple[object, list[float]]:
        tag, host, event = self._pending.popleft()
        if event is not None:
            event.synchronize()  # waits for the work queued a step ago, not for the step just queued
        return tag, host.tolist()

    def drain(self) -> list[tuple[object, list[float]]]:
        return [self._pop() for _ in range(len(self._pending))]

    def __len__(self) -> int:
        return len(self._pending)


# Lower-case pieces of the messages gloo and NCCL raise when a peer is gone or silent (gloo words a hang
# "Timed out waiting ...ms" in one place and "Application timeout caused pair closure" in another).
PEER_FAILURE_SIGNS: tuple[str, ...] = (
    "connection reset by peer", "connection closed by peer", "broken pipe", "timed out", "timeout",
    "pair closure", "communicator was aborted", "watchdog caught collective operation",
)


def peer_failure(exc: BaseException) -> str | None:
    """The first line of ``exc`` (or of an exception it was raised from) when it says that another process
    of the distributed run died or stopped answering in a collective; None for any other error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        first = first_line(exc)
        if isinstance(exc, (RuntimeError, dist.DistError)) and any(s in first.lower() for s in PEER_FAILURE_SIGNS):
            return first
        exc = exc.__cause__ or exc.__context__
    return None


def layout_line(trainer, global_batch: int, peak_lr: float) -> str:
    """What each rank prints at the start of a fit: where it runs and what the batch and learning rate
    are. The batch is global (``data.batch_size``), so the peak lr does not change with the number of
    nodes or devices; only the per-device share does."""
    nodes, devices = trainer.num_nodes, trainer.num_devices
    per_device = global_batch // (nodes * devices * trainer.accumulate_grad_batches)
    return (f"ssl-lightning: rank {trainer.global_rank} of {trainer.world_size} on node {trainer.node_rank} of "
            f"{nodes} ({socket.gethostname()}), local rank {trainer.local_rank}; global batch {global_batch} = "
            f"{nodes} node(s) x {devices} device(s) x {per_device} per device"
            f"{f' x {trainer.accumulate_grad_batches} accumulated' if trainer.accumulate_grad_batches > 1 else ''}"
            f"; peak lr {peak_lr:.6g}")
