"""VICReg: Variance-Invariance-Covariance Regularization (Bardes et al., ICLR 2022)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.vicreg import vicreg_terms
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.models.heads import mlp


class VICReg(SSLMethod):
    """Two views -> backbone -> expander (Linear-BN-ReLU x2, Linear) -> VICReg loss.

    Variance and covariance use the global batch (see ssl_lightning.losses.vicreg_terms).
    """

    def __init__(
        self,
        projector: str = "8192-8192-8192",
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        eps: float = 1e-4,
        halve_variance: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.projector = mlp(projector, self.feature_dim)
        self.weights = {"invariance": sim_weight, "variance": var_weight, "covariance": cov_weight}

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        if len(views) != 2:
            raise ValueError(f"VICReg takes exactly 2 views, got {len(views)}; configure data.views with 2 entries")
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        terms = vicreg_terms(self.projector(f1), self.projector(f2),
                             eps=self.hparams.eps, halve_variance=self.hparams.halve_variance)
        loss = sum(self.weights[k] * v for k, v in terms.items())
        return SSLOutput(loss=loss, features=f1, logs=terms)
