"""The one linear-algebra module: covariance, eigenspectrum, Cholesky whitening, the spectral
transformation (ST), IterNorm and the trace loss (W-MSE, INTL, ST and the spectrum monitor).

Shapes: x is (n, d), n samples of d features. ``axis`` follows the official INTL code:

- axis=1 ("batch whitening"): centre each feature over the batch, S = Xc^T Xc / (n - 1) is d x d,
  the output is Xc W;
- axis=0 ("channel whitening", INTL's default): centre each sample over its features,
  S = Xc Xc^T / (d - 1) is n x n, the output is W Xc.

Nothing here gathers across ranks: callers pass the GLOBAL batch (``gather_with_grad`` first).
Numerics: fp16/bf16 inputs are cast to fp32 with autocast off; Cholesky and eigendecomposition
run in fp64. The eigendecomposition backward uses divided differences of g instead of
1 / (lambda_i - lambda_j), so it is exact and finite for repeated eigenvalues. A non-finite
output (forward) or input gradient (backward) raises FloatingPointError naming the step and
what to try; ``context`` (e.g. "W-MSE") is prepended to that message.

When the checks raise (``CHECKS``): reading a device value makes the host wait for the device, a
synchronisation per check on a GPU (3-6 per training step of W-MSE, INTL and ST). So on a CPU, where
nothing is waited for, a check raises at once ("eager"); on an accelerator ("deferred") its flag is
copied to the host without waiting and read at the same check one call (one step) later, which then
raises with the same message, "(found one step later)". Meanwhile the failed output is made NaN, so
the step's loss is non-finite and the method's ``on_nonfinite`` guard undoes that step's update on
the device (methods/base.py): no value of it reaches the weights.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ssl_lightning.distributed import DelayedHostRead
from ssl_lightning.losses.common import fp32

__all__ = ["covariance", "eigenspectrum", "cholesky_whiten", "spectral_transform", "iternorm", "trace_loss",
           "iternorm_gain"]

TRACE_FLOOR = 1e-12  # a fully collapsed batch (tr S = 0) gives zeros instead of 0/0
_NEAR_EQUAL = 1e-8   # relative eigen-gap under which the divided difference becomes g'(midpoint)


def _check_matrix(x: torch.Tensor, name: str = "x", min_rows: int = 2) -> None:
    if x.dim() != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must be a 2-D tensor (N, D) with N >= {min_rows}, got shape {tuple(x.shape)}")


def covariance(x: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (d, d): covariance of the rows, centred, divided by n - 1 (``torch.cov(x.T)``)."""
    _check_matrix(x)
    xc = x - x.mean(dim=0, keepdim=True)
    return xc.T @ xc / (x.shape[0] - 1)


def eigenspectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``covariance(z)`` for z (N, D), in float64, sorted descending, clamped at 0
    (for N <= D at most N - 1 of them are non-zero). For monitoring: no gradient."""
    _check_matrix(z, "z")
    return torch.linalg.eigvalsh(covariance(z.detach().to(torch.float64))).flip(0).clamp_min(0.0)


# ---------------------------------------------------------------- safety
CHECKS = "auto"  # "eager" | "deferred" | "auto" (eager on a CPU, deferred on an accelerator): module doc
_pending: dict[str, DelayedHostRead] = {}  # per check site: the flags of the previous call


def _raise_if(bad: torch.Tensor, value: torch.Tensor, site: str, message: Callable[[float], str]) -> None:
    """Raises FloatingPointError(message(value)) where ``bad`` (0-dim bool, on the device) is True: at once
    ("eager"), or at this site's next call ("deferred", no host-device synchronisation)."""
    mode = CHECKS if CHECKS != "auto" else ("eager" if bad.device.type == "cpu" else "deferred")
    if mode == "eager":
        if bad.item():
            raise FloatingPointError(message(value.item()))
        return
    flags = torch.stack([bad.double(), value.double()])
    read = _pending.setdefault(site, DelayedHostRead(delay=1)).push(flags, tag=message)
    if read is not None and read[1][0]:
        _pending.clear()  # the other sites' flags of that call describe the same failure
        raise FloatingPointError(f"{read[0](read[1][1])} (found one step later)")


def _poisoned(out: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """out, or NaN everywhere where bad: a failure the host reads later must not leave finite garbage."""
    return out * torch.where(bad, float("nan"), 1.0).to(out.dtype)


def _guard(x: torch.Tensor, step: str, hint: str, context: str) -> torch.Tensor:
    """An alias of x whose gradient is checked: a non-finite gradient raises, naming the step."""
    if not x.requires_grad:
        return x
    alias = x.view_as(x)

    def check(grad: torch.Tensor) -> None:
        if grad is not None:
            _raise_if(~torch.isfinite(grad).all(), grad.new_zeros(()), f"{context}/{step}/backward",
                      lambda _: _message(context, f"{step} backward produced a non-finite gradient", hint))

    alias.register_hook(check)
    return alias


def _check_output(out: torch.Tensor, step: str, hint: str, context: str) -> torch.Tensor:
    _raise_if(~torch.isfinite(out).all(), out.new_zeros(()), f"{context}/{step}/forward",
              lambda _: _message(context, f"{step} produced non-finite values", hint))
    return out


def _message(context: str, what: str, hint: str) -> str:
    return f"{context + ': ' if context else ''}{what}; {hint}"


def _centred(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The matrix whose columns get whitened: rows = what the mean runs over (see module doc)."""
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (whiten samples, n x n) or 1 (whiten features, d x d), got {axis}")
    y = x if axis == 1 else x.T
    return y - y.mean(dim=0, keepdim=True)


def _restore(y: torch.Tensor, axis: int) -> torch.Tensor:
    return y if axis == 1 else y.T


# ---------------------------------------------------------------- Cholesky whitening (W-MSE)
def cholesky_whiten(x: torch.Tensor, *, eps: float = 0.0, context: str = "") -> torch.Tensor:
    """W-MSE's whitening of x (n, d): centre the rows, S = (1 - eps) cov + eps I, L = chol(S),
    return (x - mean) L^-T (n, d), whose covariance is the identity (for eps = 0).

    Computed in fp64; returns fp32 (fp64 for fp64 input). Needs n > d unless eps > 0: a singular S
    raises FloatingPointError instead of producing NaN.
    """
    _check_matrix(x)
    hint = (f"the covariance of {x.shape[0]} samples in {x.shape[1]} dims is singular or ill-conditioned: "
            "whiten more samples than dimensions (n > d), set eps > 0 (e.g. 1e-3), or check for collapse")
    with fp32(x) as (x,):
        dtype = x.dtype
        x = _guard(x, "cholesky_whiten", hint, context)
        xc = _centred(x.double(), axis=1)
        cov = xc.T @ xc / (xc.shape[0] - 1)
        if eps:
            cov = (1 - eps) * cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        chol, info = torch.linalg.cholesky_ex(cov)
        failed = info != 0
        _raise_if(failed, info, f"{context}/cholesky_whiten/factor", lambda minor: _message(
            context, f"cholesky_whiten: Cholesky factorisation failed (leading minor {minor:.0f} not positive)", hint))
        out = _poisoned(torch.linalg.solve_triangular(chol, xc.T, upper=False).T, failed)
        return _check_output(out.to(dtype), "cholesky_whiten", hint, context)


# ---------------------------------------------------------------- spectral transformation (ST)
class _SymmetricPower(torch.autograd.Function):
    """S^e = U diag(lambda^e) U^T for a symmetric positive-definite S (fp64).

    Backward (Daleckii-Krein): dS = U (K o U^T sym(G) U) U^T with K_ij the divided difference
    (g(l_i) - g(l_j)) / (l_i - l_j), and g'(l) where the eigenvalues (nearly) coincide. The usual
    eigh backward divides by l_i - l_j instead and is infinite for repeated eigenvalues.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, exponent: float, on_singular: Callable[[float], str],
                site: str) -> torch.Tensor:
        lam, u = torch.linalg.eigh(s)
        singular = ~(lam[0] > 0)
        _raise_if(singular, lam[0], site, on_singular)
        g = lam.pow(exponent)
        ctx.save_for_backward(lam, u, g)
        ctx.exponent = exponent
        return _poisoned((u * g) @ u.T, singular)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        lam, u, g = ctx.saved_tensors
        li, lj = lam[:, None], lam[None, :]
        gap = li - lj
        near = gap.abs() <= _NEAR_EQUAL * torch.maximum(li.abs(), lj.abs())
        derivative = ctx.exponent * ((li + lj) / 2).pow(ctx.exponent - 1)
        k = torch.where(near, derivative, (g[:, None] - g[None, :]) / torch.where(near, 1.0, gap))
        inner = u.T @ ((grad + grad.T) / 2) @ u
        return u @ (k * inner) @ u.T, None, None, None


def spectral_transform(x: torch.Tensor, *, power: float = 0.5, eps: float = 1e-4, axis: int = 0,
                       context: str = "") -> torch.Tensor:
    """Spectral transformation with g(lambda) = lambda^-power of x (n, d) (Weng et al., ICLR 2024).

    S = U diag(lambda) U^T is the covariance along ``axis`` (module doc) plus a ridge
    eps * tr(S) / k (k = size of S, so eps is relative to the mean eigenvalue and the transform is
    scale invariant); the output U g(diag(lambda)) U^T applied to the centred x has eigenvalues
    lambda^(1 - 2 power): power 0.5 whitens, power 0 only centres. fp64 inside; returns fp32.
    eps = 0 is exact but raises on a singular S (batch smaller than the whitened dimension).
    """
    _check_matrix(x)
    if eps < 0:
        raise ValueError(f"spectral_transform eps must be >= 0, got {eps}")
    hint = (f"raise eps (now {eps}), use axis 0 when the batch is smaller than the embedding dim "
            "(axis 1 needs more samples than dims), or lower the learning rate")
    with fp32(x) as (x,):
        dtype = x.dtype
        x = _guard(x, "spectral_transform", hint, context)
        xc = _centred(x.double(), axis)
        s = xc.T @ xc / (xc.shape[0] - 1)
        k = s.shape[0]
        if eps:
            ridge = eps * (s.diagonal().sum() / k).clamp_min(TRACE_FLOOR)
            s = s + ridge * torch.eye(k, dtype=s.dtype, device=s.device)

        def on_singular(smallest: float) -> str:
            return _message(context, f"spectral_transform: the {k}x{k} covariance is not positive definite "
                            f"(smallest eigenvalue {smallest:.3g})", hint)

        out = _restore(xc @ _SymmetricPower.apply(s, -power, on_singular, f"{context}/spectral_transform/eigh"), axis)
        return _check_output(out.to(dtype), "spectral_transform", hint, context)


# ---------------------------------------------------------------- IterNorm + trace loss (INTL)
def iternorm_gain(x: float, iters: int) -> float:
    """h_T(x) = x p_T(x)^2, p_0 = 1, p_k = 1.5 p_{k-1} - 0.5 x p_{k-1}^3: the output eigenvalue of
    IterNorm for an input eigenvalue that is a fraction x of the trace (1 after T -> inf)."""
    p = 1.0
    for _ in range(iters):
        p = 1.5 * p - 0.5 * x * p**3
    return x * p**2


def iternorm(x: torch.Tensor, *, iters: int = 4, axis: int = 0, context: str = "") -> torch.Tensor:
    """IterNorm (Huang et al., 2019) of x (n, d) as in the official INTL code, without its eps.

    S along ``axis`` (module doc), S_N = S / tr(S), P_0 = I, P_k = 1.5 P_{k-1} - 0.5 P_{k-1}^3 S_N,
    W = P_T / sqrt(tr S). Only matrix products: no decomposition, finite gradients for any
    spectrum. An eigenvalue that is a fraction x of tr(S) comes out as ``iternorm_gain(x, iters)``,
    so T = 4 does not whiten fully. tr(S) is clamped at TRACE_FLOOR. fp32 (fp64 for fp64 input).
    """
    _check_matrix(x)
    if iters < 0:
        raise ValueError(f"iternorm iters must be >= 0, got {iters}")
    hint = "lower the learning rate or raise warmup_epochs; check the embeddings for NaN/Inf before whitening"
    with fp32(x) as (x,):
        x = _guard(x, "iternorm", hint, context)
        xc = _centred(x, axis)
        s = xc.T @ xc / (xc.shape[0] - 1)
        trace = s.diagonal().sum().clamp_min(TRACE_FLOOR)
        s_norm = s / trace
        p = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        for _ in range(iters):
            p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ s_norm
        out = _restore(xc @ (p / trace.sqrt()), axis)
        return _check_output(out, "iternorm", hint, context)


def trace_loss(z: torch.Tensor, *, axis: int = 0) -> torch.Tensor:
    """INTL's trace loss of a whitened batch z (n, d): centre along ``axis`` (module doc), take the
    variances d_j = sum of squares / (m - 1) of the k whitened columns, return sum_j (d_j - 1)^2.
    For axis 0 the columns are the n samples. Scalar, fp32 (fp64 for fp64 input)."""
    _check_matrix(z, "z")
    with fp32(z) as (z,):
        zc = _centred(z, axis)
        variances = zc.pow(2).sum(dim=0) / (zc.shape[0] - 1)
        return (variances - 1).pow(2).sum()
