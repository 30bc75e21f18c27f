"""The README's method table: training speed and what each method learns on the demo budget.

    python benchmarks/method_zoo.py                       # steps/s of every experiments/fashion_mnist/*.yaml
    python benchmarks/method_zoo.py --full simclr byol    # + the full demo-budget fit and offline linear probe

steps/s: optimizer steps per second of the config as shipped (batch, precision, views, heads), timed
over steps ``--skip``..``--steps`` of a fit with validation, monitors and logging off, so start-up and
warm-up are excluded. --full runs ``ssl-lightning fit`` with the config unchanged (its epochs = the
demo budget) and then ``ssl-lightning linear`` on the checkpoint, each in a fresh process, and reports
the online probe (val top-1 at the end of the fit) and the offline linear probe (top-1 on the test set).
Run it on an otherwise idle machine: a shared 2-core CPU moves timings by 20% or more.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ssl_lightning.cli import SSLCLI
from timing import StepTimer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "fashion_mnist"


def steps_per_second(config: Path, steps: int, skip: int) -> float:
    with tempfile.TemporaryDirectory() as root:
        cli = SSLCLI(args=["--config", str(config), "--trainer.max_steps", str(steps), "--trainer.logger", "false",
                           "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                           "--spectrum.every_n_epochs", "0", "--knn.every_n_epochs", "0",
                           "--trainer.default_root_dir", root], run=False)
        timer = StepTimer(skip)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    return timer.steps_per_second()


def run(command: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "ssl_lightning", *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def full_budget(config: Path, root: Path) -> dict[str, float]:
    start = time.perf_counter()
    fit_out = run(["fit", "--config", str(config), "--trainer.default_root_dir", str(root)])
    fit_seconds = time.perf_counter() - start
    linear_out = run(["linear", "--ckpt", str(root / "checkpoints" / "last.ckpt"), "--no_wandb"])
    online = re.search(r"probe/val_top1: ([0-9.]+)", fit_out)
    linear = re.search(r"linear/top1: ([0-9.]+)", linear_out)
    return {"fit_s": fit_seconds, "online": float(online.group(1)) if online else float("nan"),
            "linear": float(linear.group(1)) if linear else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("methods", nargs="*", help="config names in experiments/fashion_mnist (default: all)")
    p.add_argument("--full", action="store_true", help="also run the demo budget and the offline linear probe")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--runs", default="runs/method_zoo", help="where --full keeps its runs")
    args = p.parse_args()
    names = args.methods or sorted(c.stem for c in CONFIG_DIR.glob("*.yaml"))
    print("| method | steps/s | fit (s) | online probe top-1 | offline linear top-1 |")
    print("|---|---|---|---|---|")
    for name in names:
        config = CONFIG_DIR / f"{name}.yaml"
        speed = steps_per_second(config, args.steps, args.skip)
        row = f"| {name} | {speed:.2f} |"
        if args.full:
            r = full_budget(config, Path(args.runs) / name)
            row += f" {r['fit_s']:.0f} | {100 * r['online']:.1f}% | {100 * r['linear']:.1f}% |"
        else:
            row += " | | |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
