"""The DDP-equivalence pattern for any method: one ssl_step on 2 gloo ranks (b samples each) against
one process on the 2b concatenated samples, same initial weights.

``make_method()`` and ``make_views()`` must be module-level functions (mp.spawn pickles them by name);
both must be deterministic (seed inside). Methods are built with num_classes=0 (no probe), so every
parameter that requires grad takes part in the SSL loss, as DDP expects.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from ddp import run_distributed


class StepWrapper(torch.nn.Module):
    """What Lightning's DDP wrapper does: forward = the method's training loss."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, *views):
        return self.method.ssl_step(list(views)).loss


def snapshot(method, loss) -> dict:
    return {"loss": loss.detach().clone(),
            "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
            "buffers": {n: b.clone() for n, b in method.named_buffers()}}


def single_process_step(make_method: Callable, make_views: Callable) -> dict:
    method = make_method()
    loss = method.ssl_step(make_views()).loss
    loss.backward()
    return snapshot(method, loss)


def ddp_step(rank: int, world: int, make_method: Callable, make_views: Callable) -> dict:
    method = make_method()
    views = make_views()
    local = [v.chunk(world)[rank] for v in views]
    model = DistributedDataParallel(StepWrapper(method))  # keep a reference: its hooks sync the gradients
    loss = model(*local)
    loss.backward()
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    return snapshot(method, mean_loss / world)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


def max_grad_error(ranks: list[dict], ref: dict) -> float:
    return max(rel_err(r["grads"][n], g) for r in ranks for n, g in ref["grads"].items())


def run_both(make_method: Callable, make_views: Callable, out_dir) -> tuple[dict, list[dict]]:
    return single_process_step(make_method, make_views), run_distributed(ddp_step, make_method, make_views,
                                                                          out_dir=out_dir)


def assert_equivalent(ref: dict, ranks: list[dict], *, loss_tol: float = 1e-5, grad_tol: float = 1e-4,
                      buffers: Callable[[str], bool] = lambda name: True) -> None:
    """Loss and every gradient within relative tolerance; the selected buffers (BN running stats,
    queues, centers) equal on every rank."""
    assert ref["grads"], "the reference step produced no gradients"
    for r in ranks:
        assert rel_err(r["loss"], ref["loss"]) <= loss_tol, (r["loss"], ref["loss"])
        assert set(r["grads"]) == set(ref["grads"]), set(r["grads"]) ^ set(ref["grads"])
        for name, b in ref["buffers"].items():
            if buffers(name) and b.is_floating_point():
                torch.testing.assert_close(r["buffers"][name], b, rtol=1e-5, atol=1e-6, msg=name)
    assert max_grad_error(ranks, ref) <= grad_tol
