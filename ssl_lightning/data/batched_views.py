"""Batched view augmentation: a whole uint8 batch in, augmented views out, on the batch's device.

Same configuration (``ViewConfig``) and semantics as the per-sample torchvision v2 pipeline in
``views.build_view_transform`` (crop -> flip -> jitter -> grayscale -> blur -> solarize -> normalise),
but every random parameter is drawn per sample as a tensor and applied with batched ops, so no
Python loop runs over samples. Deviations from the per-sample pipeline:

* everything runs in float32 on [0, 1]; torchvision runs the colour ops and the blur on uint8 and
  rounds/truncates after each op, we do not quantise in between;
* ColorJitter applies its four ops in one random order per batch (torchvision: one per sample);
  the factors themselves are per sample;
* solarize inverts floats >= 128/255, which is RandomSolarize(threshold=128) on uint8 values.
Crop + resize matches torchvision's antialiased bilinear resized_crop (up to that quantisation).

All randomness comes from ``generator`` (which must live on the images' device), so a seeded
generator makes the views deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.data.views import ViewConfig, blur_kernel_size

Tensor = torch.Tensor
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale
_SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(threshold=128) on uint8, in [0, 1] units
# Devices where an op applied with probability p runs on the selected samples only (see _per_sample_).
SELECT_ON_HOST = {"cpu"}


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device).mul_(high - low).add_(low)


def _bernoulli(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) bool mask, True with probability p (torchvision applies when rand < p)."""
    return torch.rand(n, generator=generator, device=device) < p


def random_resized_crop_params(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                               generator: torch.Generator | None = None,
                               device: torch.device | str | None = None) -> Tensor:
    """(n, 4) int64 boxes (top, left, height, width): ``v2.RandomResizedCrop.make_params`` vectorised.

    Each sample takes its first of 10 attempts (area ~ U(scale) * H * W, log-uniform aspect ratio) that
    fits in the image, else the central crop clamped to the ratio range.
    """
    area = height * width
    target = area * _uniform((n, 10), scale[0], scale[1], generator, device)
    aspect = _uniform((n, 10), math.log(ratio[0]), math.log(ratio[1]), generator, device).exp_()
    # torch.round rounds half to even like Python's round() in torchvision.
    w = torch.sqrt(target * aspect).round_()
    h = torch.sqrt(target / aspect).round_()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = ok.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = torch.rand((n, 2), generator=generator, device=device)
    # randint(0, H - h + 1) as floor(u * count); the min guards float rounding of u * count up to count.
    top = torch.minimum((u[:, 0] * (height - h + 1)).floor(), height - h)
    left = torch.minimum((u[:, 1] * (width - w + 1)).floor(), width - w)
    top = torch.where(found, top, (height - h).div(2, rounding_mode="floor"))
    left = torch.where(found, left, (width - w).div(2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).long()


def _resample_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """(n, out_size, in_size) weights resampling [start, start + length) to out_size pixels.

    Triangle filter stretched by the downscale factor: ATen's antialiased bilinear (what torchvision's
    resize uses with antialias=True); for upscaling it is plain bilinear with edge clamping. Pixels
    outside the crop get zero weight, so, as in crop-then-resize, nothing bleeds in from outside.
    """
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    step = length / out_size
    support = step.clamp(min=1.0)
    centre = start + (torch.arange(out_size, device=start.device, dtype=torch.float32)[:, None] + 0.5) * step
    j = torch.arange(in_size, device=start.device, dtype=torch.float32)
    weight = (1 - ((j + 0.5) - centre).abs() / support).clamp_(min=0)
    weight = weight * ((j >= start) & (j < start + length))
    return weight / weight.sum(dim=-1, keepdim=True)


def crop_resize_flip(images: Tensor, boxes: Tensor, flip_mask: Tensor | None, size: int) -> Tensor:
    """float (n, C, H, W), boxes (n, 4) (top, left, height, width), flip (n,) bool -> (n, C, size, size).

    Separable resampling as two batched matmuls (rows, then columns) instead of grid_sample: the weights
    match torchvision's resized_crop(antialias=True) and an identity box returns the input exactly.
    Both matmuls run with the channels inside the rows ((n, H, C * W) memory), so no weight matrix is
    repeated per channel. Images already in (n, H, C, W) memory (``images.transpose(1, 2)``
    contiguous) are used without a copy.
    """
    n, channels, height, width = images.shape
    rows = _resample_matrix(boxes[:, 0], boxes[:, 2], height, size)  # (n, size, H)
    cols = _resample_matrix(boxes[:, 1], boxes[:, 3], width, size)  # (n, size, W)
    if flip_mask is not None:  # a horizontal flip of the output is a flip of the column weights
        cols = torch.where(flip_mask[:, None, None], cols.flip(1), cols)
    out = torch.bmm(rows, images.transpose(1, 2).reshape(n, height, channels * width))  # (n, size, C * W)
    out = torch.bmm(out.view(n, size * channels, width), cols.transpose(1, 2))  # (n, size * C, size)
    return out.view(n, size, channels, size).transpose(1, 2).contiguous()


def _per_sample_(x: Tensor, mask: Tensor | None, op: Callable[..., Tensor], *params: Tensor) -> Tensor:
    """Writes op(x, *params) into x for the samples where mask (n,) is True (all if None); returns x.

    op returns its result and may overwrite its input; params are per-sample (n, ...) tensors. On the
    CPU, op sees only the selected samples (an op applied with p = 0.1 costs a tenth of the batch); on an
    accelerator it sees all of them and the result is blended in by the mask, because selecting would
    make the host wait for the device to read the mask. Both give the same values.
    """
    if mask is not None and x.device.type not in SELECT_ON_HOST:
        return x.lerp_(op(x.clone(), *params), mask.view(-1, 1, 1, 1).to(x.dtype))  # exact at weights 0, 1
    index = None if mask is None else mask.nonzero().squeeze(1)
    if index is None or len(index) == len(x):
        out = op(x, *params)
        return x if out is x else x.copy_(out)
    if len(index) == 0:
        return x
    return x.index_copy_(0, index, op(x.index_select(0, index), *(p.index_select(0, index) for p in params)))


def _gray(x: Tensor) -> Tensor:
    """(n, C, H, W) -> (n, 1, H, W) luma; a 1-channel image is its own grayscale."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * _GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def _column(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)


def _brightness_(x: Tensor, factor: Tensor) -> Tensor:
    return x.mul_(_column(factor)).clamp_(0, 1)


def _contrast_(x: Tensor, factor: Tensor) -> Tensor:
    # The grayscale image's mean is the luma-weighted mean of the channel means (scalar weights: no
    # host-to-device copy, which would make the host wait on CUDA).
    means = x.mean(dim=(2, 3))
    mean = means[:, 0] if x.shape[1] == 1 else sum(w * m for w, m in zip(_GRAY, means.unbind(1)))
    return x.mul_(_column(factor)).add_(_column(mean * (1 - factor))).clamp_(0, 1)


def _saturation_(x: Tensor, factor: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    gray = _gray(x)
    return x.mul_(_column(factor)).addcmul_(gray, _column(1 - factor)).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """(n, C, H, W) in [0, 1], factor (n,) -> x * factor, clamped."""
    return _brightness_(x.clone(), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """(n, C, H, W), factor (n,): blend with the per-image mean of the grayscale image."""
    return _contrast_(x.clone(), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """(n, 3, H, W), factor (n,): blend with the grayscale image (1-channel: unchanged, as torchvision)."""
    return _saturation_(x.clone(), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """(n, 3, H, W), shift (n,) in [-0.5, 0.5]: rotate the HSV hue (1-channel: unchanged, as torchvision).

    RGB -> HSV -> RGB fused: v = max and v * s = max - min pass through unchanged, so only the hue h is
    computed (in sixths of a turn). Channel c of the result is min + (max - min) * clamp(d - 1, 0, 1),
    d the distance of h + 6 * shift + m_c from the nearest multiple of 6, m_c = 3, 1, -1 for R, G, B:
    torchvision's piecewise hsv_to_rgb as one triangle wave.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    # Ties resolve R before G before B, as torchvision's _rgb_to_hsv. Grey pixels (delta 0) get hue 0,
    # and delta 0 keeps them grey whatever the hue.
    hue = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(delta, alpha=2),
                                                    (r - g).add_(delta, alpha=4)))
    hue.div_(delta.clamp(min=torch.finfo(x.dtype).tiny))
    m = torch.arange(3.0, -2.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 3, 1, -1, made on the device
    offsets = 6 * _column(shift) + m
    d = hue.unsqueeze(1) + offsets  # (n, 3, H, W)
    d.sub_((d * (1 / 6)).add_(0.5).floor_(), alpha=6).abs_()  # floor: round is slow on CPU
    return d.sub_(1).clamp_(0, 1).mul_(delta.unsqueeze(1)).add_(minc.unsqueeze(1)).clamp_(0, 1)


def color_jitter_(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                  apply_mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(n, C, H, W) in [0, 1], in place: ``v2.ColorJitter(b, c, s, h)`` where apply_mask (n,) is True.

    Factors are per sample, uniform in [max(0, 1 - b), 1 + b] (same for c, s) and hue shifts in [-h, h];
    a zero magnitude skips that op. The four ops run in ONE random order for the whole batch
    (torchvision draws an order per image); that order is read on the host, one sync per call on CUDA.
    Saturation and hue do nothing on 1-channel images.
    """
    if hue > 0.5:
        raise ValueError(f"hue jitter {hue} must be at most 0.5, as in ColorJitter")
    n, device, rgb = x.shape[0], x.device, x.shape[1] == 3
    ops = [(_brightness_, brightness, (max(0.0, 1 - brightness), 1 + brightness)),
           (_contrast_, contrast, (max(0.0, 1 - contrast), 1 + contrast)),
           (_saturation_, saturation if rgb else 0.0, (max(0.0, 1 - saturation), 1 + saturation)),
           (adjust_hue, hue if rgb else 0.0, (-hue, hue))]
    # Every factor is drawn even when its op is skipped, so the random stream does not depend on
    # which ops are on; a zero magnitude skips the op, like ColorJitter's `None` parameters.
    factors = torch.stack([_uniform((n,), *bounds, generator, device) for _, _, bounds in ops], dim=1)
    order = [k for k in torch.randperm(4, generator=generator, device=device).tolist() if ops[k][1] > 0]

    def jitter(images: Tensor, per_sample: Tensor) -> Tensor:
        for k in order:
            images = ops[k][0](images, per_sample[:, k])
        return images

    return _per_sample_(x, apply_mask, jitter, factors)


def random_grayscale_(x: Tensor, apply_mask: Tensor) -> Tensor:
    """(n, 3, H, W), in place: grayscale (repeated to 3 channels) where apply_mask (n,) is True."""
    if x.shape[1] == 1:
        return x
    return _per_sample_(x, apply_mask, lambda images: _gray(images).expand_as(images))


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


# From this kernel size on (views of 110 px and more) the banded matmuls are faster than the depthwise
# conv on a CPU: 1.2-2.4x at 128 px (kernel 13), 2.5-3.2x at 224 px (three runs of
# ``benchmarks/throughput.py --imagefolder``, which prints these costs, 2026-12-03, loaded machine; on the
# idle machine later that day 0.74-2.0x at 128 px, i.e. a tie there, and 2.3-2.4x at 224 px). For the small
# kernels of 28-32 px views (kernel 3) the conv took 0.56-0.64x the time (one thread, 256 views). At
# 96 px (kernel 9) the banded products were 1.0-1.6x faster; the switch is not tuned between 32 and 96 px.
BANDED_BLUR_MIN_KERNEL = 11


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


def gaussian_blur_(x: Tensor, sigma: Tensor, kernel_size: int, apply_mask: Tensor | None = None) -> Tensor:
    """(n, C, H, W), sigma (n,), in place: ``v2.functional.gaussian_blur`` with a per-sample sigma.

    Separable, with reflect padding as torchvision pads; each sample gets its own kernel. Large
    kernels run as banded matrix products, small ones as depthwise convs (whichever is faster).
    """
    blur = banded_blur if kernel_size >= BANDED_BLUR_MIN_KERNEL else conv_blur
    return _per_sample_(x, apply_mask, lambda images, s: blur(images, s, kernel_size), sigma)


def solarize_(x: Tensor, threshold: float = 0.5, apply_mask: Tensor | None = None) -> Tensor:
    """(n, C, H, W) in [0, 1], in place: pixels >= threshold become 1 - x where apply_mask (n,) is True.

    BatchedViews uses threshold 128/255, i.e. RandomSolarize(threshold=128) on uint8 images.
    """
    return _per_sample_(x, apply_mask, lambda images: torch.where(images >= threshold, 1 - images, images))


class BatchedViews:
    """uint8 batch -> list of normalised float views, one per configured view (count repeats).

    The batch is either whole images, uint8 (N, C, H, W), cropped here, or crops already cut at decode
    time (``crops.CroppedViewsDataset``): one uint8 (N, count, C, size, size) tensor per view config,
    which get everything after the crop. Both run the same ops (``augment_crop``).
    """

    def __init__(self, configs: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float]):
        if not configs:
            raise ValueError("at least one view config is needed; SSL methods usually take two")
        self.kinds = list(configs)
        self.configs = [c for c in configs for _ in range(c.count)]
        self.mean, self.std = list(mean), list(std)
        self.channels = len(self.mean)

    def __len__(self) -> int:
        return len(self.configs)

    def __call__(self, images: Tensor | Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
        """uint8 (N, C, H, W), or [uint8 (N, count, C, size, size)] per view config ->
        [float (N, C, size, size)] * len(self), normalised with mean/std."""
        if isinstance(images, torch.Tensor):
            self._check(images, 4, (self.channels,))
            # float in (N, H, C, W) memory, the layout crop_resize_flip reads without a copy; as v2.ToDtype(scale=True)
            x = images.transpose(1, 2).contiguous().to(torch.float32).mul_(1.0 / 255).transpose(1, 2)
            views = [self.augment(x, cfg, generator) for cfg in self.configs]
        else:
            if len(images) != len(self.kinds):
                raise ValueError(f"expected crops for {len(self.kinds)} view configs, got {len(images)}")
            for crops, cfg in zip(images, self.kinds):
                self._check(crops, 5, (cfg.count, self.channels, cfg.size, cfg.size))
            views = [self.augment_crop(crops[:, j].to(torch.float32).mul_(1.0 / 255), cfg, generator)
                     for crops, cfg in zip(images, self.kinds) for j in range(cfg.count)]
        device = views[0].device
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return [view.sub_(mean).div_(std) for view in views]

    @staticmethod
    def _check(images: Tensor, ndim: int, dims: tuple[int, ...]) -> None:
        if images.dtype != torch.uint8 or images.ndim != ndim or tuple(images.shape[1:len(dims) + 1]) != dims:
            shape = ", ".join(["N", *map(str, dims)] + ["H", "W"][:ndim - 1 - len(dims)])
            raise ValueError(f"expected a uint8 ({shape}) batch, got {images.dtype} {tuple(images.shape)}")

    def augment(self, x: Tensor, cfg: ViewConfig, generator: torch.Generator | None = None) -> Tensor:
        """float (N, C, H, W) in [0, 1] -> one un-normalised view (N, C, size, size) in [0, 1]."""
        n, _, height, width = x.shape
        boxes = random_resized_crop_params(n, height, width, cfg.scale, cfg.ratio, generator, x.device)
        flip = _bernoulli(n, cfg.hflip_p, generator, x.device) if cfg.hflip_p > 0 else None
        return self.augment_crop(crop_resize_flip(x, boxes, flip, cfg.size), cfg, generator, flipped=True)

    def augment_crop(self, out: Tensor, cfg: ViewConfig, generator: torch.Generator | None = None,
                     *, flipped: bool = False) -> Tensor:
        """float (N, C, size, size) crops in [0, 1], in place -> the view: flip (unless ``flipped``, done in
        the crop), jitter, grayscale, blur, solarize; un-normalised, in [0, 1]."""
        n, channels, dev = out.shape[0], out.shape[1], out.device
        if not flipped and cfg.hflip_p > 0:
            out = _per_sample_(out, _bernoulli(n, cfg.hflip_p, generator, dev), lambda images: images.flip(-1))
        brightness, contrast, saturation, hue = cfg.jitter
        if cfg.jitter_p > 0 and any(cfg.jitter):
            out = color_jitter_(out, brightness, contrast, saturation, hue,
                                _bernoulli(n, cfg.jitter_p, generator, dev), generator)
        if channels == 3 and cfg.grayscale_p > 0:
            out = random_grayscale_(out, _bernoulli(n, cfg.grayscale_p, generator, dev))
        if cfg.blur_p > 0:
            sigma = _uniform((n,), cfg.blur_sigma[0], cfg.blur_sigma[1], generator, dev)
            out = gaussian_blur_(out, sigma, blur_kernel_size(cfg.size), _bernoulli(n, cfg.blur_p, generator, dev))
        if cfg.solarize_p > 0:
            out = solarize_(out, _SOLARIZE_THRESHOLD, _bernoulli(n, cfg.solarize_p, generator, dev))
        return out
