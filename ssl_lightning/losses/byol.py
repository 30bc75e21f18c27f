"""BYOL's regression loss (Grill et al. 2020, deepmind-research/byol), with multi-crop pairs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.losses.common import fp32


def byol_regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean over the LOCAL batch of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z) for (b, D) online
    predictions p and target projections z (detached: the stop-gradient). In [0, 4]: 0 for p == z,
    4 for p == -z. No batch statistic: DDP's gradient average makes it the global mean.
    Norms are clamped at 1e-12 (F.normalize); the official code clamps the squared norm at 1e-12.
    """
    with fp32(p, z) as (p, z):
        p, z = F.normalize(p, dim=-1, eps=1e-12), F.normalize(z.detach(), dim=-1, eps=1e-12)
        return (2 - 2 * (p * z).sum(dim=-1)).mean()


def byol_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Symmetrised BYOL loss: sum over target views g of the mean over online views v != g of
    byol_regression_loss(predictions[v], targets[g]).

    predictions: online p(v) for all V views (global first); targets: target-network z(g) for the
    G <= V global views. With 2 views this is the official loss_1 + loss_2 averaged over the batch
    (in [0, 8]); with multi-crop each target view contributes the mean over the other V - 1 views.
    """
    if len(targets) < 1 or len(predictions) < 2 or len(targets) > len(predictions):
        raise ValueError(f"BYOL needs >= 2 online views and 1..{len(predictions)} target views, "
                         f"got {len(predictions)} and {len(targets)}")
    per_target = [torch.stack([byol_regression_loss(p, z) for v, p in enumerate(predictions) if v != g]).mean()
                  for g, z in enumerate(targets)]
    return torch.stack(per_target).sum()
