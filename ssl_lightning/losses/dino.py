"""DINO (Caron et al., ICCV 2021), as in facebookresearch/dino main_dino.py (DINOLoss)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.distributed import all_reduce_no_grad, world_size
from ssl_lightning.losses.common import fp32


def dino_loss(student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], center: torch.Tensor, *,
              teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher and the student, over crop pairs.

    student_out: one (b, D) head output per crop (global crops first); teacher_out: (b, D) head outputs
    of the first ``len(teacher_out)`` (global) crops; center: (1, D). With
    t_g = softmax((teacher_g - center) / teacher_temp) (no gradient) the loss is the mean over pairs
    (g, v != g) of mean_b sum_d -t_g log softmax(student_v / student_temp).
    All terms are LOCAL per-sample cross-entropies (DDP's gradient average makes them global); the
    one GLOBAL statistic is the center (see dino_center_update). fp32 even under autocast.
    """
    if len(student_out) < 2 or not 1 <= len(teacher_out) <= len(student_out):
        raise ValueError(f"dino_loss needs >= 2 student crops and 1..{len(student_out)} teacher crops, "
                         f"got {len(student_out)} and {len(teacher_out)}")
    with fp32(center, *student_out, *teacher_out) as tensors:
        center, student, teacher = tensors[0], tensors[1:len(student_out) + 1], tensors[len(student_out) + 1:]
        targets = [F.softmax((t.detach() - center) / teacher_temp, dim=1) for t in teacher]
        log_p = [F.log_softmax(s / student_temp, dim=1) for s in student]
        terms = [-(t * log_p[v]).sum(dim=1).mean()
                 for g, t in enumerate(targets) for v in range(len(student)) if v != g]
        return sum(terms) / len(terms)


@torch.no_grad()
def dino_center_update(center: torch.Tensor, teacher_out: torch.Tensor, *, momentum: float = 0.9) -> torch.Tensor:
    """The next center: momentum * center + (1 - momentum) * mean of the GLOBAL teacher outputs.

    teacher_out: (n, D), every teacher output of this rank (all global crops). The mean is over all
    ranks (sum all-reduced, divided by n * world_size), in fp32. Returns a new (1, D) tensor.
    """
    with fp32(center, teacher_out) as (center, teacher_out):
        batch_center = all_reduce_no_grad(teacher_out.sum(dim=0, keepdim=True)) / (len(teacher_out) * world_size())
        return center * momentum + batch_center * (1 - momentum)


def teacher_temp_at(epoch: int, *, warmup_temp: float, final_temp: float, warmup_epochs: int) -> float:
    """Teacher temperature of ``epoch``: the official per-epoch schedule
    ``concat(linspace(warmup_temp, final_temp, warmup_epochs), final_temp...)``."""
    if epoch >= warmup_epochs:
        return final_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)
