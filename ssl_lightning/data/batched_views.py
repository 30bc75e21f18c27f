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
generator makes the views deterministic. Every draw is made for the whole batch; on a CPU the ops then
run a chunk of samples at a time (``CPU_CHUNK_BYTES``), which does not change the views. The blur runs
as banded matrix products or depthwise convs, whichever this machine measures faster (``blur.py``);
the two agree to float rounding.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from ssl_lightning.data import blur
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


def jitter_params(n: int, brightness: float, contrast: float, saturation: float, hue: float, channels: int,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None
                  ) -> tuple[Tensor, list[int]]:
    """``v2.ColorJitter(b, c, s, h)``'s random draws for n samples: (factors (n, 4), op order).

    Factors are per sample, uniform in [max(0, 1 - b), 1 + b] (same for c, s) and hue shifts in [-h, h];
    every factor is drawn even when its op is off, so the random stream does not depend on which ops are
    on. The order lists the ops that run (magnitude > 0; saturation and hue not on 1-channel images) in
    ONE random order for the whole batch (torchvision draws an order per image). The order decides which
    kernels run, so the host must know it: it is drawn from the host's RNG (checkpointed with the others)
    unless an accelerator ``generator`` is given, whose draw the host then waits for (one sync per call).
    """
    if hue > 0.5:
        raise ValueError(f"hue jitter {hue} must be at most 0.5, as in ColorJitter")
    rgb = channels == 3
    magnitudes = (brightness, contrast, saturation if rgb else 0.0, hue if rgb else 0.0)
    bounds = [(max(0.0, 1 - m), 1 + m) for m in (brightness, contrast, saturation)] + [(-hue, hue)]
    factors = torch.stack([_uniform((n,), *b, generator, device) for b in bounds], dim=1)
    if generator is None or generator.device.type == "cpu":  # the host's RNG: reading it waits for no device
        order = torch.randperm(4, generator=generator)
    else:  # an explicit accelerator generator (reproducible views outside a fit): one sync per call
        order = torch.randperm(4, generator=generator, device=device)
    order = [k for k in order.tolist() if magnitudes[k] > 0]
    return factors, order


_JITTER_OPS = (_brightness_, _contrast_, _saturation_, adjust_hue)  # the column order of jitter_params' factors


def apply_jitter(x: Tensor, factors: Tensor, order: Sequence[int]) -> Tensor:
    """(n, C, H, W) in [0, 1], factors (n, 4) -> jittered (may overwrite x): the ops in ``order``."""
    for k in order:
        x = _JITTER_OPS[k](x, factors[:, k])
    return x


def color_jitter_(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                  apply_mask: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(n, C, H, W) in [0, 1], in place: ``v2.ColorJitter(b, c, s, h)`` where apply_mask (n,) is True.

    The draws of ``jitter_params``; a zero magnitude skips that op, like ColorJitter's ``None``.
    """
    factors, order = jitter_params(len(x), brightness, contrast, saturation, hue, x.shape[1], generator, x.device)
    return _per_sample_(x, apply_mask, lambda images, f: apply_jitter(images, f, order), factors)


def random_grayscale_(x: Tensor, apply_mask: Tensor) -> Tensor:
    """(n, 3, H, W), in place: grayscale (repeated to 3 channels) where apply_mask (n,) is True."""
    if x.shape[1] == 1:
        return x
    return _per_sample_(x, apply_mask, lambda images: _gray(images).expand_as(images))


def gaussian_blur_(x: Tensor, sigma: Tensor, kernel_size: int, apply_mask: Tensor | None = None) -> Tensor:
    """(n, C, H, W), sigma (n,), in place: ``v2.functional.gaussian_blur`` with a per-sample sigma.

    Separable, with reflect padding as torchvision pads; each sample gets its own kernel. Runs as banded
    matrix products or as depthwise convs, whichever ``blur.blur_kernel_for`` picks (equal up to float rounding).
    """
    def blurred(images: Tensor, s: Tensor) -> Tensor:
        rows = _rows_per_chunk(images)  # the kernel is timed on what is blurred at once
        kernel = blur.blur_kernel_for(images[:rows], s[:rows], kernel_size)
        return blur.BLUR_KERNELS[kernel](images, s, kernel_size)

    return _per_sample_(x, apply_mask, blurred, sigma)


def solarize_(x: Tensor, threshold: float = 0.5, apply_mask: Tensor | None = None) -> Tensor:
    """(n, C, H, W) in [0, 1], in place: pixels >= threshold become 1 - x where apply_mask (n,) is True.

    BatchedViews uses threshold 128/255, i.e. RandomSolarize(threshold=128) on uint8 images.
    """
    return _per_sample_(x, apply_mask, lambda images: torch.where(images >= threshold, 1 - images, images))


@dataclass
class ViewDraws:
    """One view's per-sample random parameters for the ops after the crop (None: that op is off)."""
    flip: Tensor | None = None
    jitter: Tensor | None = None  # apply mask (n,); factors (n, 4) and order as jitter_params
    factors: Tensor | None = None
    order: Sequence[int] = ()
    grayscale: Tensor | None = None
    sigma: Tensor | None = None
    blur: Tensor | None = None
    solarize: Tensor | None = None

    def rows(self, rows: slice) -> ViewDraws:
        """The draws of the samples in ``rows``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return ViewDraws(**{k: v[rows] if isinstance(v, Tensor) else v for k, v in values.items()})


def draw_view(n: int, cfg: ViewConfig, channels: int, generator: torch.Generator | None, device: torch.device,
              *, flip: bool = True) -> ViewDraws:
    """The draws of n samples' flip (if ``flip``), jitter, grayscale, blur and solarize, in that order."""
    draws = ViewDraws()
    if flip and cfg.hflip_p > 0:
        draws.flip = _bernoulli(n, cfg.hflip_p, generator, device)
    if cfg.jitter_p > 0 and any(cfg.jitter):
        draws.jitter = _bernoulli(n, cfg.jitter_p, generator, device)
        draws.factors, draws.order = jitter_params(n, *cfg.jitter, channels, generator, device)
    if channels == 3 and cfg.grayscale_p > 0:
        draws.grayscale = _bernoulli(n, cfg.grayscale_p, generator, device)
    if cfg.blur_p > 0:
        draws.sigma = _uniform((n,), cfg.blur_sigma[0], cfg.blur_sigma[1], generator, device)
        draws.blur = _bernoulli(n, cfg.blur_p, generator, device)
    if cfg.solarize_p > 0:
        draws.solarize = _bernoulli(n, cfg.solarize_p, generator, device)
    return draws


def apply_view_ops_(x: Tensor, draws: ViewDraws, blur_kernel: int) -> Tensor:
    """float (n, C, S, S) in [0, 1], in place: flip, jitter, grayscale, blur, solarize as ``draws`` say."""
    if draws.flip is not None:
        x = _per_sample_(x, draws.flip, lambda images: images.flip(-1))
    if draws.jitter is not None:
        x = _per_sample_(x, draws.jitter, lambda images, f: apply_jitter(images, f, draws.order), draws.factors)
    if draws.grayscale is not None:
        x = random_grayscale_(x, draws.grayscale)
    if draws.sigma is not None:
        x = gaussian_blur_(x, draws.sigma, blur_kernel, draws.blur)
    if draws.solarize is not None:
        x = solarize_(x, _SOLARIZE_THRESHOLD, draws.solarize)
    return x


# On a CPU the ops after the crop run on chunks of this many bytes of views (at least one view), all
# of them on one chunk before the next, so the chunk and the op's temporaries stay in the core's cache
# instead of streaming the whole batch through memory ~40 times (a 224 px batch of 32 is 19 MB). The
# random draws are made for the whole batch first, so the views do not depend on the chunking. One
# 224 px view is 0.6 MB; 1 MiB gives one view per chunk there, nine at 96 px and 85 at 32 px.
# Accelerators take the whole batch at once (a kernel launch per op and chunk would cost more).
CPU_CHUNK_BYTES = 1 << 20


def _rows_per_chunk(out: Tensor) -> int:
    if out.device.type != "cpu" or not len(out):
        return max(1, len(out))
    return max(1, CPU_CHUNK_BYTES // (out[0].numel() * out.element_size()))


class BatchedViews:
    """uint8 batch -> list of normalised float views, one per configured view (count repeats).

    The batch is either whole images, uint8 (N, C, H, W), cropped here, or crops already cut at decode
    time (``crops.CroppedViewsDataset``): one uint8 (N, count, C, size, size) tensor per view config,
    which get everything after the crop. Both run the same ops (``draw_view``, ``apply_view_ops_``).
    """

    def __init__(self, configs: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float]):
        if not configs:
            raise ValueError("at least one view config is needed; SSL methods usually take two")
        self.kinds = list(configs)
        self.configs = [c for c in configs for _ in range(c.count)]
        self.mean, self.std = list(mean), list(std)
        self.channels = len(self.mean)
        self._moments: dict[tuple, tuple[Tensor, Tensor]] = {}  # per (device, dtype): made once, not per batch

    def _mean_std(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """mean and std as (1, C, 1, 1) tensors on like's device: a host-to-device copy (a sync on CUDA)
        only the first time."""
        key = (like.device, like.dtype)
        if key not in self._moments:
            self._moments[key] = tuple(torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
                                       for v in (self.mean, self.std))
        return self._moments[key]

    def __len__(self) -> int:
        return len(self.configs)

    def __call__(self, images: Tensor | Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
        """uint8 (N, C, H, W), or [uint8 (N, count, C, size, size)] per view config ->
        [float (N, C, size, size)] * len(self), normalised with mean/std."""
        if isinstance(images, torch.Tensor):
            self._check(images, 4, (self.channels,))
            # float in (N, H, C, W) memory, the layout crop_resize_flip reads without a copy; as v2.ToDtype(scale=True)
            x = images.transpose(1, 2).contiguous().to(torch.float32).mul_(1.0 / 255).transpose(1, 2)
            return [self.augment(x, cfg, generator, normalise=True) for cfg in self.configs]
        if len(images) != len(self.kinds):
            raise ValueError(f"expected crops for {len(self.kinds)} view configs, got {len(images)}")
        for crops, cfg in zip(images, self.kinds):
            self._check(crops, 5, (cfg.count, self.channels, cfg.size, cfg.size))
        views = []
        for crops, cfg in zip(images, self.kinds):
            for j in range(cfg.count):
                out = torch.empty(crops.shape[0], *crops.shape[2:], dtype=torch.float32, device=crops.device)
                draws = draw_view(len(out), cfg, self.channels, generator, out.device)
                views.append(self._fill(out, cfg, draws, lambda rows, c=crops[:, j]: c[rows], normalise=True))
        return views

    @staticmethod
    def _check(images: Tensor, ndim: int, dims: tuple[int, ...]) -> None:
        if images.dtype != torch.uint8 or images.ndim != ndim or tuple(images.shape[1:len(dims) + 1]) != dims:
            shape = ", ".join(["N", *map(str, dims)] + ["H", "W"][:ndim - 1 - len(dims)])
            raise ValueError(f"expected a uint8 ({shape}) batch, got {images.dtype} {tuple(images.shape)}")

    def augment(self, x: Tensor, cfg: ViewConfig, generator: torch.Generator | None = None,
                *, normalise: bool = False) -> Tensor:
        """float (N, C, H, W) in [0, 1] -> one view (N, C, size, size), in [0, 1] unless ``normalise``."""
        n, channels, height, width = x.shape
        boxes = random_resized_crop_params(n, height, width, cfg.scale, cfg.ratio, generator, x.device)
        flip = _bernoulli(n, cfg.hflip_p, generator, x.device) if cfg.hflip_p > 0 else None
        draws = draw_view(n, cfg, channels, generator, x.device, flip=False)  # the flip is done in the crop

        def crop(rows: slice) -> Tensor:
            return crop_resize_flip(x[rows], boxes[rows], None if flip is None else flip[rows], cfg.size)

        out = torch.empty(n, channels, cfg.size, cfg.size, device=x.device)
        return self._fill(out, cfg, draws, crop, normalise=normalise)

    def _fill(self, out: Tensor, cfg: ViewConfig, draws: ViewDraws, source: Callable[[slice], Tensor] | None = None,
              *, normalise: bool = False) -> Tensor:
        """out (N, C, size, size), in place, a chunk of samples at a time (``CPU_CHUNK_BYTES``): copy the
        chunk's crops from ``source(rows)`` (uint8 is scaled to [0, 1]), apply the ops, normalise."""
        if normalise:
            mean, std = self._mean_std(out)
        step, kernel = _rows_per_chunk(out), blur_kernel_size(cfg.size)
        for start in range(0, len(out), step):
            rows = slice(start, start + step)
            chunk = out[rows]
            if source is not None:
                crops = source(rows)
                if crops.dtype == torch.uint8:
                    torch.mul(crops, 1.0 / 255, out=chunk)  # as v2.ToDtype(scale=True)
                else:
                    chunk.copy_(crops)
            apply_view_ops_(chunk, draws.rows(rows), kernel)  # in place: every op writes into its input
            if normalise:
                chunk.sub_(mean).div_(std)
        return out
