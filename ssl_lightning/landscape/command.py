"""``ssl-lightning landscape --ckpt PATH [PATH ...]``: filter-normalised 2-D loss landscapes of checkpoints.

    ssl-lightning landscape --ckpt runs/x/checkpoints/last.ckpt --grid -1:1:21 --batches 4
    ssl-lightning landscape --ckpt A.ckpt B.ckpt C.ckpt --curvature -1:1:5   # one figure, shared scale
    torchrun --nproc_per_node 2 -m ssl_lightning landscape --ckpt ...   # grid points split over ranks
    srun --ntasks-per-node 4 python -m ssl_lightning landscape --ckpt ...

Per checkpoint: landscape_<loss>.npz (axes, loss matrix, curvature maps, summary), its contour,
surface (and with --curvature, convexity) plots and landscape_<loss>_summary.json, in --out (default
<run>/landscape/, <run>/landscape/<stem>/ for a checkpoint other than last.ckpt) with one checkpoint,
in --out/<label>/ with several (default --out: <first run>/landscape/compare/). Always the table
landscape_<loss>_table.csv|json (centre loss, flatness, convex fraction, lambda_max, lambda_min, trace
per checkpoint) and, with several, landscape_<loss>_compare.png: one panel per checkpoint with one
colour scale and one set of contour levels. Every checkpoint gets the same grid, direction seeds,
batches and masks (the same data configuration and seed give the same batches). Printed, and logged
with the figures to a W&B eval run grouped with the (first) checkpoint's run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ssl_lightning.distributed import rank, world_size
from ssl_lightning.checkpointing import load_checkpoint
from ssl_lightning.eval.features import load_method
from ssl_lightning.landscape.curvature import objective_curvature
from ssl_lightning.landscape.grid import (
    convex_fraction,
    convexity_ratio,
    curvature_grid,
    loss_grid,
    parse_grid,
    summarize,
)
from ssl_lightning.landscape.objectives import LOSSES, at_checkpoint_step, method_plane
from ssl_lightning.landscape.plots import comparison_plot, contour_plot, convexity_plot, surface_plot
from ssl_lightning.methods import SSLMethod


def method_landscape(method: SSLMethod, data: dict, axis: torch.Tensor, *, loss: str = "pretrain",
                     num_batches: int = 4, batch_size: int | None = None, seed: int = 0, epoch: int = 0,
                     global_step: int = 0) -> torch.Tensor:
    """(len(axis), len(axis)) float64 grid: losses[i, j] = ``loss`` at theta* + axis[i] d1 + axis[j] d2
    (method_plane). epoch and global_step are what schedules inside ssl_step see. The method's
    parameters and buffers are the same, bit for bit, afterwards."""
    objective, _, d1, d2 = method_plane(method, data, loss=loss, num_batches=num_batches, batch_size=batch_size,
                                        seed=seed)
    with at_checkpoint_step(method, epoch=epoch, global_step=global_step):
        return loss_grid(method, objective, d1, d2, axis, axis)


def join_process_group() -> bool:
    """Starts torch.distributed from torchrun's (RANK, WORLD_SIZE) or srun's (SLURM_NTASKS > 1)
    environment, NCCL with one GPU per rank where there are GPUs, else gloo. True if it started one."""
    if dist.is_initialized():
        return False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world, global_rank, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(
            os.environ.get("LOCAL_RANK", 0))
        init = "env://"
    elif int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        if not SLURMEnvironment.detect():
            return False
        env = SLURMEnvironment(auto_requeue=False)
        world, global_rank, local_rank = env.world_size(), env.global_rank(), env.local_rank()
        init = f"tcp://{env.main_address}:{env.main_port}"
    else:
        return False
    if world < 2:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=init, rank=global_rank,
                            world_size=world)
    return True


def default_out_dir(ckpt: str | Path) -> Path:
    """<run>/landscape/ for <run>/checkpoints/last.ckpt, <run>/landscape/<stem>/ for another checkpoint
    of the run (epoch=4.ckpt), so the two never overwrite each other."""
    path = Path(ckpt).resolve()
    out = path.parent.parent / "landscape"
    return out if path.name == "last.ckpt" else out / path.stem


def write_outputs(out: Path, loss: str, axis: torch.Tensor, losses: torch.Tensor, summary: dict[str, float],
                  curvature: torch.Tensor | None = None, curvature_axis: torch.Tensor | None = None) -> dict[str, Path]:
    """The npz (axes, loss matrix, curvature, summary), the summary JSON and the plots; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"landscape_{loss}"
    paths = {"npz": stem.with_suffix(".npz"), "summary": Path(f"{stem}_summary.json")}
    arrays = {} if curvature is None else {"curvature_axis": curvature_axis.numpy(),
                                           "lambda_min_map": curvature[..., 0].numpy(),
                                           "lambda_max_map": curvature[..., 1].numpy()}
    np.savez(paths["npz"], alphas=axis.numpy(), betas=axis.numpy(), losses=losses.numpy(), **arrays,
             **{k: np.asarray(v) for k, v in summary.items()})
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{loss} loss, flatness {summary['flatness']:.2f} (±{summary['flat_tolerance']:.0%})"
    paths["contour"] = contour_plot(losses, axis, axis, Path(f"{stem}_contour.png"), title)
    paths["surface"] = surface_plot(losses, axis, axis, Path(f"{stem}_surface.png"), title)
    if curvature is not None:
        ratio = convexity_ratio(curvature[..., 0], curvature[..., 1])
        paths["convexity"] = convexity_plot(
            ratio, curvature_axis, Path(f"{stem}_convexity.png"),
            f"|λmin/λmax|, convex fraction {summary['convex_fraction']:.2f} (tol {summary['convex_tolerance']:g})")
    return paths


def load_at_step(ckpt: str | Path) -> tuple[SSLMethod, dict, int, int]:
    """(method in eval mode on this rank's GPU or the CPU, data hyperparameters, the epoch and global
    step it was saved at, which schedules inside ssl_step read)."""
    method, data = load_method(ckpt)
    saved = load_checkpoint(ckpt)  # for its epoch and step
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return method.to(device), data, int(saved.get("epoch", 0)), int(saved.get("global_step", 0))


def evaluate_checkpoint(ckpt: str, axis: torch.Tensor, *, loss: str, num_batches: int, batch_size: int | None,
                        seed: int, flat_tolerance: float, curvature_axis: torch.Tensor | None = None,
                        convex_tolerance: float = 0.1, iters: int = 20, tol: float = 1e-3,
                        trace_samples: int = 20) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """(summary, losses, curvature or None) of one checkpoint, on this rank's share of the grid(s).
    With curvature_axis: the (lambda_min, lambda_max) map on that grid, the convex fraction and its
    cost per point (one process), and objective_curvature at the trained weights (lambda_max, trace...)."""
    start = time.time()
    method, data, epoch, step = load_at_step(ckpt)
    objective, moved, d1, d2 = method_plane(method, data, loss=loss, num_batches=num_batches, batch_size=batch_size,
                                            seed=seed)
    with at_checkpoint_step(method, epoch=epoch, global_step=step):
        losses = loss_grid(method, objective, d1, d2, axis, axis)
        summary = {**summarize(losses, axis, axis, flat_tolerance=flat_tolerance), "seconds": time.time() - start,
                   "points": losses.numel(), "batches": num_batches, "seed": seed}
        if curvature_axis is None:
            return summary, losses, None
        start = time.time()
        curvature = curvature_grid(method, objective, moved, d1, d2, curvature_axis, curvature_axis, iters=iters,
                                   tol=tol, seed=seed)
        summary.update(
            convex_fraction=convex_fraction(curvature[..., 0], curvature[..., 1], tolerance=convex_tolerance),
            convex_tolerance=convex_tolerance, curvature_points=curvature[..., 0].numel(),
            curvature_seconds_per_point=(time.time() - start) * world_size() / curvature[..., 0].numel(),
            **objective_curvature(method, objective, moved, iters=iters, tol=tol, seed=seed,
                                  trace_samples=trace_samples))
    return summary, losses, curvature


def checkpoint_labels(ckpts: list[str]) -> list[str]:
    """<run dir>/<stem> per checkpoint (mae/last, rcmae/epoch=2): unique, and safe as a folder name."""
    labels = [f"{Path(c).resolve().parent.parent.name}/{Path(c).stem}" for c in ckpts]
    if len(set(labels)) < len(labels):
        labels = [f"{i}-{label}" for i, label in enumerate(labels)]
    return labels


TABLE_COLUMNS = ("label", "center", "flatness", "convex_fraction", "lambda_max", "lambda_min", "ratio", "trace",
                 "trace_stderr", "min", "max", "curvature_seconds_per_point", "seconds", "ckpt")


def write_table(rows: list[dict], stem: Path) -> dict[str, Path]:
    """rows (one dict per checkpoint) as <stem>.csv (TABLE_COLUMNS, empty where not computed) and <stem>.json."""
    paths = {"table_csv": Path(f"{stem}.csv"), "table_json": Path(f"{stem}.json")}
    with open(paths["table_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["table_json"].write_text(json.dumps(rows, indent=2) + "\n")
    return paths


def landscape(ckpts: str | list[str], *, grid: str = "-1:1:21", loss: str = "pretrain", num_batches: int = 4,
              batch_size: int | None = None, seed: int = 0, flat_tolerance: float = 0.1,
              out: str | Path | None = None, labels: list[str] | None = None, curvature: str | None = None,
              convex_tolerance: float = 0.1, iters: int = 20, tol: float = 1e-3,
              trace_samples: int = 20) -> tuple[list[dict], dict[str, Path]]:
    """Evaluates every checkpoint on the same grid (and ``curvature`` grid), seeds and batches; every
    rank computes its share, rank 0 writes the outputs. Returns (one summary row per checkpoint, with
    its label and path, output paths); other ranks return the rows and no paths."""
    ckpts = [ckpts] if isinstance(ckpts, (str, Path)) else [str(c) for c in ckpts]
    labels = labels or checkpoint_labels(ckpts)
    if len(labels) != len(ckpts):
        raise ValueError(f"{len(labels)} labels for {len(ckpts)} checkpoints; give one label per --ckpt")
    axis, curvature_axis = parse_grid(grid), parse_grid(curvature) if curvature else None
    options = dict(loss=loss, num_batches=num_batches, batch_size=batch_size, seed=seed,
                   flat_tolerance=flat_tolerance, curvature_axis=curvature_axis, convex_tolerance=convex_tolerance,
                   iters=iters, tol=tol, trace_samples=trace_samples)
    results = [evaluate_checkpoint(c, axis, **options) for c in ckpts]
    rows = [{"label": label, "ckpt": c, **summary} for label, c, (summary, _, _) in zip(labels, ckpts, results)]
    if rank() != 0:
        return rows, {}
    single = len(ckpts) == 1
    out = Path(out) if out else default_out_dir(ckpts[0]) / ("" if single else "compare")
    paths = {}
    for label, (summary, losses, curv) in zip(labels, results):
        own = write_outputs(out if single else out / label, loss, axis, losses, summary, curv, curvature_axis)
        paths.update({f"{label}/{k}": v for k, v in own.items()} if not single else own)
    paths.update(write_table(rows, out / f"landscape_{loss}_table"))
    if not single:
        paths["compare"] = comparison_plot(
            {label: r[1] for label, r in zip(labels, results)}, axis, out / f"landscape_{loss}_compare.png",
            f"{loss} loss, seeds {seed}/{seed + 1}, {num_batches} fixed batches",
            ratios=None if curvature_axis is None else {
                label: convexity_ratio(r[2][..., 0], r[2][..., 1]) for label, r in zip(labels, results)},
            curvature_axis=curvature_axis)
    return rows, paths


def attach_grid_value(argv: list[str]) -> list[str]:
    """["--grid", "-1:1:21"] -> ["--grid=-1:1:21"]: argparse takes a value starting with "-" for an option."""
    out, i = [], 0
    while i < len(argv):
        joined = argv[i] in ("--grid", "--curvature") and i + 1 < len(argv)
        out.append(f"{argv[i]}={argv[i + 1]}" if joined else argv[i])
        i += 2 if joined else 1
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ssl-lightning landscape", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, nargs="+", help="checkpoints written by `ssl-lightning fit`")
    parser.add_argument("--labels", nargs="+", default=None, help="one per --ckpt (default <run dir>/<stem>)")
    parser.add_argument("--grid", default="-1:1:21", help="lo:hi:n for both axes (must contain 0)")
    parser.add_argument("--batches", type=int, default=4, help="fixed batches the loss is averaged over")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the checkpoint's global batch")
    parser.add_argument("--loss", choices=LOSSES, default="pretrain")
    parser.add_argument("--seed", type=int, default=0, help="directions (seed, seed + 1), views, masks")
    parser.add_argument("--flat_tolerance", type=float, default=0.1,
                        help="flatness counts grid points within this fraction of the centre loss")
    parser.add_argument("--curvature", default=None, metavar="lo:hi:n",
                        help="also map |lambda_min / lambda_max| of the Hessian on this (coarser) grid")
    parser.add_argument("--convex_tolerance", type=float, default=0.1,
                        help="a point is locally convex when lambda_min >= -this x |lambda_max|")
    parser.add_argument("--iters", type=int, default=20, help="Lanczos steps per curvature point")
    parser.add_argument("--trace_samples", type=int, default=20, help="Hutchinson vectors for the trace")
    parser.add_argument("--out", default=None, help="default: <run>/landscape/ next to the checkpoint")
    parser.add_argument("--no_wandb", action="store_true", help="write files and print only")
    args = parser.parse_args(attach_grid_value(argv))
    if args.batches < 1:
        parser.error(f"--batches {args.batches} must be >= 1")
    started = join_process_group()
    try:
        rows, paths = landscape(args.ckpt, grid=args.grid, loss=args.loss, num_batches=args.batches,
                                batch_size=args.batch_size, seed=args.seed, flat_tolerance=args.flat_tolerance,
                                out=args.out, labels=args.labels, curvature=args.curvature,
                                convex_tolerance=args.convex_tolerance, iters=args.iters,
                                trace_samples=args.trace_samples)
    finally:
        if started:
            dist.destroy_process_group()
    if not paths:
        return  # not rank 0
    for row in rows:
        print(f"{args.loss} loss landscape of {row['ckpt']} ({row['label']}):")
        for key, value in row.items():
            if key not in ("label", "ckpt"):
                print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  written to {paths['table_csv'].parent}")
    if not args.no_wandb:
        from ssl_lightning.eval.commands import log_to_wandb

        single = len(rows) == 1
        results = {f"landscape/{args.loss}/{'' if single else row['label'] + '/'}{k}": float(v)
                   for row in rows for k, v in row.items() if k not in ("label", "ckpt")}
        kinds = ("contour", "surface", "convexity") if single else ("compare",)
        images = {f"landscape/{args.loss}/{kind}": paths[kind] for kind in kinds if kind in paths}
        print(f"  logged to W&B run {log_to_wandb('landscape', args.ckpt[0], results, images)}", flush=True)
