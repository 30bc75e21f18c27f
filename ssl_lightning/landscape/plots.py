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
