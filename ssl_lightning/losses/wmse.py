"""W-MSE (Ermolov, Siarohin, Sangineto, Sebe, ICML 2021), as in htdt/self-supervised methods/w_mse.py."""
from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F

from ssl_lightning import spectral
from ssl_lightning.distributed import gather_with_grad
from ssl_lightning.losses.common import fp32


def norm_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 - 2 mean_i cos(a_i, b_i) for a, b (n, D): the MSE of the l2-normalised rows (W-MSE, INTL)."""
    return 2 - 2 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1).mean()


def wmse_loss(zs: Sequence[torch.Tensor], *, w_size: int, w_iter: int = 1, eps: float = 0.0,
              seed: int = 0) -> torch.Tensor:
    """W-MSE loss of V >= 2 views of LOCAL embeddings zs[i] (b, D).

    Each view is gathered with gradient into the GLOBAL batch (B, D). w_iter times, the B sample
    indices are split at random into B / w_size sub-batches, the same split for every view (drawn on the
    embeddings' device from a generator seeded with ``seed``, so every rank draws the same one); every
    sub-batch of every view is whitened by ``spectral.cholesky_whiten(eps)`` (fp64). Loss = mean over
    the w_iter splits and the V (V - 1) / 2 view pairs of ``norm_mse`` over the B samples.
    The official code whitens the batch of its single process; here the split runs over the global
    batch, so the loss does not depend on the number of GPUs.
    """
    if len(zs) < 2:
        raise ValueError(f"W-MSE needs at least 2 views, got {len(zs)}")
    with fp32(*zs) as zs:
        zs = [gather_with_grad(z) for z in zs]
        batch = zs[0].shape[0]
        if w_size < 2 or batch % w_size:
            raise ValueError(f"W-MSE: the global batch {batch} is not divisible into sub-batches of w_size={w_size}; "
                             "choose a w_size >= 2 that divides data.batch_size")
        device = zs[0].device  # the split is drawn there: no host-to-device copy per step
        generator = torch.Generator(device=device).manual_seed(seed)
        context = f"W-MSE (w_size {w_size}, D {zs[0].shape[1]})"
        losses = []
        for _ in range(w_iter):
            split = torch.randperm(batch, generator=generator, device=device).view(-1, w_size)
            # every view's rows in the same (permuted) order: the loss is a mean over samples
            white = [torch.cat([spectral.cholesky_whiten(z[idx], eps=eps, context=context) for idx in split])
                     for z in zs]
            losses += [norm_mse(white[i], white[j]) for i, j in combinations(range(len(zs)), 2)]
        return torch.stack(losses).mean()
