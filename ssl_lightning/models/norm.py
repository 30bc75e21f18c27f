"""BatchNorm whose training statistics are those of the GLOBAL batch, on any backend.

torch.nn.SyncBatchNorm refuses CPU tensors, so gloo runs (and our CPU tests) could not verify
global-BN methods. GlobalBatchNorm gathers each rank's per-channel (count, mean, centred sum of
squares) with gradient in ONE collective (SyncBatchNorm's pattern: one all_gather forward, one
all_reduce backward) and combines them exactly (Chan et al.'s parallel variance: no cancellation,
in fp32). Outside DDP it is plain BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_lightning.distributed import gather_with_grad, is_distributed


class GlobalBatchNorm(_BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d; state dict keys are identical."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            channels = xf.shape[1]
            local_mean = xf.mean(dims)
            local_m2 = (xf - local_mean.view(shape)).pow(2).sum(dims)
            count = xf.new_full((1,), xf.numel() / channels)  # a fill, not a host-to-device copy
            stats = gather_with_grad(torch.cat([count, local_mean, local_m2])[None])  # (W, 1 + 2C)
            counts, means, m2s = stats[:, :1].detach(), stats[:, 1:1 + channels], stats[:, 1 + channels:]
            n = counts.sum()
            mean = (counts * means).sum(0) / n
            var = (m2s + counts * (means - mean).pow(2)).sum(0) / n  # biased, over the global batch
            y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
            if self.affine:
                y = y * self.weight.view(shape) + self.bias.view(shape)
        self._update_running_stats(mean.detach(), var.detach(), n)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``module`` by GlobalBatchNorm, in place."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for name, param in new.named_parameters(recurse=False):  # a frozen EMA teacher stays frozen
            param.requires_grad_(getattr(module, name).requires_grad)
        return new.to(next(iter(module.state_dict().values()), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_bn(child))
    return module
