"""The loss-landscape study of Lee et al. (2024) on Fashion-MNIST, CPU-sized, as one command:
MAE vs RC-MAE (EMA teacher) vs a supervised ViT, the same 4-block 64-d ViT, data module and view.

    python benchmarks/landscape_study.py [--out runs/landscape_study] [--figures docs/img] [--threads 1]

1. trains the three from the configs in experiments/fashion_mnist/ (mae, rcmae, supervised_vit) for
   EPOCHS "epochs" of STEPS_PER_EPOCH batches of BATCH images, keeping epoch=E.ckpt after every one;
2. pre-training-loss landscapes of the three final checkpoints on one grid, one figure (shared colour
   scale), with the |lambda_min / lambda_max| curvature map on a coarser grid;
3. probe landscapes (cross-entropy of the online linear probe) of MAE vs RC-MAE at several epochs;
4. the curvature table (Hessian lambda_max, lambda_min, ratio, Hutchinson trace) of every final
   checkpoint for both losses.
Every table goes to <out>/*.csv|json, the figures to --figures. Training is skipped for a run whose
last.ckpt exists (delete <out> to start over). Budget: about 20 min wall on 2 shared CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"MAE": "mae", "RC-MAE": "rcmae", "Sup-ViT": "supervised_vit"}
EPOCHS, STEPS_PER_EPOCH, BATCH = 4, 30, 128


def train(name: str, config: str, out: Path, threads: int | None = None) -> Path:
    """Fits experiments/fashion_mnist/<config>.yaml in a subprocess (with ``threads`` torch threads when
    given); returns its checkpoint dir."""
    run_dir = out / config
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last.ckpt").is_file():
        print(f"{name}: {ckpts / 'last.ckpt'} exists, not retrained", flush=True)
        return ckpts
    start = time.time()
    subprocess.run([
        sys.executable, "-m", "ssl_lightning", "fit", "--config", str(ROOT / "experiments" / "fashion_mnist" /
                                                                     f"{config}.yaml"),
        "--trainer.default_root_dir", str(run_dir), "--trainer.max_epochs", str(EPOCHS),
        "--trainer.limit_train_batches", str(STEPS_PER_EPOCH), "--trainer.limit_val_batches", "8",
        "--data.batch_size", str(BATCH), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--spectrum.every_n_epochs", "0", "--knn.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "0",
        "--checkpoint.keep_every_n_epochs", "1"], check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None)
    print(f"{name}: trained in {time.time() - start:.0f} s", flush=True)
    return ckpts


# The analysis grid, sized for the CPU budget: loss on 9 x 9 points, Hessian curvature on 3 x 3 (Lanczos
# steps, Hutchinson vectors), on fixed batches of the training split (seed 0).
GRID, CURVATURE_GRID, ITERS, TRACE_SAMPLES = "-1:1:9", "-1:1:3", 8, 8
PRETRAIN_BATCHES, PROBE_BATCHES, EVAL_BATCH = 1, 1, 64
PROBE_EPOCHS = (1, 2, EPOCHS)


def analyse(ckpts: dict[str, Path], out: Path, figures: Path) -> dict[str, list[dict]]:
    """Pre-training-loss landscapes of the three final checkpoints, probe landscapes of MAE and RC-MAE
    at PROBE_EPOCHS; each as one comparison figure (copied to ``figures``) and one table."""
    from ssl_lightning.landscape import landscape

    common = dict(grid=GRID, curvature=CURVATURE_GRID, iters=ITERS, trace_samples=TRACE_SAMPLES, seed=0,
                  batch_size=EVAL_BATCH)
    tables = {}
    start = time.time()
    tables["pretrain"], paths = landscape([str(c / "last.ckpt") for c in ckpts.values()], loss="pretrain",
                                          num_batches=PRETRAIN_BATCHES, labels=list(ckpts), out=out / "pretrain",
                                          **common)
    copy_figure(paths["compare"], figures / "landscape_study_pretrain.png")
    print(f"pretrain landscapes: {time.time() - start:.0f} s", flush=True)
    start = time.time()
    probed = [(f"{name} epoch {e}", ckpts[name] / f"epoch={e}.ckpt")
              for e in PROBE_EPOCHS for name in ("MAE", "RC-MAE")]
    tables["probe"], paths = landscape([str(c) for _, c in probed], loss="probe", num_batches=PROBE_BATCHES,
                                       labels=[label for label, _ in probed], out=out / "probe", **common)
    copy_figure(paths["compare"], figures / "landscape_study_probe.png")
    print(f"probe landscapes: {time.time() - start:.0f} s", flush=True)
    return tables


def copy_figure(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}: label | centre loss | flatness | convex fraction | lambda_max | lambda_min | trace +- se")
    for r in rows:
        print(f"  {r['label']} | {r['center']:.4f} | {r['flatness']:.3f} | {r['convex_fraction']:.3f} | "
              f"{r['lambda_max']:.4g} | {r['lambda_min']:.4g} | {r['trace']:.4g} +- {r['trace_stderr']:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/landscape_study")
    parser.add_argument("--figures", default="docs/img")
    parser.add_argument("--stage", choices=("train", "all"), default="all")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for training and analysis; 1 on a shared, busy machine, where waiting "
                             "for a descheduled second thread made an MAE forward 6x slower (2.19 s vs 0.34 s)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.time()
    ckpts = {name: train(name, config, out, args.threads) for name, config in RUNS.items()}
    timings = {"train_s": time.time() - started}
    if args.stage == "all":
        started = time.time()
        tables = analyse(ckpts, out, Path(args.figures))
        timings["analysis_s"] = time.time() - started
        for name, rows in tables.items():
            print_table(name, rows)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
