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
        """(mean cross-entropy over the labelled samples, their logits, their labels).

        Every sample goes through the probe and unlabelled ones get weight 0, so there is no
        data-dependent branch: under DDP every rank runs the same ops (GlobalBatchNorm and DDP's
        gradient hooks need that), and a batch with 0 or 1 labelled samples is no special case.
        """
        logits = self(features)
        labelled = labels >= 0
        per_sample = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
        loss = (per_sample * labelled).sum() / labelled.sum().clamp(min=1)
        return loss, logits[labelled], labels[labelled]
