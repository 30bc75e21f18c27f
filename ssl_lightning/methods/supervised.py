"""The supervised baseline (Sup-ViT of Lee et al. 2024; the standard supervised ResNet)."""
from __future__ import annotations

import torch
from torch import nn

from ssl_lightning.losses.supervised import labelled_cross_entropy
from ssl_lightning.methods.base import SSLMethod, SSLOutput


class Supervised(SSLMethod):
    """views[0] -> backbone -> linear classifier -> cross-entropy on the labels (label smoothing
    optional; samples labelled -1 weigh 0). Same backbones, data module and views as every SSL method,
    so its checkpoints go through the same offline evaluation and loss landscapes; its ``pretrain``
    landscape loss is this cross-entropy. Views after the first are not used: configure one.

    The online probe (when on) still trains on the detached backbone features, so probe accuracy
    compares with the SSL methods' probes; the classifier is this method's own head.
    """

    uses_labels = True

    def __init__(self, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        num_classes = self.hparams.num_classes
        if num_classes < 1:
            raise ValueError(f"Supervised needs labelled data, but num_classes is {num_classes} (an unlabelled "
                             "dataset or data.labelled: false); use a labelled dataset or an SSL method")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing {label_smoothing} must be in [0, 1), e.g. 0.1")
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def ssl_step(self, views: list[torch.Tensor], labels: torch.Tensor) -> SSLOutput:
        features = self.backbone(views[0])
        loss = labelled_cross_entropy(self.classifier(features), labels,
                                      label_smoothing=self.hparams.label_smoothing)
        return SSLOutput(loss=loss, features=features, logs={"cross_entropy": loss.detach()})
