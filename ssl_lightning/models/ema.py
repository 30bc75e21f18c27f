"""Exponential moving average (EMA) teachers: the momentum encoder of MoCo, BYOL's target, DINO's
teacher, RC-MAE's teacher. One schedule, one update rule, for every method that has a teacher.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_at(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """EMA momentum at optimizer step ``step`` of ``total_steps``: cosine from ``base`` to ``final``.

    BYOL's tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2 with final = 1; MoCo v3 and DINO use the
    same curve; base == final gives a constant (MoCo v2's 0.999). Past the end it stays at ``final``.
    """
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student``: same weights, no gradients, never seen by the optimizer."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    Buffers (BatchNorm running statistics) are not averaged: the teacher's come from its own
    forward passes, as in the official MoCo, BYOL and DINO code.
    """
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError(f"teacher has {len(t_params)} parameter tensors, student {len(s_params)}")
    torch._foreach_lerp_(t_params, [s.detach() for s in s_params], 1.0 - momentum)
