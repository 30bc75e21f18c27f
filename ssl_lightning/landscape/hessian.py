"""Curvature of a loss from Hessian-vector products only (no dense Hessian): Lanczos for the extreme
eigenvalues (Li et al. 2018's |lambda_min / lambda_max|, PyHessian's top eigenvalues) and Hutchinson's
estimate of the trace. Pure functions of ``loss_fn`` and a list of parameters.

Attention kernels: fused / flash scaled-dot-product attention has no double backward, so the loss
whose Hessian is taken is computed inside ``math_attention()``; the math kernel computes the same
function (tests/test_hessian.py checks the products against finite differences of fused-kernel gradients).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[], torch.Tensor]
MatVec = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def math_attention() -> Iterator[None]:
    """F.scaled_dot_product_attention (timm ViTs, nn.MultiheadAttention) on its math kernel, the one
    with a double backward."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def hessian_vector_operator(loss_fn: LossFn, params: Sequence[torch.Tensor]) -> tuple[MatVec, int]:
    """(v -> H v on flat (n,) vectors, n): H the Hessian of the scalar ``loss_fn()`` with respect to
    ``params`` (n = their total number of elements, flattened in order). The gradient graph is built
    once (one call of loss_fn); each product is one more backward through it (Pearlmutter's trick).
    Parameters the gradient does not depend on contribute zero rows and columns."""
    params = list(params)
    fixed = [tuple(p.shape) for p in params if not p.requires_grad]
    if fixed:
        raise ValueError(f"parameters of shapes {fixed} do not require grad, so the loss has no Hessian in them; "
                         "pass only parameters with requires_grad=True")
    with math_attention():
        loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in params]

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        parts = [part.view_as(p).to(p.dtype) for part, p in zip(vector.split(sizes), params)]
        if not live:
            return torch.zeros_like(vector)
        products = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[parts[i] for i in live],
                                       retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1).to(vector.dtype)
                          for p, h in zip(params, products)])

    return matvec, sum(sizes)


def lanczos_ritz_values(matvec: MatVec, n: int, *, wanted: Callable[[int], list[int]], iters: int, tol: float,
                        seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Ritz values (ascending) of the symmetric n x n operator ``matvec`` after Lanczos with full
    reorthogonalisation from a seeded Gaussian start, stopped after ``iters`` steps, at an invariant
    subspace, or once the Ritz values at indices ``wanted(m)`` (of the m so far) have residual norms
    |beta_m s_{m,i}| <= tol * max |Ritz value|. Memory: (iters + 1) vectors of n ``dtype`` values."""
    steps = min(iters, n)
    basis = torch.empty(steps, n, dtype=dtype, device=device)
    q = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)
    q /= q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        basis[j] = q
        w = matvec(q)
        alphas.append(float(w @ q))
        for _ in range(2):  # twice is enough (Kahan), keeps the Ritz values free of spurious copies
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = float(w.norm())
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors = torch.linalg.eigh(tridiagonal)
        scale = float(ritz.abs().max()) or 1.0
        residuals = beta * vectors[-1, wanted(j + 1)].abs()
        if beta <= 1e-12 * scale or bool((residuals <= tol * scale).all()):
            return ritz
        betas.append(beta)
        q = w / beta
    return ritz


def hessian_eigenvalues(loss_fn: LossFn, params: Sequence[torch.Tensor], *, k: int = 1, largest: bool = True,
                        iters: int = 100, tol: float = 1e-6, seed: int = 0) -> torch.Tensor:
    """(k,) float64: the k largest eigenvalues of the Hessian of ``loss_fn()`` with respect to
    ``params`` (descending), or with largest=False the k smallest (ascending; negative ones included,
    lambda_min first). Lanczos on Hessian-vector products (``iters`` at most, stopping at relative
    residual ``tol``), start vector seeded with ``seed``; the parameters are not modified."""
    params = list(params)
    n = sum(p.numel() for p in params)
    if not 1 <= k <= min(n, iters):
        raise ValueError(f"k {k} must be between 1 and min(number of parameters {n}, iters {iters}); "
                         "lower k or raise iters")
    matvec, _ = hessian_vector_operator(loss_fn, params)
    pick = (lambda m: list(range(m - min(k, m), m))) if largest else (lambda m: list(range(min(k, m))))
    ritz = lanczos_ritz_values(matvec, n, wanted=pick, iters=iters, tol=tol, seed=seed,
                               dtype=_vector_dtype(params), device=params[0].device)
    return ritz.flip(0)[:k] if largest else ritz[:k]


def hessian_extremes(loss_fn: LossFn, params: Sequence[torch.Tensor], *, iters: int = 100, tol: float = 1e-6,
                     seed: int = 0) -> tuple[float, float]:
    """(lambda_min, lambda_max) of the Hessian from ONE Lanczos run that stops when both ends have
    converged (half the products of two hessian_eigenvalues calls)."""
    params = list(params)
    matvec, n = hessian_vector_operator(loss_fn, params)
    ritz = lanczos_ritz_values(matvec, n, wanted=lambda m: [0, m - 1], iters=iters, tol=tol, seed=seed,
                               dtype=_vector_dtype(params), device=params[0].device)
    return float(ritz[0]), float(ritz[-1])


def hessian_trace(loss_fn: LossFn, params: Sequence[torch.Tensor], *, samples: int = 50,
                  seed: int = 0) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H): the mean of v^T H v over ``samples`` seeded Rademacher vectors v,
    with its standard error (std / sqrt(samples))."""
    params = list(params)
    if samples < 2:
        raise ValueError(f"samples {samples} must be >= 2 (the standard error needs two); use e.g. 50")
    matvec, n = hessian_vector_operator(loss_fn, params)
    generator, dtype = torch.Generator().manual_seed(seed), _vector_dtype(params)
    values = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(params[0].device, dtype)
        values.append(float(v @ matvec(v)))
    estimates = torch.tensor(values, dtype=torch.float64)
    return float(estimates.mean()), float(estimates.std() / samples ** 0.5)


def _vector_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 for float64 parameters, else float32 (bf16/fp16 parameters are not accurate enough)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
