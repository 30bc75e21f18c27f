"""W-MSE: whitening MSE (Ermolov, Siarohin, Sangineto, Sebe, ICML 2021)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.wmse import wmse_loss
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.methods.multicrop import check_views
from ssl_lightning.models.heads import mlp, parse_spec


class WMSE(SSLMethod):
    """Views -> backbone (one pass per view) -> projector on all views at once (as the official
    head) -> Cholesky whitening of random sub-batches of ``w_size`` -> 2 - 2 cos between views.

    The official code (htdt/self-supervised) is single-process. Here the sub-batches partition the
    GLOBAL batch with the same random split on every rank (seeded by the global step), so the loss
    and its gradients do not depend on the number of GPUs (see ssl_lightning.losses.wmse_loss).
    ``w_iter`` splits per step; ``eps`` shrinks the covariance towards I (official w_eps, 0).
    """

    def __init__(self, projector: str = "1024-64", w_size: int = 128, w_iter: int = 1, eps: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        dim = parse_spec(projector)[-1]
        if eps == 0 and w_size <= dim:
            raise ValueError(f"W-MSE whitens sub-batches of w_size={w_size} samples in {dim} dims: the Cholesky "
                             f"factorisation needs w_size > {dim}; raise w_size, shrink the projector output or "
                             "set eps > 0")
        if w_iter < 1:
            raise ValueError(f"w_iter must be >= 1, got {w_iter}")
        # the official head's last Linear has a bias; the whitening's centring cancels it exactly (zero gradient)
        self.projector = mlp(projector, self.feature_dim)

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        check_views(views, 2, "W-MSE")
        features = [self.backbone(v) for v in views]
        zs = self.projector(torch.cat(features)).chunk(len(views))
        loss = wmse_loss(zs, w_size=self.hparams.w_size, w_iter=self.hparams.w_iter, eps=self.hparams.eps,
                         seed=self.global_step)
        return SSLOutput(loss=loss, features=features[0])
