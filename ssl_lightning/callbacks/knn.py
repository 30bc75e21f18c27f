"""Weighted kNN accuracy of frozen features during training (cosine, k=20, votes exp(sim/0.07))."""
from __future__ import annotations

import pytorch_lightning as pl

from ssl_lightning.callbacks.embeddings import collect_embeddings, due
from ssl_lightning.metrics import knn_accuracy


class KNNMonitor(pl.Callback):
    """After validation every ``every_n_epochs`` epochs: a bank of ``bank_size`` fixed, un-augmented
    training images and ``num_queries`` validation images (None = all), both gathered across ranks,
    give ``knn/top1`` for each k in ``ks`` (``knn/top1_k<k>`` beyond the first). Needs labels."""

    def __init__(self, every_n_epochs: int = 1, ks: tuple[int, ...] = (20,), temperature: float = 0.07,
                 bank_size: int | None = 4096, num_queries: int | None = 2048, features: str = "backbone"):
        self.every_n_epochs, self.ks, self.temperature = every_n_epochs, tuple(ks), temperature
        self.bank_size, self.num_queries, self.features = bank_size, num_queries, features
        self._loaders = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not due(trainer, self.every_n_epochs) or trainer.sanity_checking:
            return
        if getattr(pl_module, "probe", None) is None:
            return  # unlabelled data: nothing to vote with
        self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._loaders is None:
            dm = trainer.datamodule
            self._loaders = (dm.eval_loader("train", self.bank_size), dm.eval_loader("val", self.num_queries))
        bank, bank_labels = collect_embeddings(pl_module, self._loaders[0])
        queries, query_labels = collect_embeddings(pl_module, self._loaders[1])
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
        values = {}
        for i, k in enumerate(self.ks):
            acc = knn_accuracy(queries[self.features], query_labels, bank[self.features], bank_labels,
                               num_classes=num_classes, k=k, temperature=self.temperature)
            values["knn/top1" if i == 0 else f"knn/top1_k{k}"] = acc
        pl_module.log_dict({k: float(v) for k, v in values.items()}, rank_zero_only=True)  # same on every rank
        return values
