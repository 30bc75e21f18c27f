"""Hessian curvature from Hessian-vector products: Lanczos recovers the known spectrum of a quadratic
(negative eigenvalues included), Hutchinson's trace, products that equal finite differences of gradients
of a ViT computed with the fused attention kernel, and the convexity map of functions whose Hessian is
known at every point."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.landscape import (
    convex_fraction,
    convexity_ratio,
    hessian_eigenvalues,
    hessian_extremes,
    hessian_trace,
)
from ssl_lightning.landscape.grid import curvature_grid, parse_grid
from ssl_lightning.landscape.hessian import hessian_vector_operator
from ssl_lightning.models.backbones import build_backbone

# A 12 x 12 symmetric matrix with these eigenvalues (distinct, 4 negative) in a random orthonormal basis.
SPECTRUM = torch.tensor([-3.0, -1.5, -0.7, -0.2, 0.1, 0.4, 0.9, 1.3, 2.0, 4.0, 7.0, 9.5], dtype=torch.float64)


def quadratic(spectrum: torch.Tensor = SPECTRUM):
    """(loss_fn, params, A): L = 1/2 z^T A z + b^T z, z the concatenation of two float64 parameters
    (shapes (3, 2) and (6,)), so the Hessian is exactly A wherever it is evaluated."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    a = basis @ torch.diag(spectrum) @ basis.T
    b = torch.randn(12, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        z = torch.cat([w.flatten(), c])
        return 0.5 * z @ a @ z + b @ z

    return loss, [w, c], a


def test_lanczos_recovers_the_largest_and_the_negative_smallest_eigenvalues():
    loss, params, _ = quadratic()
    before = [p.detach().clone() for p in params]
    top = hessian_eigenvalues(loss, params, k=3, largest=True, tol=1e-10)
    bottom = hessian_eigenvalues(loss, params, k=3, largest=False, tol=1e-10)
    print(f"top {top.tolist()} bottom {bottom.tolist()}")
    torch.testing.assert_close(top, torch.tensor([9.5, 7.0, 4.0], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(bottom, torch.tensor([-3.0, -1.5, -0.7], dtype=torch.float64), atol=1e-4, rtol=0)
    lambda_min, lambda_max = hessian_extremes(loss, params, tol=1e-10)
    assert lambda_min == pytest.approx(-3.0, abs=1e-4) and lambda_max == pytest.approx(9.5, abs=1e-4)
    assert all(torch.equal(p, q) for p, q in zip(params, before)), "the parameters are not modified"
    with pytest.raises(ValueError, match="k 13 must be between 1 and min"):
        hessian_eigenvalues(loss, params, k=13)
    with pytest.raises(ValueError, match=r"shapes \[\(6,\)\] do not require grad"):
        hessian_eigenvalues(loss, [params[0], params[1].detach()])


def test_hutchinson_trace():
    """Exact for a diagonal Hessian (v_i^2 = 1, so v^T D v = tr D for every Rademacher v, standard error 0);
    for the dense A of the quadratic, within 4 standard errors of tr A = sum(SPECTRUM) = 19.8."""
    d = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    trace, stderr = hessian_trace(lambda: 0.5 * (d * x * x).sum(), [x], samples=5)
    assert trace == pytest.approx(4.5, abs=1e-12) and stderr == pytest.approx(0.0, abs=1e-12)
    loss, params, _ = quadratic()
    trace, stderr = hessian_trace(loss, params, samples=400, seed=1)
    print(f"dense trace {trace:.3f} +- {stderr:.3f}, exact {float(SPECTRUM.sum()):.3f}")
    assert abs(trace - float(SPECTRUM.sum())) < 4 * stderr and 0 < stderr < 2


def test_products_equal_finite_differences_of_fused_attention_gradients():
    """A float64 2-block ViT: H v from the math kernel's double backward equals
    (g(theta + eps v) - g(theta - eps v)) / (2 eps), g computed with the default (fused CPU) attention
    kernel, to 1e-6 relative (central differences err by O(eps^2) = 1e-10 here): the switch of kernel
    does not change the function. Without the switch the double backward fails."""
    torch.manual_seed(0)
    vit, _ = build_backbone("vit_tiny", in_chans=1, image_size=8, embed_dim=16, depth=2, num_heads=2, patch_size=4)
    vit = vit.double().eval()
    head = nn.Linear(16, 3, dtype=torch.float64)
    images, labels = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    params = list(vit.parameters())

    def loss() -> torch.Tensor:
        return F.cross_entropy(head(vit(images)), labels)

    with pytest.raises(RuntimeError, match="not implemented"):  # the fused kernel really is the default here
        grads = torch.autograd.grad(loss(), params, create_graph=True)
        torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
    matvec, n = hessian_vector_operator(loss, params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v /= v.norm()  # a step of eps in parameter space
    hv = matvec(v)
    eps, sizes = 1e-5, [p.numel() for p in params]

    def flat_grad_at(step: float) -> torch.Tensor:
        with torch.no_grad():
            for p, part in zip(params, v.split(sizes)):
                p += step * part.view_as(p)
        g = torch.cat([x.flatten() for x in torch.autograd.grad(loss(), params)])
        with torch.no_grad():
            for p, part in zip(params, v.split(sizes)):
                p -= step * part.view_as(p)
        return g

    finite = (flat_grad_at(eps) - flat_grad_at(-eps)) / (2 * eps)
    error = float((hv - finite).norm() / finite.norm())
    print(f"|Hv - finite difference| / |finite difference| = {error:.2e}, |Hv| = {float(hv.norm()):.3f}")
    assert error < 1e-6 and float(hv.norm()) > 1.0


class XY(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["valley", "saddle", "bowl"])
def test_convexity_map_of_known_functions(name):
    """On the plane (x, y) = (a, b) around 0, the Hessian is known at every point:
    valley x^2 + y^4/12 - y^2/2: diag(2, y^2 - 1), negative for |y| < 1; saddle x^2 - y^2: diag(2, -2);
    bowl x^2 + y^2: 2 I. At y in {-2, -1, 0, 1, 2}: lambda_min = min(2, y^2 - 1), lambda_max = max(2, y^2 - 1).
    Convex (lambda_min >= -0.1 |lambda_max|): the valley except y = 0 (4/5 of the grid), the bowl
    everywhere (though its |ratio| is 1), the saddle nowhere."""
    model = XY()
    x, y = model.w[0], model.w[1]
    loss = {"valley": lambda: x ** 2 + y ** 4 / 12 - y ** 2 / 2, "saddle": lambda: x ** 2 - y ** 2,
            "bowl": lambda: x ** 2 + y ** 2}[name]
    axis = parse_grid("-2:2:5")
    d1 = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    d2 = {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    grid = curvature_grid(model, loss, {"w"}, d1, d2, axis, axis, iters=2, tol=1e-12)
    yy = axis.expand(5, 5)  # yy[i, j] = beta_j
    second = {"valley": yy ** 2 - 1, "saddle": torch.full((5, 5), -2.0, dtype=torch.float64),
              "bowl": torch.full((5, 5), 2.0, dtype=torch.float64)}[name]
    torch.testing.assert_close(grid[..., 0], second.clamp(max=2.0), atol=1e-10, rtol=0)
    torch.testing.assert_close(grid[..., 1], second.clamp(min=2.0), atol=1e-10, rtol=0)
    fraction = convex_fraction(grid[..., 0], grid[..., 1], tolerance=0.1)
    assert fraction == {"valley": 0.8, "saddle": 0.0, "bowl": 1.0}[name]
    if name == "valley":  # y = 0: |-1 / 2|; y = +-1: 0; y = +-2: 2/3
        torch.testing.assert_close(convexity_ratio(grid[..., 0], grid[..., 1])[0],
                                   torch.tensor([2 / 3, 0, 0.5, 0, 2 / 3], dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.equal(model.w, torch.zeros(2, dtype=torch.float64)), "the weights are back at the centre"
