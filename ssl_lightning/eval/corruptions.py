"""ImageNet-C-style corruptions (Hendrycks & Dietterich, 2019) in torch, for batches of any image size.

Every corruption is ``fn(images, severity, generator) -> images``: float images in [0, 1] of shape
(N, C, H, W), C = 1 or 3, severity 1..5, output of the same shape clamped to [0, 1]. Random ones draw
only from ``generator`` (same seed -> bit-identical output on the same device); the others ignore it.

Severity parameters are those of the official code (hendrycks/robustness,
ImageNet-C/imagenet_c/imagenet_c/corruptions.py), which was written for 224 px. Where we deviate:

- Lengths in pixels are scaled by ``H / 224``: the gaussian_blur sigma, the defocus_blur disk radius and
  its anti-aliasing sigma. Zoom factors, the pixelate factor and the fog fractal (generated at the next
  power of two >= H and cropped, as the official 256 -> 224) are relative already. Noise levels,
  brightness, contrast, saturation and the JPEG quality are per pixel: the same at every size.
- Blur kernels are the continuous blur convolved with the pixel footprint (a 1-px box, twice: the
  blurred pixel and the pixel it is read by), so a sub-pixel blur on a small image still blurs
  (sigma 0.125 px at 28 px moves 5% of a pixel into each neighbour) instead of rounding to the
  identity; this is what the 224 px corruption does to an image seen at 28 px. At 224 px it widens
  sigma 1 by 8% (sqrt(1 + 1/6)), less for larger ones. Borders replicate (skimage's "nearest").
- zoom_blur zooms about the centre with bilinear grid_sample instead of scipy's crop-and-zoom.
- jpeg_compression uses libjpeg through torchvision; its 8x8 blocks are fixed in pixels, so at 28 px
  the same quality is a coarser corruption than at 224 px (not scaled: quality is the parameter).
- saturate (an ImageNet-C validation corruption) needs colour: it refuses 1-channel images.
- Gray pixels (saturation 0) get hue 0 in saturate, as skimage's rgb2hsv gives them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 224  # the official parameters are for 224 px images
COLOUR_ONLY = ("saturate",)

# ----------------------------------------------------------------------------- severity parameters
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # std
SHOT_NOISE = (60, 25, 12, 5, 3)  # photons per unit intensity
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of values set to 0 or 1
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)  # std of the multiplicative noise
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # sigma at 224 px
DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # (disk radius, alias sigma) at 224 px
ZOOM_BLUR = ((0.01, 12), (0.01, 16), (0.02, 11), (0.02, 13), (0.03, 11))  # zooms 1 + step * k, k < count*
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the per-channel mean
SATURATE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))  # HSV saturation * a + b
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # side of the coarse image / side
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # (fog strength, fractal wibble decay)
# *official: np.arange(1, 1.11, 0.01) etc., whose float end points give these counts (12 zooms at severity 1)


def _scale(images: torch.Tensor) -> float:
    return images.shape[-2] / REFERENCE_SIZE


# ----------------------------------------------------------------------------- noise
def gaussian_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return (images + GAUSSIAN_NOISE[severity - 1] * noise).clamp(0, 1)


def shot_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    photons = SHOT_NOISE[severity - 1]
    return (torch.poisson(images * photons, generator=generator) / photons).clamp(0, 1)


def impulse_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Salt and pepper: each value (each channel separately, as skimage's s&p) is hit with probability
    ``amount`` and then set to 1 or 0 with equal odds."""
    hit = torch.rand(images.shape, generator=generator, device=images.device) < IMPULSE_NOISE[severity - 1]
    salt = torch.rand(images.shape, generator=generator, device=images.device) < 0.5
    return torch.where(hit, salt.to(images.dtype), images)


def speckle_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return (images + images * SPECKLE_NOISE[severity - 1] * noise).clamp(0, 1)


# ----------------------------------------------------------------------------- blur
def footprint_kernel(psf: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], radius: int,
                     oversample: int = 16) -> torch.Tensor:
    """(2 radius + 1, 2 radius + 1) kernel summing to 1: the continuous point spread function
    ``psf(u, v)`` (offsets in pixels) convolved with the pixel footprint twice (a triangle of half-width
    1 px per axis), sampled at integer offsets. Integrated on a grid ``oversample`` times finer."""
    step = 1.0 / oversample
    fine = torch.arange(-(radius + 1) * oversample, (radius + 1) * oversample, dtype=torch.float64) * step + step / 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    triangle = (1 - (offsets[:, None] - fine[None, :]).abs()).clamp(min=0)  # (K, fine)
    kernel = triangle @ psf(fine[:, None], fine[None, :]) @ triangle.T
    return (kernel / kernel.sum()).float()


def blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel 2-D convolution of (N, C, H, W) with a (K, K) or separable (K,) kernel, replicate borders."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)
    kernels = [kernel.view(1, 1, 1, -1), kernel.view(1, 1, -1, 1)] if kernel.ndim == 1 else [kernel[None, None]]
    for k in kernels:
        ph, pw = k.shape[-2] // 2, k.shape[-1] // 2
        flat = F.conv2d(F.pad(flat, (pw, pw, ph, ph), mode="replicate"), k.to(images))
    return flat.reshape(n, c, h, w).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    sigma = GAUSSIAN_BLUR[severity - 1] * _scale(images)
    radius = math.ceil(4 * sigma) + 1  # skimage truncates at 4 sigma
    kernel = footprint_kernel(lambda u, v: torch.exp(-(u**2 + v**2) / (2 * sigma**2)), radius)
    return blur(images, kernel.sum(0))  # a Gaussian stays separable


def defocus_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """A disk of the scaled radius with edges softened by the scaled anti-aliasing sigma."""
    disk, alias = (p * _scale(images) for p in DEFOCUS_BLUR[severity - 1])

    def soft_disk(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outside = (u**2 + v**2).sqrt() - disk
        return 0.5 * torch.erfc(outside / (math.sqrt(2) * alias))

    return blur(images, footprint_kernel(soft_disk, math.ceil(disk + 3 * alias) + 1))


def zoom(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by ``factor`` >= 1 (bilinear), same size."""
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def zoom_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    step, count = ZOOM_BLUR[severity - 1]
    total = images.clone()
    for k in range(count):
        total += zoom(images, 1 + step * k)
    return (total / (count + 1)).clamp(0, 1)


# ----------------------------------------------------------------------------- colour and contrast
def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn; 0 where saturation is 0)."""
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(1)
    delta = value - rgb.min(1).values
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = delta.clamp(min=1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv."""
    hue, saturation, value = hsv.unbind(1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=hsv.device).view(1, 3, 1, 1) + hue[:, None] * 6) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] * (1 - saturation[:, None] * ramp)


def brightness(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """HSV value + c: each pixel's channels scale together (a gray pixel is its own value)."""
    if images.shape[1] == 1:
        return (images + BRIGHTNESS[severity - 1]).clamp(0, 1)
    hsv = rgb_to_hsv(images)
    hsv[:, 2] = (hsv[:, 2] + BRIGHTNESS[severity - 1]).clamp(0, 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def contrast(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    mean = images.mean(dim=(2, 3), keepdim=True)
    return ((images - mean) * CONTRAST[severity - 1] + mean).clamp(0, 1)


def saturate(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    if images.shape[1] != 3:
        raise ValueError(f"saturate needs colour images (3 channels), got {images.shape[1]} channel(s); "
                         "leave it out for grayscale data")
    factor, offset = SATURATE[severity - 1]
    hsv = rgb_to_hsv(images)
    hsv[:, 1] = (hsv[:, 1] * factor + offset).clamp(0, 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


# ----------------------------------------------------------------------------- digital
def jpeg_compression(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Each image encoded and decoded with libjpeg at the severity's quality (outputs are multiples of 1/255)."""
    as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    encoded = encode_jpeg(list(as_bytes), quality=JPEG_QUALITY[severity - 1])
    decoded = decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
    return torch.stack(decoded).to(images).div(255)


def pixelate(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Box-average down to ``factor`` x the side and back up (PIL's BOX both ways, as the official code;
    box upsampling averages the one or two coarse pixels under each output pixel)."""
    h, w = images.shape[-2:]
    factor = PIXELATE[severity - 1]
    small = F.interpolate(images, size=(max(1, int(h * factor)), max(1, int(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="area").clamp(0, 1)


def plasma_fractal(n: int, size: int, decay: float, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, size, size) diamond-square height maps in [0, 1] (each normalised to its min and max); size a
    power of two. Each halving of the step adds points whose noise amplitude falls by decay**2."""
    if size & (size - 1):
        raise ValueError(f"plasma_fractal size {size} is not a power of two")
    grid = torch.zeros(n, size, size, device=device, dtype=torch.float64)
    wibble, step = 100.0, size

    def mean_plus_noise(total: torch.Tensor) -> torch.Tensor:  # total: the sum of four neighbours
        noise = torch.rand(total.shape, generator=generator, device=device, dtype=torch.float64) * 2 - 1
        return total / 4 + wibble * wibble * noise

    while step >= 2:
        half = step // 2
        corners = grid[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        grid[:, half::step, half::step] = mean_plus_noise(squares + squares.roll(-1, 2))
        centres = grid[:, half::step, half::step]
        corners = grid[:, ::step, ::step]
        grid[:, ::step, half::step] = mean_plus_noise(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        grid[:, half::step, ::step] = mean_plus_noise(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    low = grid.amin(dim=(1, 2), keepdim=True)
    return ((grid - low) / (grid.amax(dim=(1, 2), keepdim=True) - low)).float()


def fog(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """A fractal haze (generated at the next power of two >= the side, cropped) added, then the image
    rescaled so that its maximum keeps its value, as the official code does."""
    strength, decay = FOG[severity - 1]
    n, _, h, w = images.shape
    side = 1 << max(1, math.ceil(math.log2(max(h, w))))
    haze = plasma_fractal(n, side, decay, generator, images.device)[:, None, :h, :w].to(images)
    peak = images.amax(dim=(1, 2, 3), keepdim=True)
    return ((images + strength * haze) * peak / (peak + strength)).clamp(0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "zoom_blur": zoom_blur,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "jpeg_compression": jpeg_compression,
    "pixelate": pixelate,
    "fog": fog,
}


def applicable(channels: int) -> list[str]:
    """The corruption names that apply to images with ``channels`` channels (saturate needs colour)."""
    return [name for name in CORRUPTIONS if channels == 3 or name not in COLOUR_ONLY]


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``CORRUPTIONS[name]`` at ``severity`` on (N, C, H, W) float images in [0, 1], its randomness
    seeded by ``seed`` (a generator on the images' device)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} is outside 1..5")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C 1 or 3, got {tuple(images.shape)}")
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return CORRUPTIONS[name](images, severity, generator)
