"""The model-agnostic part of a loss landscape (Li et al. 2018): filter-normalised random directions
and a loss evaluated on the plane theta(a, b) = theta* + a d1 + b d2, split over ranks."""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ssl_lightning.distributed import all_reduce_no_grad, local_only, rank, world_size
from ssl_lightning.landscape.hessian import hessian_extremes

Direction = dict[str, torch.Tensor]


def filter_normalized_direction(model: nn.Module, *, seed: int, only: Collection[str] | None = None) -> Direction:
    """A Gaussian direction for every parameter of ``model`` (by name), drawn from its own generator
    seeded with ``seed``. Tensors with dim > 1 are rescaled slice by slice along dim 0 (conv output
    filter, Linear row): d_f <- d_f ||w_f|| / (||d_f|| + 1e-10). Tensors with dim <= 1 (biases, norm
    parameters) and parameters not named in ``only`` (when given) get zeros. Every parameter draws its
    numbers either way, so a parameter's direction does not depend on ``only``."""
    generator = torch.Generator().manual_seed(seed)
    direction = {}
    for name, weight in model.named_parameters():
        d = torch.randn(weight.shape, generator=generator)
        if weight.dim() <= 1 or (only is not None and name not in only):
            direction[name] = torch.zeros_like(weight)
            continue
        w = weight.detach().float().cpu()
        scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)
        direction[name] = (d * scale.view(-1, *[1] * (d.dim() - 1))).to(weight)
    return direction


def parse_grid(text: str) -> torch.Tensor:
    """"lo:hi:n" -> n float64 values from lo to hi (both included); one of them must be exactly 0,
    the trained weights, where the landscape is centred."""
    parts = text.split(":")
    try:
        lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"grid {text!r} is not lo:hi:n; use e.g. -1:1:21") from None
    if n < 2 or not lo < hi:
        raise ValueError(f"grid {text!r} needs lo < hi and n >= 2 points; use e.g. -1:1:21")
    values = torch.tensor([lo + (hi - lo) * i / (n - 1) for i in range(n)], dtype=torch.float64)
    values[values.abs() < 1e-9 * (hi - lo)] = 0.0  # float rounding of the centre
    if not (values == 0).any():
        raise ValueError(f"grid {text!r} does not contain 0 (the trained weights); use a range around 0 with "
                         f"a point at 0, e.g. {lo:g}:{hi:g}:{n + 1} or -1:1:21")
    return values


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Yields a copy of the parameters and buffers; puts every one of them back, bit for bit, on exit."""
    saved = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    try:
        yield saved
    finally:
        restore(model, saved)


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t.copy_(saved[name])


@torch.no_grad()
def move_to(model: nn.Module, theta: dict[str, torch.Tensor], d1: Direction, d2: Direction, a: float, b: float) -> None:
    """Parameters <- theta + a d1 + b d2 (exactly theta at a = b = 0)."""
    for name, p in model.named_parameters():
        p.copy_(theta[name] + a * d1[name] + b * d2[name])


def map_grid(model: nn.Module, point_fn: Callable[[], Sequence[float]], d1: Direction, d2: Direction,
             alphas: torch.Tensor, betas: torch.Tensor, *, width: int = 1) -> torch.Tensor:
    """(len(alphas), len(betas), width) float64: the ``width`` numbers ``point_fn()`` returns at
    theta* + a d1 + b d2.

    Every point starts from the model's parameters AND buffers as they were on entry (ssl_step may
    push to queues or move centers), and the model holds them again on exit. In a process group,
    rank r evaluates the flat points r, r + W, ... on whole batches (collectives are local inside
    point_fn) and every rank returns the full grid (sum of zero-filled tensors). Runs in the caller's
    grad mode (the curvature map differentiates at every point).
    """
    values = torch.zeros(len(alphas), len(betas), width, dtype=torch.float64)
    ranks, me = world_size(), rank()
    with preserved_state(model) as saved, local_only():
        for k in range(me, values[..., 0].numel(), ranks):
            i, j = divmod(k, len(betas))
            move_to(model, saved, d1, d2, float(alphas[i]), float(betas[j]))
            values[i, j] = torch.as_tensor(point_fn(), dtype=torch.float64).reshape(width)
            restore(model, saved)
    return all_reduce_no_grad(values.to(_collective_device())).cpu()


def loss_grid(model: nn.Module, loss_fn: Callable[[], float | torch.Tensor], d1: Direction, d2: Direction,
              alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """(len(alphas), len(betas)) float64 matrix of ``loss_fn()`` at theta* + a d1 + b d2, without
    gradients, split over ranks as map_grid."""
    with torch.no_grad():
        return map_grid(model, lambda: [float(loss_fn())], d1, d2, alphas, betas)[..., 0]


def curvature_grid(model: nn.Module, loss_fn: Callable[[], torch.Tensor], moved: Collection[str], d1: Direction,
                   d2: Direction, alphas: torch.Tensor, betas: torch.Tensor, *, iters: int = 20, tol: float = 1e-3,
                   seed: int = 0) -> torch.Tensor:
    """(len(alphas), len(betas), 2) float64: (lambda_min, lambda_max) of the Hessian of ``loss_fn()``
    with respect to the parameters named in ``moved``, at every point of the plane (Li et al. 2018,
    Fig. 7), from hessian_extremes (Lanczos, ``iters`` products at most, the math attention kernel);
    split over ranks and restored as map_grid."""
    with torch.enable_grad(), hessian_parameters(model, moved) as params:
        return map_grid(model, lambda: hessian_extremes(loss_fn, params, iters=iters, tol=tol, seed=seed),
                        d1, d2, alphas, betas, width=2)


@contextmanager
def hessian_parameters(model: nn.Module, moved: Collection[str]) -> Iterator[list[torch.Tensor]]:
    """Yields the parameters named in ``moved``, the variables of the curvature: exactly those the
    landscape's plane moves, including ones that training does not optimise (an EMA teacher evaluated
    by the probe, MAE's fixed position embedding), which require grad until exit."""
    params = [p for name, p in model.named_parameters() if name in moved]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def convexity_ratio(lambda_min: torch.Tensor, lambda_max: torch.Tensor) -> torch.Tensor:
    """|lambda_min / lambda_max| elementwise (Li et al.'s map): near 0 where the surface is locally
    convex or nearly so, 1 or more where negative curvature is as strong as the positive."""
    return (lambda_min / lambda_max).abs()


def convex_fraction(lambda_min: torch.Tensor, lambda_max: torch.Tensor, *, tolerance: float = 0.1) -> float:
    """Fraction of points that are locally convex up to ``tolerance``: lambda_min >= -tolerance x
    |lambda_max| (no negative curvature, or negative curvature below tolerance x the positive one)."""
    return float((lambda_min >= -tolerance * lambda_max.abs()).double().mean())


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (and one process) take CPU ones."""
    nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def summarize(losses: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, *,
              flat_tolerance: float = 0.1) -> dict[str, float]:
    """Centre loss (a = b = 0), min and max, where the min lies, and flatness: the fraction of grid
    points whose loss is within ``flat_tolerance`` x |centre loss| of the centre loss."""
    centre = float(losses[int((alphas == 0).nonzero()[0]), int((betas == 0).nonzero()[0])])
    finite = losses[losses.isfinite()]
    best = int(torch.where(losses.isfinite(), losses, torch.inf).argmin())
    i, j = divmod(best, len(betas))
    flat = ((losses - centre).abs() <= flat_tolerance * abs(centre)).double().mean()
    return {"center": centre, "min": float(finite.min()) if len(finite) else torch.nan,
            "max": float(finite.max()) if len(finite) else torch.nan,
            "argmin_alpha": float(alphas[i]), "argmin_beta": float(betas[j]),
            "flatness": float(flat), "flat_tolerance": flat_tolerance,
            "nonfinite_points": int((~losses.isfinite()).sum())}
