"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.byol import byol_loss
from ssl_lightning.methods.base import SSLOutput
from ssl_lightning.methods.momentum import MomentumMethod
from ssl_lightning.methods.multicrop import check_views, forward_views
from ssl_lightning.models.heads import mlp, parse_spec


class BYOL(MomentumMethod):
    """Online: backbone -> projector -> predictor. Target: EMA copies of backbone and projector
    (momentum base_momentum -> 1, cosine per global step, updated after each optimizer step).

    Every view goes through the networks on its own, as in the official code. The target sees the
    2 global views, the online network all of them; loss = byol_loss (sum over the 2 target views
    of the mean over the other online views of 2 - 2 cos). Global BN (sync_bn) in both networks.
    """

    def __init__(self, projector: str = "4096-256", predictor: str = "4096-256", **kwargs):
        super().__init__(**kwargs)
        out_dim = parse_spec(projector)[-1]
        if parse_spec(predictor)[-1] != out_dim:
            raise ValueError(f"predictor {predictor!r} must end in the projector's output width {out_dim}, "
                             f"e.g. '4096-{out_dim}'")
        self.projector = mlp(projector, self.feature_dim, last_bias=True)
        self.predictor = mlp(predictor, out_dim, last_bias=True)
        self.add_teachers("backbone", "projector")

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        check_views(views, 2, "BYOL")
        features = forward_views(self.backbone, views, by_resolution=False)
        predictions = [self.predictor(self.projector(f)) for f in features]
        with torch.no_grad():
            teacher_features = [self.teacher["backbone"](v) for v in views[:2]]
            targets = [self.teacher["projector"](f) for f in teacher_features]
        loss = byol_loss(predictions, targets)
        evaluated = teacher_features[0] if self.hparams.evaluate_teacher else features[0]
        return SSLOutput(loss=loss, features=evaluated, logs={"byol": loss.detach()})
