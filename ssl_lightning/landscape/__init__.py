"""Filter-normalised 2-D loss landscapes (Li et al. 2018) of checkpoints and the Hessian's curvature:
``ssl-lightning landscape`` and ``ssl-lightning hessian``."""
from ssl_lightning.landscape.command import landscape, main, method_landscape
from ssl_lightning.landscape.grid import (
    convex_fraction,
    convexity_ratio,
    filter_normalized_direction,
    loss_grid,
    parse_grid,
    summarize,
)
from ssl_lightning.landscape.hessian import hessian_eigenvalues, hessian_extremes, hessian_trace

__all__ = ["convex_fraction", "convexity_ratio", "filter_normalized_direction", "hessian_eigenvalues",
           "hessian_extremes", "hessian_trace", "landscape", "loss_grid", "main", "method_landscape", "parse_grid",
           "summarize"]
