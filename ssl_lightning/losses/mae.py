"""MAE's pixel-reconstruction loss and RC-MAE's reconstruction-consistency term
(facebookresearch/mae forward_loss; youngwanLEE/rc-mae engine_pretrain.py)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.common import fp32


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """norm_pix_loss target: each patch (last dim) becomes (x - mean) / sqrt(var + eps), with the
    UNBIASED variance over its p*p*C pixels (torch.var's default, as the official code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{n,l} mask_nl * mean_c (pred - target)_nlc^2 / sum_{n,l} mask_nl: the mean squared error
    over the masked patches only (mask 1 = masked). pred, target (N, L, P); mask (N, L).

    A per-rank mean over the LOCAL masked patches, as the official code. Every sample has the same
    number of masked patches, so every rank divides by the same count and DDP's gradient average
    is exactly the gradient of the mean over the global batch.
    """
    with fp32(pred, target, mask) as (pred, target, mask):
        per_patch = (pred - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


def mae_loss(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool = False
             ) -> torch.Tensor:
    """MAE loss: masked_patch_mse(pred, target, mask) with target = the patchified image
    ``patches`` (N, L, p*p*C), per-patch normalised (normalize_patches) when norm_pix_loss.
    Visible patches (mask 0) do not enter the loss. Per-rank mean: see masked_patch_mse."""
    target = normalize_patches(patches) if norm_pix_loss else patches
    return masked_patch_mse(pred, target, mask)


def reconstruction_consistency_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor, mask: torch.Tensor
                                    ) -> torch.Tensor:
    """RC-MAE's term: masked_patch_mse between the student's and the EMA teacher's predictions
    (N, L, p*p*C) of the SAME masked image; the teacher's prediction is behind a stop-gradient."""
    return masked_patch_mse(student_pred, teacher_pred.detach(), mask)
