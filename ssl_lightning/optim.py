"""Optimizer and per-iteration schedule, shared by every method.

Learning rates are BASE rates per 256 samples: the peak lr is ``lr * global_batch / 256`` when
``scale_lr`` is true (the linear scaling rule of the VICReg/Barlow/SimCLR papers). Parameters
with ndim <= 1 (biases, norm weights) get no weight decay and, under LARS, no trust-ratio
adaptation (timm's Lars adapts only groups with weight_decay != 0). The online probe has its own
group: its own lr, no weight decay, no LARS adaptation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.optim import Lars
from torch import nn

OPTIMIZERS = ("lars", "sgd", "adamw")


@dataclass
class OptimizerConfig:
    name: str = "lars"
    lr: float = 0.3
    scale_lr: bool = True
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lars_eta: float = 0.001
    lars_trust_clip: bool = False
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.001
    exclude_bias_and_norm: bool = True
    probe_lr: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {list(OPTIMIZERS)}")
        if self.lr <= 0 or self.probe_lr <= 0:
            raise ValueError(f"lr {self.lr} and probe_lr {self.probe_lr} must be positive")

    def peak_lr(self, global_batch: int) -> float:
        return self.lr * global_batch / 256 if self.scale_lr else self.lr


# Checkpoints keep the config in their hyperparameters; let torch.load(weights_only=True) read it.
torch.serialization.add_safe_globals([OptimizerConfig])


def param_groups(model: nn.Module, probe: nn.Module | None, cfg: OptimizerConfig,
                 global_batch: int) -> list[dict]:
    """[decayed weights, biases+norms (no wd), probe (own lr, no wd)]; empty groups are dropped."""
    probe_ids = {id(p) for p in probe.parameters()} if probe is not None else set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in probe_ids:
            continue
        (no_decay if cfg.exclude_bias_and_norm and p.ndim <= 1 else decay).append(p)
    lr = cfg.peak_lr(global_batch)
    groups = [
        {"name": "weights", "params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
        {"name": "bias_norm", "params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    if probe is not None:
        groups.append({"name": "probe", "params": list(probe.parameters()), "lr": cfg.probe_lr,
                       "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "lars":
        return Lars(groups, lr=groups[0]["lr"], momentum=cfg.momentum, trust_coeff=cfg.lars_eta,
                    trust_clip=cfg.lars_trust_clip)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=cfg.betas)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """lr multiplier at ``step``: linear 0 -> 1 over warmup_steps, then cosine 1 -> min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """The lr multiplier of one run as an object: LambdaLR checkpoints its fields, and a time budget
    (callbacks/time_budget.py) can end the schedule earlier with ``shorten_to``."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total_steps, self.min_ratio = total_steps, min_ratio
        self.warmup_steps = min(warmup_steps, total_steps)

    def shorten_to(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.warmup_steps = min(self.warmup_steps, total_steps)

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, *, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR (state = step count and the schedule's length, so it resumes exactly)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup, cfg.min_lr_ratio))
