"""SimCLR: a Simple framework for Contrastive Learning of visual Representations (Chen et al., ICML 2020)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.nt_xent import multiview_nt_xent_loss
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.methods.multicrop import check_views, forward_views
from ssl_lightning.models.heads import mlp


class SimCLR(SSLMethod):
    """V >= 2 views -> backbone -> projector -> NT-Xent (local anchors vs global keys).

    Views of the same resolution go through the backbone as one concatenated batch (as the TF code
    does), and all projections through the projector together, so BatchNorm sees every view at once.
    With more than 2 views (multi-crop), every other view of an image is a positive.
    projector_hidden_norm=False gives solo-learn's Linear-ReLU-Linear head.
    """

    def __init__(self, projector: str = "2048-128", temperature: float = 0.1,
                 projector_hidden_norm: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.projector = mlp(projector, self.feature_dim, last_bias=True, hidden_norm=projector_hidden_norm)
        self.temperature = temperature

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        check_views(views, 2, "SimCLR")
        features = forward_views(self.backbone, views, by_resolution=True)
        zs = forward_views(self.projector, features, by_resolution=True)
        loss = multiview_nt_xent_loss(zs, temperature=self.temperature)
        return SSLOutput(loss=loss, features=features[0], logs={"nt_xent": loss.detach()})
