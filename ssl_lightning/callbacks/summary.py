"""At the end of a fit: what was learned and where everything is, printed and written to
``<run dir>/summary.json`` (read by ``ssl-lightning results``; no W&B needed).

summary.json: status (running while the fit runs, then finished / preempted / collapsed / failed),
method, step, epoch, wall_seconds (summed over requeued parts), seed, the final value of every
metric in ``final`` (online probe, kNN, RankMe, losses), the best online probe in ``best``, the last
checkpoint, and the error of a failed fit.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from ssl_lightning.callbacks.preemption import PreemptionHandler

SUMMARY_FILE = "summary.json"
# the final values worth a results table; anything else logged stays in W&B
SUMMARY_METRICS = ("probe/val_top1", "probe/val_top5", "knn/top1", "rank/backbone_rankme", "rank/projector_rankme",
                   "rank/backbone_effective_rank", "rank/projector_effective_rank", "collapse/alarm", "train/loss")


def write_json(path: Path, data: dict) -> None:
    """Write via a sibling temp file and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | list | None:
    """What write_json wrote to ``path``; None when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_summary(run_dir: str | Path) -> dict | None:
    return read_json(Path(run_dir) / SUMMARY_FILE)


class FitSummary(pl.Callback):
    """Final and best online-probe accuracy, the last checkpoint, the W&B run directory, and summary.json."""

    def __init__(self, metric: str = "probe/val_top1"):
        self.metric = metric
        self.best: float | None = None
        self.seconds_before = 0.0  # wall time of earlier parts of a requeued fit (from the checkpoint)
        self._start = time.time()
        self._preempted = False

    def state_dict(self) -> dict:
        return {"best": self.best, "seconds": self.seconds_before + time.time() - self._start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.seconds_before = state_dict.get("best"), state_dict.get("seconds", 0.0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._preempted = time.time(), False
        self._write(trainer, pl_module, "running")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and not trainer.sanity_checking:
            self.best = max(float(value), self.best or 0.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if preempted(trainer) and not self._preempted:  # before the requeue: SLURM may kill this step any time
            self._preempted = True
            self._write(trainer, pl_module, "preempted")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if preempted(trainer):  # the requeue's SIGTERM: the restarted job continues the fit
            self._write(trainer, pl_module, "preempted")
        else:
            self._write(trainer, pl_module, "failed", error=f"{type(exception).__name__}: {exception}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, fit_status(trainer))
        self._print(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str, error: str | None = None) -> None:
        metrics = trainer.callback_metrics
        summary = {
            "status": status, "method": type(pl_module).__name__, "step": trainer.global_step,
            "epoch": trainer.current_epoch, "wall_seconds": round(self.seconds_before + time.time() - self._start, 1),
            "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
            "final": {k: float(metrics[k]) for k in SUMMARY_METRICS if k in metrics},
            "best": {self.metric: self.best} if self.best is not None else {},
            "checkpoint": next((cb.last_model_path for cb in trainer.checkpoint_callbacks
                                if getattr(cb, "last_model_path", "")), None),
        }
        if error:
            summary["error"] = error
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / SUMMARY_FILE, summary)

    @rank_zero_only
    def _print(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        lines.append(f"  summary: {Path(trainer.default_root_dir) / SUMMARY_FILE}")
        print("\n".join(lines), flush=True)


def preempted(trainer: pl.Trainer) -> bool:
    """The warning signal arrived: PreemptionHandler saves, requeues and stops the fit."""
    return any(cb.received for cb in trainer.callbacks if isinstance(cb, PreemptionHandler))


def fit_status(trainer: pl.Trainer) -> str:
    """preempted (the warning signal stopped it; a requeue continues it), collapsed (the spectrum
    monitor's collapse alarm is up at the end), else finished."""
    if preempted(trainer):
        return "preempted"
    if float(trainer.callback_metrics.get("collapse/alarm", 0.0)) > 0:
        return "collapsed"
    return "finished"
