"""Online linear probe on detached features: the running estimate of representation quality."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.losses.supervised import labelled_cross_entropy


class LinearProbe(nn.Module):
    """Linear classifier trained on ``features.detach()`` alongside the SSL objective.

    An affine-free BatchNorm first (as MAE's linear probe) makes the probe's lr independent of the
    feature scale, which drifts during pre-training; at eval time it is a fixed affine map, so the
    probe stays linear. Samples with label -1 (unlabelled, e.g. STL-10's unlabeled split) are ignored.
    """

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False)
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features.detach())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The probe's map WITHOUT the detach: what the loss landscape and its Hessian differentiate."""
        return self.linear(self.norm(features.float()))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the labelled samples, their logits, their labels).

        Every sample goes through the probe and unlabelled ones get weight 0, so there is no
        data-dependent branch: under DDP every rank runs the same ops (GlobalBatchNorm and DDP's
        gradient hooks need that), and a batch with 0 or 1 labelled samples is no special case.
        """
        logits = self(features)
        labelled = labels >= 0
        return labelled_cross_entropy(logits, labels), logits[labelled], labels[labelled]
