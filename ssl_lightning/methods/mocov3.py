"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie, He, ICCV 2021)."""
from __future__ import annotations

import torch

from ssl_lightning.losses.moco import mocov3_loss
from ssl_lightning.methods.base import SSLOutput
from ssl_lightning.methods.momentum import MomentumMethod
from ssl_lightning.models.heads import mlp, parse_spec


class MoCoV3(MomentumMethod):
    """Base encoder = backbone -> projector -> predictor; momentum encoder = EMA of backbone + projector.

    loss = ctr(q1, k2) + ctr(q2, k1) (ssl_lightning.losses.mocov3_loss), the keys of the whole
    global batch as negatives. Heads as in the official code: hidden Linear layers without bias
    followed by BN and ReLU; the projector ends in an affine-free BN; the predictor does not for
    ResNets (predictor_last_norm: false) and does for ViTs (true, with a 3-layer projector
    "4096-4096-256" and temperature 0.2). Momentum: cosine 0.99 -> 1 over the run's steps.
    """

    def __init__(
        self,
        projector: str = "4096-256",
        predictor: str = "4096-256",
        predictor_last_norm: bool = False,
        temperature: float = 1.0,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        **kwargs,
    ):
        super().__init__(base_momentum=base_momentum, final_momentum=final_momentum, **kwargs)
        self.projector = mlp(projector, self.feature_dim, last_norm=True)
        self.predictor = mlp(predictor, parse_spec(projector)[-1], last_norm=predictor_last_norm)
        # The momentum encoder. The EMA update runs right after each optimizer step; the official code
        # runs it at the start of the next step, before computing keys: the same updates, since its very
        # first one acts on identical weights and changes nothing (each of ours takes the momentum of the
        # step just finished, one step earlier on the cosine than the official code's).
        self.add_teachers("backbone", "projector")

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher["projector"](self.teacher["backbone"](x))

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        if len(views) != 2:
            raise ValueError(f"MoCo v3 takes exactly 2 views, got {len(views)}; configure data.views with 2 entries")
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        q1, q2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        k1, k2 = self.encode_keys(views[0]), self.encode_keys(views[1])
        t = self.hparams.temperature
        loss = mocov3_loss(q1, k2, temperature=t) + mocov3_loss(q2, k1, temperature=t)
        return SSLOutput(loss=loss, features=f1)
