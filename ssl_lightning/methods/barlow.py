"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., ICML 2021)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.barlow import barlow_twins_terms
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.models.heads import mlp


class BarlowTwins(SSLMethod):
    """Two views -> backbone -> projector (Linear-BN-ReLU x2, Linear) -> Barlow Twins loss on the
    cross-correlation of the GLOBAL batch (see ssl_lightning.losses.cross_correlation).

    scale_loss multiplies the whole loss (1.0 = official; solo-learn uses 0.1 on CIFAR).
    """

    def __init__(self, projector: str = "8192-8192-8192", lambd: float = 0.0051, scale_loss: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.projector = mlp(projector, self.feature_dim)
        self.lambd, self.scale_loss = lambd, scale_loss

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        if len(views) != 2:
            raise ValueError(f"Barlow Twins takes exactly 2 views, got {len(views)}; "
                             "configure data.views with 2 entries")
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])  # one pass per view, as the official code
        terms = barlow_twins_terms(self.projector(f1), self.projector(f2))
        loss = self.scale_loss * (terms["on_diagonal"] + self.lambd * terms["off_diagonal"])
        return SSLOutput(loss=loss, features=f1, logs={k: v.detach() for k, v in terms.items()})
