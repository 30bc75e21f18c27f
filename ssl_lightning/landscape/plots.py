"""Contour and 3-D surface plots of a loss grid (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def contour_plot(losses: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, path: Path, title: str) -> Path:
    """Filled contours of losses[i, j] = L(alphas[i], betas[j]), the trained weights marked at (0, 0)."""
    plt = _pyplot()
    a, b = torch.meshgrid(alphas, betas, indexing="ij")
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    filled = ax.contourf(a.numpy(), b.numpy(), losses.numpy(), levels=30, cmap="viridis")
    ax.contour(a.numpy(), b.numpy(), losses.numpy(), levels=15, colors="white", linewidths=0.4)
    ax.plot(0, 0, marker="*", color="red", markersize=10, label="checkpoint")
    fig.colorbar(filled, ax=ax, label="loss")
    ax.set(xlabel="alpha (direction 1)", ylabel="beta (direction 2)", title=title, aspect="equal")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def surface_plot(losses: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, path: Path, title: str) -> Path:
    """3-D surface of the same grid."""
    plt = _pyplot()
    a, b = torch.meshgrid(alphas, betas, indexing="ij")
    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(a.numpy(), b.numpy(), losses.numpy(), cmap="viridis", linewidth=0, antialiased=True)
    ax.set(xlabel="alpha", ylabel="beta", zlabel="loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def convexity_plot(ratio: torch.Tensor, axis: torch.Tensor, path: Path, title: str) -> Path:
    """Map of |lambda_min / lambda_max| over the (coarse) curvature grid, 0 (convex, dark) to 1 (saddle, bright)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = _ratio_image(ax, ratio, axis)
    fig.colorbar(image, ax=ax, label="|λmin / λmax|")
    ax.set(xlabel="alpha (direction 1)", ylabel="beta (direction 2)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def comparison_plot(grids: dict[str, torch.Tensor], axis: torch.Tensor, path: Path, title: str, *,
                    ratios: dict[str, torch.Tensor] | None = None,
                    curvature_axis: torch.Tensor | None = None) -> Path:
    """One contour panel per checkpoint (label -> (n, n) loss grid over ``axis``), all with ONE colour
    scale and ONE set of contour levels (the finite min to max over every grid), so panels compare
    honestly; with ``ratios``, a second row of |lambda_min / lambda_max| maps on one 0-1 scale."""
    import numpy as np

    plt = _pyplot()
    finite = torch.cat([g[g.isfinite()] for g in grids.values()])
    levels = np.linspace(float(finite.min()), float(finite.max()), 31)
    rows, cols = (2 if ratios else 1), len(grids)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 3.4 * rows), squeeze=False)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    for ax, (label, losses) in zip(axes[0], grids.items()):
        filled = ax.contourf(a.numpy(), b.numpy(), losses.numpy(), levels=levels, cmap="viridis", extend="both")
        ax.contour(a.numpy(), b.numpy(), losses.numpy(), levels=levels[::2], colors="white", linewidths=0.4)
        ax.plot(0, 0, marker="*", color="red", markersize=8)
        ax.set(title=label, xlabel="alpha", aspect="equal")
    axes[0][0].set_ylabel("beta")
    fig.colorbar(filled, ax=list(axes[0]), label="loss")
    if ratios:
        for ax, (label, ratio) in zip(axes[1], ratios.items()):
            image = _ratio_image(ax, ratio, curvature_axis)
            ax.set(title=label, xlabel="alpha")
        axes[1][0].set_ylabel("beta (|λmin/λmax| map)")
        fig.colorbar(image, ax=list(axes[1]), label="|λmin / λmax|")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _ratio_image(ax, ratio: torch.Tensor, axis: torch.Tensor):
    """ratio[i, j] at (alpha_i, beta_j) as cells on a fixed 0-1 colour scale (ratios above 1 saturate)."""
    step = float(axis[1] - axis[0]) / 2
    extent = (float(axis[0]) - step, float(axis[-1]) + step, float(axis[0]) - step, float(axis[-1]) + step)
    return ax.imshow(ratio.T.numpy(), origin="lower", extent=extent, vmin=0, vmax=1, cmap="magma", aspect="equal")
