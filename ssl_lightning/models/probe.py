"""Online linear probe on detached features: the running estimate of representation quality."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        return self.linear(self.norm(features.detach().float()))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits of labelled samples, their labels); loss is 0 (with grad) when none are labelled."""
        keep = labels >= 0
        logits = self(features[keep])
        if not keep.any():
            return logits.sum() * 0.0, logits, labels[keep]
        return F.cross_entropy(logits.float(), labels[keep]), logits, labels[keep]

