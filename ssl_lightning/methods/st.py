"""Spectral transformation (ST) with g(lambda) = lambda^-power (Weng et al., "Modulate your spectrum
in self-supervised learning", ICLR 2024): INTL's pipeline with the exact spectral transform."""
from __future__ import annotations

import torch

from ssl_lightning.losses.intl import st_loss
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.methods.multicrop import check_views, forward_views
from ssl_lightning.models.heads import mlp


class SpectralTransform(SSLMethod):
    """Views -> backbone -> projector (one pass per view) -> ST of the GLOBAL batch -> mean over
    i >= 1 of 2 - 2 mean cos(ST(z_i), ST(z_0)).

    power p: output spectrum lambda^(1 - 2p) (0.5 whitens); axis 0 transforms the B x B sample
    covariance (works for D > B, like INTL), axis 1 the D x D feature covariance (needs B > D);
    eps: ridge relative to the mean eigenvalue. fp64 eigendecomposition with a backward that is
    finite for repeated eigenvalues (ssl_lightning.spectral.spectral_transform).
    """

    def __init__(self, projector: str = "2048-2048-2048", power: float = 0.5, eps: float = 1e-4, axis: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        if axis not in (0, 1) or eps < 0:
            raise ValueError(f"ST needs axis 0 (B x B) or 1 (D x D) (got {axis}) and eps >= 0 (got {eps})")
        self.projector = mlp(projector, self.feature_dim, last_bias=True)

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        check_views(views, 2, "ST")
        features = forward_views(self.backbone, views, by_resolution=False)
        zs = [self.projector(f) for f in features]
        loss = st_loss(zs, power=self.hparams.power, eps=self.hparams.eps, axis=self.hparams.axis)
        return SSLOutput(loss=loss, features=features[0])
