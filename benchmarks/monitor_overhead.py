"""Cost of the monitoring callbacks (SpectrumMonitor + KNNMonitor at their defaults) per epoch.

    python benchmarks/monitor_overhead.py [--config experiments/fashion_mnist/vicreg.yaml] [--epochs 1]

Runs the config's fit (W&B off) with both monitors on, times their work inside the same run, and
prints it against the epoch time without it. Timing inside one run avoids comparing two fits,
which on a shared 2-core machine drift by more than the effect. Target: <= 3%.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time

import pytorch_lightning as pl

from ssl_lightning.callbacks import KNNMonitor, SpectrumMonitor
from ssl_lightning.cli import SSLCLI


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, start to end (validation and monitors included)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self.start)


def timed(method, spent: list[float]):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="experiments/fashion_mnist/vicreg.yaml")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cli = SSLCLI(args=["--config", args.config, "--trainer.max_epochs", str(args.epochs),
                           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                           "--trainer.default_root_dir", root], run=False)
        timer, spent = EpochTimer(), []
        for callback in cli.trainer.callbacks:
            if isinstance(callback, (SpectrumMonitor, KNNMonitor)):
                callback.measure = timed(callback.measure, spent)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    epoch, monitors = sum(timer.times) / len(timer.times), sum(spent) / len(timer.times)
    print(f"epoch {epoch:.1f} s, of which monitoring {monitors:.2f} s "
          f"({len(spent)} measurements): overhead {100 * monitors / (epoch - monitors):.1f}%")


if __name__ == "__main__":
    main()
