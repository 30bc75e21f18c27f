"""MoCo v2 (Chen et al. 2020, facebookresearch/moco) and MoCo v3 (Chen, Xie, He 2021,
facebookresearch/moco-v3) contrastive losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import gather_no_grad, rank
from ssl_lightning.losses.common import fp32


def mocov2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, *, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE against a queue: CE over logits [q.k+, q.queue^T] / temperature with label 0.

    q: (b, D) queries (with gradient); k: (b, D) their positive keys from the momentum encoder;
    queue: (K, D) negatives, unit rows. q and k are l2-normalised here; k and queue get no gradient.
    LOCAL: the mean over this rank's b queries, each with its own key (DDP's gradient average makes
    it the global mean). GLOBAL: the negatives, since the queue holds keys gathered from every rank
    and is identical on all of them. Computed in fp32 even under autocast.
    """
    with fp32(q, k, queue) as (q, k, queue):
        q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ queue.detach().T
        logits = torch.cat([positive, negatives], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


def mocov3_loss(q: torch.Tensor, k: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """One direction ctr(q, k) of MoCo v3: CE(q . k_all^T / T, positives on the diagonal) * 2T.

    q: (b, D) predictor outputs of one view (with gradient); k: (b, D) momentum-encoder outputs of
    the other view (no gradient). Both are l2-normalised here. GLOBAL: the keys are gathered from
    all ranks (W*b of them, without gradient), so every query sees the whole batch as negatives;
    query i of rank r has its positive at column r*b + i. LOCAL: the mean over this rank's b
    queries. The 2T factor is the official code's (it keeps the gradient scale independent of T).
    Computed in fp32 even under autocast. Equal per-rank batch sizes are required (drop_last).
    """
    with fp32(q, k) as (q, k):
        q = F.normalize(q, dim=1)
        keys = gather_no_grad(F.normalize(k.detach(), dim=1))
        logits = q @ keys.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
        return F.cross_entropy(logits, labels) * (2 * temperature)
