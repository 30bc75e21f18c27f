"""A progress bar that reads the training loss only when it refreshes, at the log interval."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class LogIntervalProgressBar(TQDMProgressBar):
    """Lightning's bar, refreshed every ``refresh_rate`` steps (the CLI's methods use the log interval),
    showing ``train/loss`` from the callback metrics.

    Lightning turns every value logged with ``prog_bar=True`` into a Python number after every step
    (``.item()``: on a GPU the host waits for the device), whether the bar refreshes or not. The
    methods log the loss without ``prog_bar``; this bar reads it at its own refresh instead.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = f"{float(loss):.3g}"
        return metrics
