"""Optimizer and per-iteration schedule, shared by every method.

Learning rates are BASE rates per 256 samples: the peak lr is ``lr * global_batch / 256`` when
``scale_lr`` is true (the linear scaling rule of the VICReg/Barlow/SimCLR papers). Parameters
with ndim <= 1 (biases, norm weights) get no weight decay and, under LARS, no trust-ratio
adaptation (timm's Lars adapts only groups with weight_decay != 0). The online probe has its own
group: its own lr, no weight decay, no LARS adaptation.

``FiniteStep`` applies an optimizer step only when its gradients are finite, decided on the device
(no host-device synchronisation): the ``on_nonfinite`` guard of every method.
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
    # capturable on CUDA: AdamW's step counts live on the device, so FiniteStep can undo a skipped step's
    # count there (otherwise they are host tensors that it could only fix after reading the flag)
    on_cuda = groups[0]["params"][0].is_cuda
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=cfg.betas, capturable=on_cuda)


def _flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of t's elements in memory order (contiguous or channels-last), or None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: permuted channels-last is contiguous
    return None


class FiniteStep:
    """One optimizer step that takes effect only where ``finite`` (a 0-dim bool tensor on the device) is
    True: the parameters with a gradient and their optimizer state are copied before the step and
    selected back with ``torch.where`` after it, so no value of a skipped step (NaN included) reaches
    them, and the host never waits for the flag. State the step creates (momentum buffers, AdamW's
    moments and count at the first step) is zeroed where skipped: for SGD, LARS and AdamW that is the
    same as never having been created. Tensors are flattened per dtype and device into one buffer, so
    the copies cost a few kernels, not one per parameter.

    Usage: ``guard = FiniteStep(optimizer, finite)`` after the backward pass, ``optimizer.step()``,
    ``guard.apply()``."""

    @torch.no_grad()
    def __init__(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor):
        self.optimizer, self.finite = optimizer, finite
        self.entries = self._entries()  # [(param, state key or None, tensor)]
        self.groups: dict[tuple, list[int]] = {}
        self.loose: dict[int, torch.Tensor] = {}  # non-flattenable tensors: their own copy
        for i, (_, _, t) in enumerate(self.entries):
            if _flat_view(t) is None:
                self.loose[i] = t.clone()
            else:
                self.groups.setdefault((t.device, t.dtype), []).append(i)
        self.saved = {key: torch.cat([_flat_view(self.entries[i][2]) for i in idx])
                      for key, idx in self.groups.items()}

    def _entries(self) -> list[tuple[torch.Tensor, str | None, torch.Tensor]]:
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # the optimizer skips it: nothing to protect
                out.append((p, None, p))
                out += [(p, k, v) for k, v in self.optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)]
        return out

    @torch.no_grad()
    def apply(self) -> None:
        """After optimizer.step(): keep its result where finite, the copies elsewhere."""
        finite = self.finite
        for key, idx in self.groups.items():
            tensors = [self.entries[i][2] for i in idx]
            views = [_flat_view(t) for t in tensors]
            chosen = torch.where(finite.to(key[0]), torch.cat(views), self.saved[key])
            torch._foreach_copy_(views, list(chosen.split([v.numel() for v in views])))
        for i, old in self.loose.items():
            t = self.entries[i][2]
            t.copy_(torch.where(finite.to(t.device), t, old))
        known = {id(t) for _, _, t in self.entries}
        for p, k, t in self._entries():  # state created (or replaced) by this step
            if k is not None and id(t) not in known:
                t.copy_(torch.where(finite.to(t.device), t, torch.zeros((), dtype=t.dtype, device=t.device)))


@torch.no_grad()
def gradients_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """0-dim bool tensor on the device: every gradient the optimizer is about to use is finite (None when
    there is none). Under DDP the gradients are already averaged, so every rank gets the same answer."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)  # NaN and inf propagate into the norms
    return torch.stack([n.to(torch.float32) for n in norms]).sum().isfinite()


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
