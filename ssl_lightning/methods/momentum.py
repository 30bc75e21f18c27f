"""SSLMethod with EMA teachers (MoCo's key encoder, BYOL's target, DINO's teacher, RC-MAE's teacher).

A subclass builds its student modules, then calls ``self.add_teachers("backbone", "projector")``;
the teachers live in ``self.teacher[name]`` (so they are in the state dict and every checkpoint) and
are updated right after each optimizer step with the momentum of ``momentum_at(step)``: a cosine
from ``base_momentum`` to ``final_momentum`` over the GLOBAL optimizer step of the whole run, so a
resumed run continues the schedule where it stopped.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.models.ema import ema_update, make_teacher, momentum_at


class MomentumMethod(SSLMethod):
    def __init__(self, base_momentum: float = 0.996, final_momentum: float = 1.0,
                 evaluate_teacher: bool = False, **kwargs):
        """evaluate_teacher: probe, monitors and offline evaluation use the teacher's backbone (DINO,
        RC-MAE) instead of the student's (MoCo, BYOL)."""
        super().__init__(**kwargs)
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum ({base_momentum}) <= final_momentum ({final_momentum}) <= 1")
        self.teacher = nn.ModuleDict()

    def add_teachers(self, *names: str) -> None:
        for name in names:
            self.teacher[name] = make_teacher(getattr(self, name))

    def evaluated_modules(self) -> tuple[nn.Module, nn.Module | None]:
        if not self.hparams.evaluate_teacher:
            return super().evaluated_modules()
        return self.teacher["backbone"], self.teacher["projector"] if "projector" in self.teacher else None

    def total_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the EMA momentum schedule needs a finite run: set trainer.max_epochs or trainer.max_steps")
        return int(total)

    def momentum_at(self, step: int) -> float:
        return momentum_at(step, self.total_steps(), self.hparams.base_momentum, self.hparams.final_momentum)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/ema_momentum", self.device_scalar("ema_momentum", self.momentum_at(self.global_step)))
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        step = self.global_step  # the step being taken; Lightning counts it once the optimizer has stepped
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self.momentum_at(step)
        for name, teacher in self.teacher.items():
            ema_update(teacher, getattr(self, name), momentum)
