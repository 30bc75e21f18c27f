"""Per-sample Gaussian blur of a batch: two exact kernels (banded matrix products, depthwise convs) and
which of them runs on this machine, measured once per shape and kept in checkpoints.

Both follow ``v2.functional.gaussian_blur``: torchvision's taps, reflect padding, a sigma per sample.
``batched_views.gaussian_blur_`` applies them to the samples a view blurs.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def blur_matrix(sigma: Tensor, kernel_size: int, size: int) -> Tensor:
    """sigma (n,) -> (n, size, size) matrices M with (M @ v)[i] = sum_t taps[t] * v[reflect(i + t - half)].

    The Gaussian taps (torchvision's, normalised to sum 1) with reflect padding folded into the matrix,
    so a 1-D blur along an axis is a matrix product and the edges match torchvision's padding.
    """
    half = kernel_size // 2
    if half >= size:
        raise ValueError(f"blur kernel {kernel_size} is too large for a {size} px view (reflect padding)")
    offsets = torch.arange(kernel_size, device=sigma.device) - half
    taps = torch.softmax(-(offsets / sigma.float()[:, None]) ** 2 / 2, dim=1)  # (n, kernel_size)
    source = (torch.arange(size, device=sigma.device)[:, None] + offsets).abs()  # (size, kernel_size)
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    n = len(sigma)
    matrix = torch.zeros(n, size, size, device=sigma.device)
    return matrix.scatter_add_(2, source.expand(n, size, kernel_size), taps[:, None].expand(n, size, kernel_size))


def _banded_rows(matrix: Tensor, x: Tensor, half: int, block: int = 32) -> Tensor:
    """(n, S, S) banded matrix @ x (n, S, R): one bmm per block of output rows over the rows it reads
    (block + 2 * half of them), so the zeros outside the band cost nothing."""
    size, out = x.shape[1], torch.empty_like(x)
    for row in range(0, size, block):
        lo, hi = max(0, row - half), min(size, row + block + half)
        torch.bmm(matrix[:, row:row + block, lo:hi], x[:, lo:hi], out=out[:, row:row + block])
    return out


def banded_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """(n, C, H, W), sigma (n,) -> blurred (n, C, H, W): banded matrix products along the rows, then
    (transposed) the columns; exact up to float rounding."""
    n, channels, height, width = x.shape
    half = kernel_size // 2
    rows = x.transpose(1, 2).reshape(n, height, channels * width)
    rows = _banded_rows(blur_matrix(sigma, kernel_size, height), rows, half)  # (n, H, C * W)
    columns = rows.view(n, height, channels, width).permute(0, 3, 2, 1).reshape(n, width, channels * height)
    out = _banded_rows(blur_matrix(sigma, kernel_size, width), columns, half)  # (n, W, C * H)
    return out.view(n, width, channels, height).permute(0, 2, 3, 1)


def conv_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """(n, C, H, W), sigma (n,) -> blurred: a horizontal then a vertical depthwise conv (one group per
    sample and channel, so each sample gets its own kernel) after reflect padding."""
    n, channels, height, width = x.shape
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - half
    taps = torch.softmax(-(offsets / sigma.float()[:, None]) ** 2 / 2, dim=1)  # (n, kernel_size)
    taps = taps.repeat_interleave(channels, dim=0).view(n * channels, 1, 1, kernel_size)
    padded = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, n * channels, height + 2 * half, -1)
    out = F.conv2d(F.conv2d(padded, taps, groups=n * channels), taps.transpose(2, 3), groups=n * channels)
    return out.view(n, channels, height, width)


# Which blur kernel runs is measured, not assumed: the faster one depends on the CPU. On the 2-core
# Intel Xeon (AVX-512, AMX) the banded products were 2.3-2.4x faster than the conv at 224 px and tied
# at 96-128 px; on a 2-core AMD EPYC (AVX2) the conv was faster at 224 px (2.46 vs 3.53 ms per view).
# BLUR_KERNEL "auto" times both once per (device type, view shape, kernel size, dtype), the first time
# such a blur runs, and keeps the choice for the rest of the process (as cuDNN's benchmark mode does);
# "banded" or "conv" forces one. Set BLUR_KERNEL, or the environment variable SSL_LIGHTNING_BLUR (read
# when BLUR_KERNEL is None, the default); docs/image_folders.md has the measurements.
BLUR_KERNEL: str | None = None
BLUR_KERNELS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {"banded": banded_blur, "conv": conv_blur}
# The default kernel (the faster one on the Xeon: banded matmuls from kernel 11 on) gives way only to a
# kernel measured BLUR_SWITCH_RATIO times faster. The two agree only to float rounding, so a choice that
# flipped between processes on a near tie would make a resumed run differ from an uninterrupted one;
# the ratio keeps ties (as at 96-128 px on the Xeon) on the default. Under
# torch.use_deterministic_algorithms (Trainer(deterministic=True)) "auto" does not time at all.
BANDED_BLUR_MIN_KERNEL = 11
BLUR_SWITCH_RATIO = 1.25
BLUR_TIMING_REPEATS = 3
_blur_choices: dict[tuple, str] = {}


def _synchronize(device: torch.device) -> None:
    module = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, torch.cpu (a no-op)
    if hasattr(module, "synchronize"):
        module.synchronize()


def time_blurs(x: Tensor, sigma: Tensor, kernel_size: int) -> dict[str, float]:
    """Seconds per call of each blur kernel on x: one untimed call each (allocations, oneDNN's primitive),
    then the best of BLUR_TIMING_REPEATS alternating calls. Synchronizes an accelerator around each call:
    this runs once per shape, never per step."""
    for blur in BLUR_KERNELS.values():
        blur(x, sigma, kernel_size)
    best = dict.fromkeys(BLUR_KERNELS, math.inf)
    for _ in range(BLUR_TIMING_REPEATS):
        for name, blur in BLUR_KERNELS.items():
            _synchronize(x.device)
            start = time.perf_counter()
            blur(x, sigma, kernel_size)
            _synchronize(x.device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def blur_kernel_for(x: Tensor, sigma: Tensor, kernel_size: int) -> str:
    """"banded" or "conv" for blurring x (n, C, H, W): BLUR_KERNEL if forced, else the measured choice.

    Timed on x itself: callers pass what they blur at once (``batched_views.gaussian_blur_``: one CPU
    chunk, or the whole batch on an accelerator), since the per-view cost depends on it. The key leaves
    out n: on a CPU a blur with p < 1 sees a different number of samples every step.
    """
    setting = BLUR_KERNEL or os.environ.get("SSL_LIGHTNING_BLUR", "auto")
    if setting in BLUR_KERNELS:
        return setting
    if setting != "auto":
        raise ValueError(f"blur kernel {setting!r} (blur.BLUR_KERNEL or SSL_LIGHTNING_BLUR) is not "
                         f"one of auto, {', '.join(BLUR_KERNELS)}")
    default = "banded" if kernel_size >= BANDED_BLUR_MIN_KERNEL else "conv"
    if torch.are_deterministic_algorithms_enabled():
        return default
    key = (x.device.type, *x.shape[1:], kernel_size, x.dtype)
    if key not in _blur_choices:
        seconds = time_blurs(x, sigma, kernel_size)
        other = min((name for name in seconds if name != default), key=seconds.get)
        _blur_choices[key] = other if seconds[default] > BLUR_SWITCH_RATIO * seconds[other] else default
    return _blur_choices[key]


def blur_choices() -> list[list]:
    """The kernels chosen so far, as plain data for a checkpoint: [device type, C, H, W, kernel, dtype, choice]."""
    return [[*key[:-1], str(key[-1]).removeprefix("torch."), choice] for key, choice in _blur_choices.items()]


def restore_blur_choices(saved: list[list]) -> None:
    """Take a checkpoint's choices, so that a resumed run (a new process, maybe on a busier machine that
    would time differently) blurs with the same kernels and stays bit-identical."""
    for *key, dtype, choice in saved:
        if choice in BLUR_KERNELS:
            _blur_choices[(*key, getattr(torch, dtype))] = choice
