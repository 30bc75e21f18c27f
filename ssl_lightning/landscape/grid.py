"""The model-agnostic part of a loss landscape (Li et al. 2018): filter-normalised random directions
and a loss evaluated on the plane theta(a, b) = theta* + a d1 + b d2, split over ranks."""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ssl_lightning.distributed import all_reduce_no_grad, local_only, rank, world_size

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


def loss_grid(model: nn.Module, loss_fn: Callable[[], float], d1: Direction, d2: Direction,
              alphas: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """(len(alphas), len(betas)) float64 matrix of ``loss_fn()`` at theta* + a d1 + b d2.

    Every point starts from the model's parameters AND buffers as they were on entry (ssl_step may
    push to queues or move centers), and the model holds them again on exit. In a process group,
    rank r evaluates the flat points r, r + W, ... on whole batches (collectives are local inside
    loss_fn) and every rank returns the full grid (sum of zero-filled matrices).
    """
    losses = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
    ranks, me = world_size(), rank()
    with preserved_state(model) as saved, local_only(), torch.no_grad():
        for k in range(me, losses.numel(), ranks):
            i, j = divmod(k, len(betas))
            move_to(model, saved, d1, d2, float(alphas[i]), float(betas[j]))
            losses[i, j] = loss_fn()
            restore(model, saved)
    return all_reduce_no_grad(losses.to(_collective_device())).cpu()


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
