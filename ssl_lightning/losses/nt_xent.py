"""SimCLR's NT-Xent (Chen et al. 2020, google-research/simclr), with multi-crop positives."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import gather_with_grad, rank
from ssl_lightning.losses.common import fp32


def multiview_nt_xent_loss(zs: Sequence[torch.Tensor], *, temperature: float) -> torch.Tensor:
    """NT-Xent over V >= 2 views ``zs`` of the same b images, each (b, D); mean over the V*b anchors.

    Every embedding is L2-normalised; the LOCAL anchors (queries) are scored against the GLOBAL keys
    (all V views of all W*b images, gathered with gradient), self-similarity masked. Per anchor i:
    ``-mean_{p in P(i)} log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))``, P(i) = the other V - 1
    views of the same image (multi-positive; with 2 views, the usual single positive). Each rank
    returns the mean over its own anchors; DDP's gradient average makes it the mean over all V*B.
    The TF code reports loss_a + loss_b, i.e. twice this value for 2 views. Computed in fp32.
    """
    if len(zs) < 2:
        raise ValueError(f"NT-Xent needs at least 2 views, got {len(zs)}")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be positive (SimCLR: 0.1 ImageNet, 0.5 CIFAR)")
    with fp32(*zs) as zs:
        views, b = len(zs), zs[0].shape[0]
        local = F.normalize(torch.stack(zs, dim=1), dim=-1)  # (b, V, D)
        keys = gather_with_grad(local, check_sizes=True)  # (B, V, D), rank order
        n = keys.shape[0]
        queries = local.transpose(0, 1).reshape(views * b, -1)  # anchor (v, i) at row v*b + i
        logits = queries @ keys.transpose(0, 1).reshape(views * n, -1).T / temperature  # (V*b, V*B)

        image = torch.arange(b, device=logits.device) + rank() * b  # global index of each local image
        query_image = image.repeat(views)
        key_image = torch.arange(n, device=logits.device).repeat(views)
        same_image = query_image[:, None] == key_image[None, :]
        key_view = torch.arange(views, device=logits.device).repeat_interleave(n)
        query_view = torch.arange(views, device=logits.device).repeat_interleave(b)
        is_self = same_image & (query_view[:, None] == key_view[None, :])
        positive = same_image & ~is_self

        log_prob = logits - logits.masked_fill(is_self, float("-inf")).logsumexp(dim=1, keepdim=True)
        per_anchor = -(log_prob * positive).sum(dim=1) / (views - 1)
    return per_anchor.mean()


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Two-view NT-Xent (SimCLR): mean over the 2b local anchors against the 2B global keys.
    All embeddings identical gives log(2B - 1) per anchor. See multiview_nt_xent_loss."""
    return multiview_nt_xent_loss([z1, z2], temperature=temperature)
