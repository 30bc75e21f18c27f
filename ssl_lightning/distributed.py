"""The one place for torch.distributed: world size, rank, and gathers that keep gradients.

Every batch statistic in this suite (variance, covariance, cross-correlation, whitening,
Sinkhorn sums, centers, negatives) is computed on the GLOBAL batch through these helpers.
Outside a process group they are identities, so the same loss code runs on one device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def _check_equal_sizes(x: torch.Tensor) -> None:
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
