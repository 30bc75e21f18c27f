"""Hessian curvature of a checkpoint's landscape objective (Li et al. 2018; PyHessian): the extreme
eigenvalues and trace at the trained weights, and the (lambda_min, lambda_max) map over the plane.

Both run on the same fixed batches, masks and directions as the loss landscape (method_plane), with
the method's weights and buffers restored bit for bit afterwards.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection

import torch

from ssl_lightning.distributed import local_only
from ssl_lightning.landscape.grid import curvature_grid, hessian_parameters, preserved_state
from ssl_lightning.landscape.hessian import hessian_extremes, hessian_trace
from ssl_lightning.landscape.objectives import at_checkpoint_step, method_objective, method_plane
from ssl_lightning.methods import SSLMethod


def method_curvature(method: SSLMethod, data: dict, axis: torch.Tensor, *, loss: str = "pretrain",
                     num_batches: int = 4, batch_size: int | None = None, seed: int = 0, epoch: int = 0,
                     global_step: int = 0, iters: int = 20, tol: float = 1e-3) -> torch.Tensor:
    """(len(axis), len(axis), 2) float64: (lambda_min, lambda_max) of the Hessian of ``loss`` with
    respect to the moved parameters at theta* + axis[i] d1 + axis[j] d2, the plane of method_landscape
    with the same arguments; grid points split over ranks."""
    objective, moved, d1, d2 = method_plane(method, data, loss=loss, num_batches=num_batches, batch_size=batch_size,
                                            seed=seed)
    with at_checkpoint_step(method, epoch=epoch, global_step=global_step):
        return curvature_grid(method, objective, moved, d1, d2, axis, axis, iters=iters, tol=tol, seed=seed)


def objective_curvature(method: SSLMethod, objective: Callable[[], torch.Tensor], moved: Collection[str], *,
                        iters: int = 100, tol: float = 1e-3, seed: int = 0,
                        trace_samples: int = 50) -> dict[str, float]:
    """lambda_max, lambda_min, ratio |lambda_min / lambda_max| (Lanczos, at most ``iters`` products,
    relative residual ``tol``) and the Hutchinson trace with its standard error (``trace_samples``
    Rademacher vectors) of the Hessian of ``objective()`` with respect to the parameters named in
    ``moved``, at the method's current weights; plus their number and the seconds it took. Every
    process computes all of it; parameters and buffers are restored after each estimate."""
    start = time.time()
    with local_only(), torch.enable_grad(), hessian_parameters(method, moved) as params:
        with preserved_state(method):  # ssl_step may push to queues: both estimates start from the checkpoint's
            lambda_min, lambda_max = hessian_extremes(objective, params, iters=iters, tol=tol, seed=seed)
        with preserved_state(method):
            trace, trace_stderr = hessian_trace(objective, params, samples=trace_samples, seed=seed)
    return {"lambda_max": lambda_max, "lambda_min": lambda_min, "ratio": abs(lambda_min / lambda_max),
            "trace": trace, "trace_stderr": trace_stderr, "parameters": sum(p.numel() for p in params),
            "curvature_seconds": time.time() - start}


def point_curvature(method: SSLMethod, data: dict, *, loss: str = "pretrain", num_batches: int = 4,
                    batch_size: int | None = None, seed: int = 0, epoch: int = 0, global_step: int = 0,
                    iters: int = 100, tol: float = 1e-3, trace_samples: int = 50) -> dict[str, float]:
    """objective_curvature of ``loss`` (method_objective: the landscape's fixed batches and moved
    parameters) at the trained weights, seen at the checkpoint's epoch and step."""
    objective, moved = method_objective(method, data, loss=loss, num_batches=num_batches, batch_size=batch_size,
                                        seed=seed)
    with at_checkpoint_step(method, epoch=epoch, global_step=global_step):
        return objective_curvature(method, objective, moved, iters=iters, tol=tol, seed=seed,
                                   trace_samples=trace_samples)
