"""A fit sized to a time budget: the number of steps set from the speed measured in the first steps.

The same config runs 7-20x slower on one 2-core CPU than on another (bf16 emulated or not, AVX2 or
AMX), so a demo or a smoke test with a fixed number of steps takes minutes on one machine and most
of an hour on the next. With ``budget.seconds: N`` the fit times steps ``skip_steps + 1`` to
``skip_steps + calibration_steps``, then ends the run after as many steps as fit into ``margin * N``
seconds of training (the rest is left for validation, monitors and checkpoints), never after more
than the config asks for. The learning-rate schedule (``optim.WarmupCosine``) and the EMA momentum
schedules (which read ``trainer.estimated_stepping_batches``) end at that step as if the config had
said ``max_steps``. Every rank takes rank 0's number; the number is checkpointed, so a resumed run
keeps it (exact resume).
"""
from __future__ import annotations

import math
import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from ssl_lightning.optim import WarmupCosine


class TimeBudget(pl.Callback):
    def __init__(self, seconds: float = 0.0, skip_steps: int = 5, calibration_steps: int = 20, margin: float = 0.9):
        """seconds: training time to fit into (0: off, the config's length). skip_steps: first steps not
        timed (allocation, warm-up). calibration_steps: steps timed. margin: the share of the budget
        given to training steps."""
        if seconds < 0 or skip_steps < 0 or calibration_steps < 1 or not 0 < margin <= 1:
            raise ValueError(f"budget.seconds {seconds} must be >= 0 (0: off), skip_steps {skip_steps} >= 0, "
                             f"calibration_steps {calibration_steps} >= 1 and margin {margin} in (0, 1]")
        self.seconds, self.skip_steps = seconds, skip_steps
        self.calibration_steps, self.margin = calibration_steps, margin
        self.planned_steps: int | None = None  # decided once per run, then checkpointed
        self._start = self._timed_from = None
        self._first_step = 0

    def state_dict(self) -> dict:
        return {"planned_steps": self.planned_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned_steps = state_dict.get("planned_steps")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._first_step = time.monotonic(), trainer.global_step
        if self.planned_steps is not None:  # resumed: the budget was spent deciding this number before
            trainer.fit_loop.epoch_loop.max_steps = self.planned_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.seconds or self.planned_steps is not None:
            return
        done = trainer.global_step - self._first_step
        if done == self.skip_steps:
            self._timed_from = time.monotonic()
        elif done == self.skip_steps + self.calibration_steps:
            now = time.monotonic()
            step_s = (now - self._timed_from) / self.calibration_steps
            remaining = self.margin * self.seconds - (now - self._start)
            configured = int(trainer.estimated_stepping_batches)
            affordable = trainer.global_step + max(0, math.floor(remaining / step_s))
            planned = trainer.strategy.broadcast(min(configured, affordable), src=0)  # every rank stops alike
            self._apply(trainer, planned)
            rank_zero_info(
                f"ssl-lightning: time budget {self.seconds:.0f} s: {1 / step_s:.2f} steps/s over steps "
                f"{trainer.global_step - self.calibration_steps + 1}-{trainer.global_step} -> {planned} of "
                f"{configured} steps" + ("" if planned == configured else
                                         "; the learning-rate and momentum schedules end there"))

    def _apply(self, trainer: pl.Trainer, planned: int) -> None:
        self.planned_steps = planned
        trainer.fit_loop.epoch_loop.max_steps = planned
        for config in trainer.lr_scheduler_configs:
            for schedule in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(schedule, WarmupCosine):
                    schedule.shorten_to(planned)
