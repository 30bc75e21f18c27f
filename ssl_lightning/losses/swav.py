"""SwAV (Caron et al., NeurIPS 2020), as in facebookresearch/swav main_swav.py."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_no_grad, world_size
from ssl_lightning.losses.common import fp32


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Equal-partition soft codes (n, K) for prototype scores (n, K); every row sums to 1.

    Official ``distributed_sinkhorn``: Q = exp(scores / epsilon)^T (K, n) divided by its GLOBAL total,
    then ``iters`` times: each prototype row divided by its GLOBAL sum and by K, each sample column
    by its LOCAL sum and by B = n * world_size; the codes are (Q * B)^T. GLOBAL: the max, the
    total, the prototype (row) sums and B; LOCAL: the per-sample (column) sums. Every rank must call
    it with the same n (queue rows + batch). No gradient; fp32 even under autocast (float64 kept).

    The GLOBAL max is subtracted before exp (the official code does not): the result is the same
    (Q is normalised by its total), but exp cannot overflow, so scores / epsilon may be any size.
    Entries more than ~87 * epsilon below the max underflow to 0, which is harmless unless a whole
    prototype row underflows (scores spread over more than ~87 * epsilon; cosine scores spread at
    most 2, so epsilon >= 0.025 is always safe).
    """
    if iters < 1 or epsilon <= 0:
        raise ValueError(f"sinkhorn needs iters >= 1 (got {iters}) and epsilon > 0 (got {epsilon})")
    with fp32(scores.detach()) as (s,):
        num_prototypes = s.shape[1]
        total_samples = s.shape[0] * world_size()
        q = torch.exp((s - all_reduce_no_grad(s.max(), "max")) / epsilon).T
        q /= all_reduce_no_grad(q.sum())
        for _ in range(iters):
            q /= all_reduce_no_grad(q.sum(dim=1, keepdim=True))
            q /= num_prototypes
            q /= q.sum(dim=0, keepdim=True)
            q /= total_samples
        return (q * total_samples).T


def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], *,
              temperature: float = 0.1) -> torch.Tensor:
    """Swapped prediction: the codes of each assignment crop predicted from every other crop.

    scores: one (b, K) prototype-score tensor per crop, assignment crops first; codes: Sinkhorn codes
    (b, K) of the first ``len(codes)`` crops. For assignment crop i the subloss is the mean over crops
    v != i of -mean_b sum_k codes_i log softmax(scores_v / temperature); the loss is the mean of the
    sublosses (official: divide by num_crops - 1, then by the number of assignment crops).
    All terms are LOCAL per-sample cross-entropies (DDP's gradient average makes them global);
    the codes already carry the GLOBAL Sinkhorn statistics. fp32 even under autocast.
    """
    if len(scores) < 2 or not 1 <= len(codes) <= len(scores):
        raise ValueError(f"swav_loss needs >= 2 crops and 1..{len(scores)} assignment crops, "
                         f"got {len(scores)} crops and {len(codes)} codes")
    with fp32(*scores, *codes) as tensors:
        scores, codes = tensors[:len(scores)], tensors[len(scores):]
        log_p = [F.log_softmax(s / temperature, dim=1) for s in scores]
        loss = 0.0
        for i, q in enumerate(codes):
            subloss = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i)
            loss = loss + subloss / (len(scores) - 1)
        return loss / len(codes)
