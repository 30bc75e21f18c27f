"""INTL and the spectral transformation (Weng et al., "Modulate your spectrum in self-supervised
learning", ICLR 2024), as in winci-ai/INTL methods/{intl,intl_m,whitening,base}.py.

Every view is gathered with gradient and transformed on the GLOBAL batch (B, D); all terms are
computed identically on every rank, so 1 and N GPUs give the same loss.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ssl_lightning import spectral
from ssl_lightning.distributed import gather_no_grad, gather_with_grad, world_size
from ssl_lightning.losses.wmse import norm_mse


def intl_beta(batch_size: int, dim: int, axis: int = 0) -> float:
    """The official trade-off 0.01 (log2 B - 3) for axis 0 (B = GLOBAL batch), 0.01 (log2 D - 3) for axis 1."""
    size = batch_size if axis == 0 else dim
    beta = 0.01 * (math.log2(size) - 3)
    if beta < 0:
        what = "global batch" if axis == 0 else "embedding dim"
        raise ValueError(f"INTL's default beta 0.01 (log2 {size} - 3) is negative for the {what} {size} < 8; set beta")
    return beta


def intl_terms(zs: Sequence[torch.Tensor], *, iters: int = 4, axis: int = 0) -> dict[str, torch.Tensor]:
    """Unweighted INTL terms of V >= 2 views of LOCAL embeddings zs[i] (b, D).

    t_i = IterNorm(GLOBAL z_i) (``spectral.iternorm``, fp32). alignment = mean_{i>=1}
    norm_mse(t_i, t_0); trace = mean_{i>=1} (TL(t_i) + TL(t_0)), TL = ``spectral.trace_loss``.
    Loss = alignment + beta * trace (``intl_beta``); for two views (2 - 2 cos) + beta (TL_1 + TL_2).
    """
    if len(zs) < 2:
        raise ValueError(f"INTL needs at least 2 views, got {len(zs)}")
    t = [spectral.iternorm(gather_with_grad(z), iters=iters, axis=axis, context="INTL") for z in zs]
    tl = [spectral.trace_loss(x, axis=axis) for x in t]
    alignment = torch.stack([norm_mse(t[i], t[0]) for i in range(1, len(t))]).mean()
    trace = torch.stack([tl[i] + tl[0] for i in range(1, len(t))]).mean()
    return {"alignment": alignment, "trace": trace}


def intl_momentum_terms(zs: Sequence[torch.Tensor], target: torch.Tensor, *, iters: int = 4,
                        axis: int = 0) -> dict[str, torch.Tensor]:
    """INTL-M (official intl_m.py): student views zs[i] (b, D) against the EMA teacher's embedding
    ``target`` (b, D) of the first view, which carries no gradient. All whitened on the GLOBAL batch.
    alignment = mean_i norm_mse(t_i, IterNorm(target)); trace = mean_i TL(t_i) (students only)."""
    if not zs:
        raise ValueError("INTL-M needs at least one student view besides the teacher's")
    with torch.no_grad():
        key = spectral.iternorm(gather_no_grad(target), iters=iters, axis=axis, context="INTL-M teacher")
    t = [spectral.iternorm(gather_with_grad(z), iters=iters, axis=axis, context="INTL-M") for z in zs]
    alignment = torch.stack([norm_mse(x, key) for x in t]).mean()
    trace = torch.stack([spectral.trace_loss(x, axis=axis) for x in t]).mean()
    return {"alignment": alignment, "trace": trace}


def intl_loss(z1: torch.Tensor, z2: torch.Tensor, *, beta: float | None = None, iters: int = 4,
              axis: int = 0) -> torch.Tensor:
    """Scalar two-view INTL loss (2 - 2 mean cos(t1, t2)) + beta (TL1 + TL2) of LOCAL z1, z2 (b, D);
    beta None = ``intl_beta`` of the GLOBAL batch (axis 0) or of D (axis 1)."""
    terms = intl_terms([z1, z2], iters=iters, axis=axis)
    if beta is None:
        beta = intl_beta(z1.shape[0] * world_size(), z1.shape[1], axis)
    return terms["alignment"] + beta * terms["trace"]


def st_loss(zs: Sequence[torch.Tensor], *, power: float = 0.5, eps: float = 1e-4, axis: int = 0) -> torch.Tensor:
    """Spectral-transformation loss of V >= 2 views of LOCAL embeddings zs[i] (b, D): mean_{i>=1}
    norm_mse(ST(z_i), ST(z_0)), ST = ``spectral.spectral_transform(power, eps, axis)`` of the GLOBAL
    batch (fp64 eigendecomposition). power 0.5 whitens (output spectrum lambda^(1 - 2 power))."""
    if len(zs) < 2:
        raise ValueError(f"ST needs at least 2 views, got {len(zs)}")
    context = f"ST (power {power}, axis {axis})"
    t = [spectral.spectral_transform(gather_with_grad(z), power=power, eps=eps, axis=axis, context=context)
         for z in zs]
    return torch.stack([norm_mse(t[i], t[0]) for i in range(1, len(t))]).mean()
