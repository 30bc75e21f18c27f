"""Weights & Biases run identity: offline by default, the same run continued after a resume.

The run id lives in ``<run_dir>/wandb_run_id`` next to the checkpoints, so a resumed or requeued
job (``--ckpt_path last``) logs into the run it started rather than a new one.
"""
from __future__ import annotations

import os
import secrets
import sys
import warnings
from pathlib import Path

from pytorch_lightning import loggers as pl_loggers

RUN_ID_FILE = "wandb_run_id"
# How a config may name the W&B logger (LightningCLI accepts the class name or either package path).
WANDB_LOGGER_CLASSES = {
    "WandbLogger",
    "pytorch_lightning.loggers.WandbLogger",
    "pytorch_lightning.loggers.wandb.WandbLogger",
    "lightning.pytorch.loggers.WandbLogger",
    "lightning.pytorch.loggers.wandb.WandbLogger",
    "ssl_lightning.wandb_run.WandbLogger",
}


class WandbLogger(pl_loggers.WandbLogger):
    """Lightning's W&B logger that never stops training:

    - when W&B stops accepting data (its service process died, its directory became read-only or full),
      training goes on with one warning, and the rows that could not be logged are counted and
      reported when the fit ends (``lost_report``);
    - without the ``anonymous`` setting, which Lightning always passes and W&B >= 0.2x answers with a
      deprecation warning on every run, whatever its value.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        self.broken: str | None = None  # why W&B stopped accepting data, once it has
        self.lost_rows, self.lost_keys, self.lost_from_step = 0, set(), None
        self.service_dead = False

    def _guarded(self, log, keys, step) -> None:
        if self.broken is None:
            try:
                log()
                return
            except OSError as err:  # ConnectionResetError from a dead service, PermissionError, ENOSPC
                self._stop_logging(err, step)
        self.lost_rows += 1
        self.lost_keys.update(keys)

    def _stop_logging(self, err: BaseException, step) -> None:
        self.broken, self.lost_from_step = f"{type(err).__name__}: {err}", step
        warnings.warn(f"W&B stopped accepting data at step {step} ({self.broken}); training continues without "
                      "logging, and what could not be logged is reported at the end. The checkpoints are not "
                      "affected.", RuntimeWarning, stacklevel=3)
        if isinstance(err, ConnectionError):  # the service is gone; a refused write leaves it usable
            self.service_dead = True
            _detach_dead_service()

    def log_metrics(self, metrics, step=None) -> None:
        self._guarded(lambda: super(WandbLogger, self).log_metrics(metrics, step), metrics.keys(), step)

    def log_hyperparams(self, params) -> None:
        self._guarded(lambda: super(WandbLogger, self).log_hyperparams(params), ["config"], None)

    def finish(self) -> None:
        """Close the run (flush its files), unless its service died."""
        if self._experiment is not None and not self.service_dead:
            try:
                self._experiment.finish()
            except OSError as err:
                if self.broken is None:
                    self._stop_logging(err, "the end of the fit")

    def lost_report(self) -> str | None:
        """One line on what could not be logged, or None when everything was."""
        if self.broken is None:
            return None
        return (f"W&B: {self.lost_rows} logging call(s) from step {self.lost_from_step} on were not logged "
                f"({self.broken}); keys: {', '.join(sorted(self.lost_keys)) or 'none'}")


def _detach_dead_service() -> None:
    """Forget the W&B service connection, so that exiting does not try to talk to a dead process again."""
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - it is dead already; nothing else to do
        pass


def default_logger_config(project: str = "ssl-lightning") -> dict:
    """The default Trainer logger: W&B, offline unless WANDB_MODE=online; never a default entity."""
    return {"class_path": "ssl_lightning.wandb_run.WandbLogger",
            "init_args": {"project": project, "offline": os.environ.get("WANDB_MODE", "offline") != "online",
                          "log_model": False}}


def run_id(run_dir: str | os.PathLike, *, resume: bool, is_rank_zero: bool) -> str:
    """The W&B run id for this fit: the stored one when resuming, else a fresh one (stored by rank 0)."""
    path = Path(run_dir) / RUN_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    new_id = secrets.token_hex(4)
    if is_rank_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new_id + "\n")
    return new_id


def finish_wandb_run(logger) -> None:
    """Flush and close the W&B run a subcommand used, so its files are complete when it returns; print
    what could not be logged if W&B failed during the run."""
    if isinstance(logger, WandbLogger):
        logger.finish()
        report = logger.lost_report()
        if report:
            print(report, flush=True)
    elif isinstance(logger, pl_loggers.WandbLogger) and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish()


def finish_active_wandb_run(exit_code: int) -> None:
    """Close the W&B run of a command that is failing now, so that W&B's closing lines come before the
    command's error line instead of after it (at interpreter exit)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def define_dashboard(logger) -> None:
    """Step axis and summaries: every metric against trainer/global_step; best (max) accuracies,
    last values for the rest (RankMe, losses)."""
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    run = logger.experiment
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    for name in ("probe/val_top1", "probe/val_top5", "knn/top1"):
        run.define_metric(name, step_metric="trainer/global_step", summary="max,last")
