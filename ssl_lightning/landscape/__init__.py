"""Filter-normalised 2-D loss landscapes (Li et al. 2018) of any checkpoint: ``ssl-lightning landscape``."""
from ssl_lightning.landscape.command import landscape, main, method_landscape
from ssl_lightning.landscape.grid import filter_normalized_direction, loss_grid, parse_grid, summarize

__all__ = ["filter_normalized_direction", "landscape", "loss_grid", "main", "method_landscape", "parse_grid",
           "summarize"]
