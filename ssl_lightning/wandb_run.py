"""Weights & Biases run identity: offline by default, the same run continued after a resume.

The run id lives in ``<run_dir>/wandb_run_id`` next to the checkpoints, so a resumed or requeued
job (``--ckpt_path last``) logs into the run it started rather than a new one.
"""
from __future__ import annotations

import os
import secrets
import sys
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
    """Lightning's W&B logger without the ``anonymous`` setting, which Lightning always passes and
    W&B >= 0.2x answers with a deprecation warning on every run, whatever its value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)


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
    """Flush and close the W&B run a subcommand used, so its files are complete when it returns."""
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:  # started
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
