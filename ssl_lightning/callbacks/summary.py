"""Prints, at the end of a fit, what was learned and where everything is."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only


class FitSummary(pl.Callback):
    """Final and best online-probe accuracy, the last checkpoint, and the W&B run directory."""

    def __init__(self, metric: str = "probe/val_top1"):
        self.metric = metric
        self.best: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and not trainer.sanity_checking:
            self.best = max(float(value), self.best or 0.0)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lines = [f"ssl-lightning: {type(pl_module).__name__} finished at epoch {trainer.current_epoch}, "
                 f"step {trainer.global_step}, {trainer.world_size} process(es)"]
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            lines.append(f"  {self.metric}: {float(value):.4f} (best {self.best or float(value):.4f})")
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "last_model_path", ""):
                lines.append(f"  last checkpoint: {cb.last_model_path}  (resume: --ckpt_path last)")
        run = getattr(trainer.logger, "experiment", None)
        if run is not None and hasattr(run, "dir") and getattr(run, "id", None):
            lines.append(f"  W&B run {run.id}: {run.dir.removesuffix('/files')}  (upload: wandb sync <that dir>)")
        print("\n".join(lines), flush=True)
