"""INTL: IterNorm with trace loss (Weng et al., "Modulate your spectrum in self-supervised learning",
ICLR 2024), and its EMA variant INTL-M for multi-crop (official winci-ai/INTL intl.py, intl_m.py)."""
from __future__ import annotations

import torch

from ssl_lightning.distributed import world_size
from ssl_lightning.losses.intl import intl_beta, intl_momentum_terms, intl_terms
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.methods.momentum import MomentumMethod
from ssl_lightning.methods.multicrop import check_views, forward_views
from ssl_lightning.models.heads import mlp


def _check_options(iters: int, axis: int) -> None:
    if iters < 1 or axis not in (0, 1):
        raise ValueError(f"INTL needs iters >= 1 (got {iters}) and axis 0 (B x B, official) or 1 (D x D) (got {axis})")


def _loss(terms: dict[str, torch.Tensor], beta: float | None, z: torch.Tensor, axis: int) -> torch.Tensor:
    if beta is None:  # the official trade-off for the GLOBAL batch (axis 0) or the embedding dim (axis 1)
        beta = intl_beta(z.shape[0] * world_size(), z.shape[1], axis)
    return terms["alignment"] + beta * terms["trace"]


class INTL(SSLMethod):
    """Views -> backbone -> projector (one pass per view, as the official code) -> IterNorm of the
    GLOBAL batch -> (2 - 2 mean cos(t_i, t_0)) + beta (TL_i + TL_0), averaged over i >= 1.

    iters: Newton iterations T; axis 0 whitens the B x B sample covariance (official default),
    axis 1 the D x D feature covariance; beta None = 0.01 (log2 B - 3) (axis 0) or 0.01 (log2 D - 3).
    """

    def __init__(self, projector: str = "2048-2048-2048", iters: int = 4, axis: int = 0,
                 beta: float | None = None, **kwargs):
        super().__init__(**kwargs)
        _check_options(iters, axis)
        self.projector = mlp(projector, self.feature_dim, last_bias=True)

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        check_views(views, 2, "INTL")
        features = forward_views(self.backbone, views, by_resolution=False)
        zs = [self.projector(f) for f in features]
        terms = intl_terms(zs, iters=self.hparams.iters, axis=self.hparams.axis)
        loss = _loss(terms, self.hparams.beta, zs[0], self.hparams.axis)
        return SSLOutput(loss=loss, features=features[0], logs=terms)


class INTLM(MomentumMethod):
    """INTL-M (official intl_m.py): the EMA teacher embeds the first view only; the student embeds
    every other view (global and local crops, one pass each) and each is pulled towards the
    teacher's: mean_i [(2 - 2 mean cos(t_i, teacher)) + beta TL(t_i)], all IterNorm-ed on the GLOBAL
    batch. Momentum: cosine from base_momentum (official 0.996 ImageNet, 0.999 CIFAR) to 1.
    The probe reads the teacher's features of view 0 with evaluate_teacher, otherwise the
    student's features of view 1 (the student never sees view 0).
    """

    def __init__(self, projector: str = "2048-2048-2048", iters: int = 4, axis: int = 0,
                 beta: float | None = None, **kwargs):
        super().__init__(**kwargs)
        _check_options(iters, axis)
        self.projector = mlp(projector, self.feature_dim, last_bias=True)
        self.add_teachers("backbone", "projector")

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        check_views(views, 1, "INTL-M")
        with torch.no_grad():
            teacher_features = self.teacher["backbone"](views[0])
            target = self.teacher["projector"](teacher_features)
        features = forward_views(self.backbone, views[1:], by_resolution=False)
        zs = [self.projector(f) for f in features]
        terms = intl_momentum_terms(zs, target, iters=self.hparams.iters, axis=self.hparams.axis)
        loss = _loss(terms, self.hparams.beta, zs[0], self.hparams.axis)
        probe_features = teacher_features if self.hparams.evaluate_teacher else features[0]
        return SSLOutput(loss=loss, features=probe_features, logs=terms)
