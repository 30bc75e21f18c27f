"""ssl_lightning.spectral against float64 references written here.

Numbers checked and why:
- Cholesky whitening and ST with p = 0.5 give covariance I (|err| < 1e-5 in fp32, 1e-10 in fp64);
- ST output covariance = U diag(lambda^(1 - 2p)) U^T of the input's (p in 0 .. 1, rel. 1e-8);
- IterNorm of an isotropic input of m samples = h_T(1/m) I with h_T from the recursion
  p_k = 1.5 p_{k-1} - 0.5 x p_{k-1}^3, h_T = x p_T^2 (h_4(1/12) = 0.877, h_4(1/256) = 0.095: T = 4
  is far from white at INTL's batch sizes); the trace loss is then m (1 - h_T(1/m))^2; for any input
  the output spectrum is h_T(lambda_i / tr S) (rel. 1e-9);
- gradients stay finite for rank-deficient, collapsed, fp16 and exactly isotropic inputs, where the
  plain eigh backward (negative control) is not; eigenvalues 1e-9 or 1e-13 apart give the gradient
  of the equal case (rel. 1e-8) where the textbook path in fp32 is NaN or off by > 1e-3; failures
  raise FloatingPointError naming the step.
"""
import math

import pytest
import torch

from ssl_lightning import spectral

F64 = torch.float64


def h_ref(x: float, iters: int) -> float:
    p = 1.0
    for _ in range(iters):
        p = 1.5 * p - 0.5 * x * p**3
    return x * p * p


def isotropic(m: int, d: int, axis: int, scale: float = 3.0) -> torch.Tensor:
    """An input whose covariance along ``axis`` is exactly scale * I (m x m), from d values each:
    m samples of d features (axis 0) or d samples of m features (axis 1)."""
    rows = d  # what the mean runs over: the features (axis 0) or the samples (axis 1)
    basis = torch.randn(rows, m, dtype=F64, generator=torch.Generator().manual_seed(m))
    basis = basis - basis.mean(dim=0)
    q, _ = torch.linalg.qr(basis)  # columns orthonormal and orthogonal to the ones vector
    y = q * math.sqrt(scale * (rows - 1))
    return y.T if axis == 0 else y


def anisotropic(n: int, d: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=F64) * torch.logspace(0, -1.5, d, dtype=F64) + 2.0).to(dtype)


def cov_along(y: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.cov(y.T) if axis == 1 else torch.cov(y)


# ---------------------------------------------------------------- whitening and ST spectra
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-10)])
def test_whitening_gives_identity_covariance(dtype, tol):
    x = anisotropic(64, 8, dtype=dtype)
    eye = torch.eye(8, dtype=F64)
    assert (torch.cov(spectral.cholesky_whiten(x).double().T) - eye).abs().max() < tol
    assert (torch.cov(spectral.spectral_transform(x, eps=0.0, axis=1).double().T) - eye).abs().max() < tol
    wide = anisotropic(8, 64, dtype=dtype)  # axis 0: the 8 samples are whitened against each other
    assert (torch.cov(spectral.spectral_transform(wide, eps=0.0, axis=0).double()) - eye).abs().max() < tol
    # the default ridge delta = 1e-4 x mean eigenvalue: output eigenvalues lambda / (lambda + delta)
    lam, u = torch.linalg.eigh(torch.cov(x.double().T))
    shrunk = (u * (lam / (lam + 1e-4 * lam.mean()))) @ u.T
    assert (torch.cov(spectral.spectral_transform(x, axis=1).double().T) - shrunk).abs().max() < tol


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("power", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_st_output_spectrum_is_lambda_to_one_minus_two_p(power, axis):
    x = anisotropic(40, 10) if axis == 1 else anisotropic(10, 40)
    lam, u = torch.linalg.eigh(cov_along(x, axis))
    expected = (u * lam.pow(1 - 2 * power)) @ u.T
    out = cov_along(spectral.spectral_transform(x, power=power, eps=0.0, axis=axis), axis)
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


def test_eigenspectrum_is_the_covariance_spectrum():
    x = anisotropic(50, 6)
    ref = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)
    torch.testing.assert_close(spectral.eigenspectrum(x), ref, rtol=1e-10, atol=0)


# ---------------------------------------------------------------- IterNorm and the trace loss
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("m,iters", [(12, 4), (12, 1), (40, 4), (5, 7)])
def test_iternorm_of_isotropic_input_is_h_T_identity(m, iters, axis):
    x = isotropic(m, 3 * m, axis)
    assert torch.allclose(cov_along(x, axis), 3.0 * torch.eye(m, dtype=F64), atol=1e-12)
    h = h_ref(1 / m, iters)
    for dtype, tol in [(F64, 1e-12), (torch.float32, 1e-5)]:
        out = spectral.iternorm(x.to(dtype), iters=iters, axis=axis).double()
        torch.testing.assert_close(cov_along(out, axis), h * torch.eye(m, dtype=F64), rtol=0, atol=tol)
        tl = spectral.trace_loss(out, axis=axis).item()
        assert tl == pytest.approx(m * (1 - h) ** 2, rel=tol * 100, abs=tol)
    assert h_ref(1 / 12, 1) == pytest.approx((1 / 12) * (1.5 - 0.5 / 12) ** 2, rel=1e-15)  # 0.17723, by hand
    assert h_ref(1 / 256, 4) == pytest.approx(0.09515, abs=1e-5)  # T = 4 at B = 256: far from white
    assert spectral.iternorm_gain(1 / m, iters) == pytest.approx(h, rel=1e-15)


@pytest.mark.parametrize("axis", [0, 1])
def test_iternorm_output_spectrum_is_h_T_of_normalised_eigenvalues(axis):
    x = anisotropic(30, 8) if axis == 1 else anisotropic(8, 30)
    lam, u = torch.linalg.eigh(cov_along(x, axis))
    h = torch.tensor([h_ref(v, 4) for v in (lam / lam.sum()).tolist()], dtype=F64)
    torch.testing.assert_close(cov_along(spectral.iternorm(x, axis=axis), axis), (u * h) @ u.T,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_trace_loss_matches_a_loop(axis):
    z = anisotropic(7, 5)
    cols = z.tolist() if axis == 0 else z.T.tolist()
    ref = 0.0
    for col in cols:  # axis 0: one column per sample (centred over its features)
        mean = sum(col) / len(col)
        ref += (sum((v - mean) ** 2 for v in col) / (len(col) - 1) - 1) ** 2
    assert spectral.trace_loss(z, axis=axis).item() == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------- numerical safety
def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return x.grad


TRANSFORMS = {
    "iternorm": lambda x: spectral.iternorm(x),
    "iternorm_axis1": lambda x: spectral.iternorm(x, axis=1),
    "st": lambda x: spectral.spectral_transform(x),
    "st_axis1": lambda x: spectral.spectral_transform(x, axis=1),
    "st_p025": lambda x: spectral.spectral_transform(x, power=0.25),
    "cholesky_eps": lambda x: spectral.cholesky_whiten(x, eps=1e-3),
}
g = torch.Generator().manual_seed(3)
HARD_INPUTS = {
    "rank_deficient": torch.randn(6, 3, generator=g) @ torch.randn(3, 16, generator=g),  # rank 3 < 6 < 16
    "collapsed": torch.ones(8, 16) * torch.randn(1, 16, generator=g),  # every sample identical
    "fp16": (torch.randn(8, 16, generator=g) * 300).half(),
}


@pytest.mark.parametrize("name", list(HARD_INPUTS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_gradients_are_finite_for_ill_conditioned_inputs(transform, name):
    x = HARD_INPUTS[name]
    out = TRANSFORMS[transform](x.clone())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.isfinite(_grad(TRANSFORMS[transform], x)).all()


def _naive_st(x: torch.Tensor) -> torch.Tensor:  # the textbook eigh path, for the negative control
    xc = x - x.mean(dim=0)
    lam, u = torch.linalg.eigh(xc.T @ xc / (x.shape[0] - 1))
    return xc @ (u * lam.pow(-0.5)) @ u.T


def test_repeated_eigenvalues_have_exact_finite_gradients():
    x = isotropic(4, 10, axis=1)  # covariance exactly 3 I: all four eigenvalues equal
    naive = _grad(_naive_st, x)  # negative control: eigh's backward divides by 0 (older torch: inf/NaN;
    # newer torch masks the equal pairs, which gives a finite but wrong gradient)
    exact = _grad(lambda t: spectral.spectral_transform(t, eps=0.0, axis=1), x)
    assert not torch.isfinite(naive).all() or (naive - exact).norm() / exact.norm() > 1e-3, "negative control"
    for power in (0.5, 0.25):
        fn = lambda t: spectral.spectral_transform(t, power=power, eps=0.0, axis=1)  # noqa: E731
        assert torch.isfinite(_grad(fn, x)).all()
        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-5,
                                         fast_mode=True)
    # nearly equal (relative gaps 1e-9, 1e-13): the limit of the equal case (divided differences, or
    # g' below a gap of 1e-8), while the textbook path in fp32 is NaN or off by > 1e-3
    fn = lambda t: spectral.spectral_transform(t, eps=0.0, axis=1)  # noqa: E731
    exact = _grad(fn, x)
    for gap in (1e-9, 1e-13):
        near = x * (1 + gap * torch.arange(4, dtype=F64))
        assert (_grad(fn, near) - exact).norm() / exact.norm() < 1e-8
        naive = _grad(_naive_st, near.float()).double()
        assert not torch.isfinite(naive).all() or (naive - exact).norm() / exact.norm() > 1e-3
    generic = anisotropic(12, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: spectral.spectral_transform(t, power=0.3, axis=1), (generic,),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: spectral.iternorm(t, axis=0), (generic,), fast_mode=True)


def test_failures_name_the_step_and_the_fix():
    narrow = torch.randn(6, 16)  # 6 samples cannot whiten 16 dims
    with pytest.raises(FloatingPointError, match=r"W-MSE: cholesky_whiten.*n > d.*eps > 0"):
        spectral.cholesky_whiten(narrow, context="W-MSE")
    with pytest.raises(FloatingPointError, match=r"spectral_transform: the 16x16 covariance is not positive.*eps"):
        spectral.spectral_transform(narrow, eps=0.0, axis=1)
    x = torch.randn(8, 16, requires_grad=True)
    out = spectral.iternorm(x, context="INTL")
    with pytest.raises(FloatingPointError, match=r"INTL: iternorm backward produced a non-finite gradient"):
        (out * float("inf")).sum().backward()
    with pytest.raises(FloatingPointError, match="iternorm produced non-finite values"):
        spectral.iternorm(torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        spectral.covariance(torch.zeros(5))


def test_deferred_checks_raise_one_call_later_and_poison_the_failed_output(monkeypatch):
    """On an accelerator ("deferred") a check does not read its flag at once (that would make the host wait
    for the device): the failed Cholesky's output is NaN (so the step's loss is non-finite and on_nonfinite
    undoes the update), and the same check raises one call later with its message."""
    from ssl_lightning import spectral

    monkeypatch.setattr(spectral, "CHECKS", "deferred")
    monkeypatch.setattr(spectral, "_pending", {})
    singular = torch.zeros(4, 8)  # a collapsed batch: covariance 0, the factorisation fails at minor 1
    out = spectral.cholesky_whiten(singular, context="W-MSE")
    assert torch.isnan(out).all()
    healthy = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(FloatingPointError, match=r"W-MSE: cholesky_whiten: Cholesky factorisation failed "
                                                 r"\(leading minor 1 not positive\).*\(found one step later\)"):
        spectral.cholesky_whiten(healthy, context="W-MSE")
    assert torch.isfinite(spectral.cholesky_whiten(healthy, context="W-MSE")).all(), "after raising, a clean slate"
    assert torch.isfinite(spectral.cholesky_whiten(healthy, context="W-MSE")).all()
