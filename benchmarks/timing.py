"""Timing helpers shared by the benchmark scripts."""
from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


def clock() -> float:
    """time.perf_counter() after the queued CUDA work has finished (plain perf_counter without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(pl.Callback):
    """Wall time from the end of optimizer step ``skip`` to the end of the last step (start-up,
    compilation and warm-up excluded). On CUDA the clock is read after a synchronize."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end, self.steps = skip, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.skip:
            self.start = clock()
        elif trainer.global_step > self.skip:
            self.end, self.steps = clock(), trainer.global_step - self.skip

    def steps_per_second(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"fewer than {self.skip + 1} steps ran; raise --steps")
        return self.steps / (self.end - self.start)
