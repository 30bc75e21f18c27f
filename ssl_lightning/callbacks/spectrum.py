"""Eigenspectrum, effective rank and a collapse alarm: dimensional collapse, visible while it happens."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from ssl_lightning.callbacks.embeddings import collect_embeddings, due
from ssl_lightning.metrics import collapse_stats, eigenspectrum


class SpectrumMonitor(pl.Callback):
    """At the end of every ``every_n_epochs``-th training epoch, on ``num_samples`` fixed, un-augmented
    training images (gathered across ranks):

    - ``spectrum/<features>_*``: descending covariance eigenvalues; a log-scale plot and a table of the
      raw values go to W&B, and every logger gets ``<default_root_dir>/spectra/epoch_<E>.pt``;
    - ``rank/<features>_rankme``, ``rank/<features>_effective_rank``, ``rank/<features>_min_std``;
    - a collapse alarm: RankMe below ``min_rankme`` or a per-dimension std (of l2-normalised
      embeddings, 1/sqrt(D) when healthy) below ``min_std`` logs ``collapse/alarm`` = 1 and a warning,
      and stops the run when ``stop_on_collapse``.
    ``features``: "backbone" and/or "projector".
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 2048,
                 features: tuple[str, ...] = ("backbone", "projector"), min_rankme: float | None = None,
                 min_std: float | None = None, stop_on_collapse: bool = False):
        self.every_n_epochs, self.num_samples, self.features = every_n_epochs, num_samples, tuple(features)
        self.min_rankme, self.min_std, self.stop_on_collapse = min_rankme, min_std, stop_on_collapse
        self._loader = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if due(trainer, self.every_n_epochs):
            self.measure(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:  # `ssl-lightning validate`
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if self._loader is None:
            self._loader = trainer.datamodule.eval_loader("train", self.num_samples, labelled=False)
        embeddings, _ = collect_embeddings(pl_module, self._loader)
        values, spectra = {}, {}
        for name in self.features:
            if name not in embeddings:
                continue
            z = embeddings[name]
            spectra[name] = eigenspectrum(z).cpu()
            stats = collapse_stats(z)
            values.update({f"rank/{name}_{k}": v for k, v in stats.items()})
            values[f"spectrum/{name}_top_eigenvalue"] = float(spectra[name][0])
            values[f"spectrum/{name}_near_zero"] = float((spectra[name] < 1e-6 * spectra[name][0]).sum())
        alarms = self._alarms(values)
        values["collapse/alarm"] = float(bool(alarms))
        pl_module.log_dict({k: float(v) for k, v in values.items()}, rank_zero_only=True)  # same on every rank
        if trainer.is_global_zero:
            self._publish(trainer, spectra)
        if alarms:
            message = f"collapse alarm at epoch {trainer.current_epoch}: " + "; ".join(alarms)
            rank_zero_warn(message)
            if self.stop_on_collapse:
                trainer.should_stop = True
                rank_zero_warn(f"stopping: {message} (SpectrumMonitor.stop_on_collapse is true)")
        return values

    def _alarms(self, values: dict[str, float]) -> list[str]:
        alarms = []
        for name in self.features:
            rankme, min_std = values.get(f"rank/{name}_rankme"), values.get(f"rank/{name}_min_std")
            if self.min_rankme is not None and rankme is not None and rankme < self.min_rankme:
                alarms.append(f"{name} RankMe {rankme:.2f} < min_rankme {self.min_rankme}")
            if self.min_std is not None and min_std is not None and min_std < self.min_std:
                alarms.append(f"{name} min per-dim std {min_std:.2e} < min_std {self.min_std}")
        return alarms

    def _publish(self, trainer: pl.Trainer, spectra: dict[str, torch.Tensor]) -> None:
        out = Path(trainer.default_root_dir) / "spectra"
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": trainer.current_epoch, "step": trainer.global_step, **spectra},
                   out / f"epoch_{trainer.current_epoch:04d}.pt")
        if isinstance(trainer.logger, WandbLogger) and spectra:
            rows = [[trainer.current_epoch, name, i, float(v)] for name, s in spectra.items() for i, v in enumerate(s)]
            trainer.logger.log_table("spectrum/values", columns=["epoch", "features", "index", "eigenvalue"],
                                     data=rows, step=trainer.global_step)
            figure = spectrum_figure(spectra, trainer.current_epoch)
            trainer.logger.log_image("spectrum/plot", images=[figure], step=trainer.global_step)
            figure.clf()


def spectrum_figure(spectra: dict[str, torch.Tensor], epoch: int):
    """Log-scale eigenvalue plot, one line per feature set (normalised by the top eigenvalue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, s in spectra.items():
        ax.semilogy((s / s[0].clamp(min=1e-30)).clamp(min=1e-12).numpy(), label=name)
    ax.set(xlabel="eigenvalue index", ylabel="eigenvalue / largest", title=f"embedding spectrum, epoch {epoch}")
    ax.legend()
    fig.tight_layout()
    return fig
