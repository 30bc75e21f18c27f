"""VICReg (Bardes, Ponce, LeCun 2022), as in facebookresearch/vicreg main_vicreg.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import gather_with_grad
from ssl_lightning.losses.common import fp32, off_diagonal


def _variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)  # unbiased, over the global batch
    return F.relu(1.0 - std).mean()


def _covariance_term(zc: torch.Tensor) -> torch.Tensor:
    n, d = zc.shape
    cov = zc.T @ zc / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_terms(
    z1: torch.Tensor, z2: torch.Tensor, *, eps: float = 1e-4, halve_variance: bool = True
) -> dict[str, torch.Tensor]:
    """The three unweighted VICReg terms for embeddings z1, z2 of shape (b, D).

    invariance: mean squared difference over the LOCAL b x D elements (DDP's gradient average
    makes it the global mean). variance and covariance: on the GLOBAL batch (W*b, D), gathered
    with gradient and centred there, computed in fp32 even under autocast. halve_variance keeps
    the official code's /2 on the variance term (the paper's formula has none).
    """
    with fp32(z1, z2) as (z1, z2):
        invariance = F.mse_loss(z1, z2)
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        if g1.shape[0] < 2:
            raise ValueError(f"VICReg needs a global batch of at least 2 samples, got {g1.shape[0]}")
        g1, g2 = g1 - g1.mean(dim=0), g2 - g2.mean(dim=0)
        variance = _variance_term(g1, eps) + _variance_term(g2, eps)
        if halve_variance:
            variance = variance / 2
        covariance = _covariance_term(g1) + _covariance_term(g2)
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
    halve_variance: bool = True,
) -> torch.Tensor:
    """Scalar VICReg loss: sim_weight*invariance + var_weight*variance + cov_weight*covariance.

    Gathers across ranks when torch.distributed is initialised (see vicreg_terms).
    """
    terms = vicreg_terms(z1, z2, eps=eps, halve_variance=halve_variance)
    return sim_weight * terms["invariance"] + var_weight * terms["variance"] + cov_weight * terms["covariance"]
