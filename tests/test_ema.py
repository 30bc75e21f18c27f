"""The shared EMA-teacher machinery: the momentum schedule, the update rule, frozen teachers."""
import math

import pytest
import torch
from torch import nn

from ssl_lightning.models.ema import ema_update, make_teacher, momentum_at
from ssl_lightning.models.norm import GlobalBatchNorm, convert_to_global_bn


def test_momentum_schedule_is_byols_cosine():
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (BYOL eq. in sec. 3.2), K = 100."""
    for k in (0, 1, 25, 50, 99, 100):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * k / 100) + 1) / 2
        assert momentum_at(k, 100, 0.996) == pytest.approx(expected, rel=1e-12)
    assert momentum_at(0, 100, 0.99) == 0.99 and momentum_at(100, 100, 0.99) == 1.0
    assert momentum_at(250, 100, 0.99) == 1.0, "past the end it stays at the final value"
    assert momentum_at(37, 100, 0.999, 0.999) == 0.999, "base == final is a constant (MoCo v2)"


def test_ema_update_follows_the_formula_and_leaves_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(5.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    assert torch.equal(teacher[1].running_mean, torch.zeros(3)), "running stats come from the teacher's own forward"


def test_global_bn_conversion_keeps_a_frozen_teacher_frozen():
    """A teacher whose BN parameters required grad after conversion would make DDP wait for
    gradients that never come (and skip the reduction of everything else)."""
    teacher = make_teacher(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    convert_to_global_bn(teacher)
    assert isinstance(teacher[1], GlobalBatchNorm)
    assert not any(p.requires_grad for p in teacher.parameters())
    student = convert_to_global_bn(nn.Sequential(nn.BatchNorm1d(3)))
    assert all(p.requires_grad for p in student.parameters())
