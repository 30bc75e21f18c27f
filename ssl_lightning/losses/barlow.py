"""Barlow Twins (Zbontar et al., ICML 2021), as in facebookresearch/barlowtwins main.py."""
from __future__ import annotations

import torch

from ssl_lightning.distributed import gather_with_grad
from ssl_lightning.losses.common import fp32, off_diagonal


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode: biased variance, eps 1e-5."""
    zc = z - z.mean(dim=0)
    return zc * torch.rsqrt(zc.pow(2).mean(dim=0) + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """(D, D) cross-correlation of two (b, D) embeddings over the GLOBAL batch of B = W*b samples.

    z1, z2 are gathered with gradient, each dimension standardised over the global batch, and
    c = z1n^T z2n / B. (The official code sums per-rank c with a plain all_reduce, which carries no
    gradient: gradients 1/W too small, barlowtwins issue 8. Gathering first avoids that.)
    """
    g1, g2 = gather_with_grad(z1, check_sizes=True), gather_with_grad(z2, check_sizes=True)
    if g1.shape[0] < 2:
        raise ValueError(f"Barlow Twins needs a global batch of at least 2 samples, got {g1.shape[0]}")
    return _standardise(g1).T @ _standardise(g2) / g1.shape[0]


def barlow_twins_terms(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unweighted terms on the GLOBAL cross-correlation c (see cross_correlation), in fp32 even
    under autocast: on_diagonal = sum_i (c_ii - 1)^2, off_diagonal = sum_{i != j} c_ij^2."""
    with fp32(z1, z2) as (z1, z2):
        c = cross_correlation(z1, z2)
        return {"on_diagonal": (torch.diagonal(c) - 1).pow(2).sum(), "off_diagonal": off_diagonal(c).pow(2).sum()}


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, *, lambd: float = 0.0051) -> torch.Tensor:
    """sum_i (c_ii - 1)^2 + lambd * sum_{i != j} c_ij^2 for (b, D) embeddings; c is the
    cross-correlation of the GLOBAL batch (every rank computes the same value)."""
    terms = barlow_twins_terms(z1, z2)
    return terms["on_diagonal"] + lambd * terms["off_diagonal"]
