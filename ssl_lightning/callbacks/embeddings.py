"""Embeddings of a fixed evaluation subset, gathered from every rank: what the monitors measure."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ssl_lightning.distributed import gather_no_grad


def due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Monitoring runs on epochs E with (E + 1) % every_n_epochs == 0; 0 turns it off."""
    return every_n_epochs > 0 and not trainer.sanity_checking and (trainer.current_epoch + 1) % every_n_epochs == 0


@torch.no_grad()
def collect_embeddings(pl_module: pl.LightningModule, loader: DataLoader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({"backbone": (N, D), "projector": (N, P)}, labels (N,)) over the loader, all ranks concatenated.

    The model runs in eval mode (BN running statistics), so each sample's embedding does not depend
    on how the subset is sharded: 1 and W ranks see the same set. Embeddings are returned in fp32.
    """
    was_training = pl_module.training
    pl_module.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    precision = pl_module.trainer.precision_plugin
    for images, y in loader:
        with precision.forward_context():  # the run's autocast (bf16 on the demo): half the monitor cost
            embedded = pl_module.embeddings(images.to(pl_module.device))
        for name, z in embedded.items():
            parts.setdefault(name, []).append(z)
        labels.append(y.to(pl_module.device))
    pl_module.train(was_training)
    gathered = {name: gather_no_grad(torch.cat(zs)) for name, zs in parts.items()}
    return gathered, gather_no_grad(torch.cat(labels))
