"""Cross-entropy over the labelled samples of a batch: the supervised baseline's loss and the online probe's."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy (in float32) of logits (b, K) against labels (b,) over the samples with a
    label >= 0; label -1 (unlabelled, e.g. STL-10's unlabeled split) weighs 0, and a batch without any
    label gives 0. Every sample goes through the same ops, so there is no data-dependent branch
    (under DDP every rank runs the same graph). A per-rank mean over the local labelled samples."""
    labelled = labels >= 0
    per_sample = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none",
                                 label_smoothing=label_smoothing)
    return (per_sample * labelled).sum() / labelled.sum().clamp(min=1)
