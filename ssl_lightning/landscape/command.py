"""``ssl-lightning landscape --ckpt PATH``: filter-normalised 2-D loss landscape of a checkpoint.

    ssl-lightning landscape --ckpt runs/x/checkpoints/last.ckpt --grid -1:1:21 --batches 4
    torchrun --nproc_per_node 2 -m ssl_lightning landscape --ckpt ...   # grid points split over ranks
    srun --ntasks-per-node 4 python -m ssl_lightning landscape --ckpt ...

Writes landscape_<loss>.npz (axes, loss matrix, summary), landscape_<loss>_contour.png,
landscape_<loss>_surface.png and landscape_<loss>_summary.json to --out (default <run>/landscape/),
prints the summary and logs it with both images to a W&B eval run grouped with the checkpoint's run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ssl_lightning.checkpointing import load_checkpoint
from ssl_lightning.distributed import rank
from ssl_lightning.eval.features import build_datamodule, load_method
from ssl_lightning.landscape.grid import filter_normalized_direction, loss_grid, parse_grid, summarize
from ssl_lightning.landscape.objectives import (
    LOSSES,
    at_checkpoint_step,
    fixed_labelled_images,
    fixed_training_views,
    perturbed_parameters,
    pretrain_objective,
    probe_objective,
)
from ssl_lightning.landscape.plots import contour_plot, surface_plot
from ssl_lightning.methods import SSLMethod


def method_landscape(method: SSLMethod, data: dict, axis: torch.Tensor, *, loss: str = "pretrain",
                     num_batches: int = 4, batch_size: int | None = None, seed: int = 0, epoch: int = 0,
                     global_step: int = 0) -> torch.Tensor:
    """(len(axis), len(axis)) float64 grid: losses[i, j] = ``loss`` at theta* + axis[i] d1 + axis[j] d2,
    d1 and d2 filter-normalised directions with seeds ``seed`` and ``seed + 1``.

    ``method`` in eval mode on its device, ``data`` its data-module hyperparameters (load_method);
    batch_size defaults to the global batch it was trained with; views and images are drawn with
    ``seed``; epoch and global_step are what schedules inside ssl_step see. The method's parameters
    and buffers are the same, bit for bit, afterwards.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {LOSSES}")
    moved = perturbed_parameters(method, loss)  # first: fails fast when probe is asked of a probe-less method
    datamodule = build_datamodule(data)
    batch_size = batch_size or datamodule.hparams.batch_size
    device = next(method.parameters()).device
    fixed = dict(num_batches=num_batches, batch_size=batch_size, seed=seed)
    if loss == "pretrain":
        views = [[method._prepare(v.to(device)) for v in batch] for batch in fixed_training_views(datamodule, **fixed)]
        objective = pretrain_objective(method, views, seed=seed)
    else:
        images = [(x.to(device), y.to(device)) for x, y in fixed_labelled_images(datamodule, **fixed)]
        objective = probe_objective(method, images)
    d1 = filter_normalized_direction(method, seed=seed, only=moved)
    d2 = filter_normalized_direction(method, seed=seed + 1, only=moved)
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
    """<run>/landscape/ for <run>/checkpoints/last.ckpt."""
    return Path(ckpt).resolve().parent.parent / "landscape"


def write_outputs(out: Path, loss: str, axis: torch.Tensor, losses: torch.Tensor,
                  summary: dict[str, float]) -> dict[str, Path]:
    """The npz (axes, loss matrix, summary), the summary JSON and both plots; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"landscape_{loss}"
    paths = {"npz": stem.with_suffix(".npz"), "summary": Path(f"{stem}_summary.json")}
    np.savez(paths["npz"], alphas=axis.numpy(), betas=axis.numpy(), losses=losses.numpy(),
             **{k: np.asarray(v) for k, v in summary.items()})
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    title = f"{loss} loss, flatness {summary['flatness']:.2f} (±{summary['flat_tolerance']:.0%})"
    paths["contour"] = contour_plot(losses, axis, axis, Path(f"{stem}_contour.png"), title)
    paths["surface"] = surface_plot(losses, axis, axis, Path(f"{stem}_surface.png"), title)
    return paths


def landscape(ckpt: str, *, grid: str = "-1:1:21", loss: str = "pretrain", num_batches: int = 4,
              batch_size: int | None = None, seed: int = 0, flat_tolerance: float = 0.1,
              out: str | Path | None = None) -> tuple[dict[str, float], dict[str, Path]]:
    """Computes, on every rank, its share of the grid; rank 0 writes the outputs. Returns (summary,
    output paths); other ranks return the summary and no paths."""
    axis = parse_grid(grid)
    start = time.time()
    method, data = load_method(ckpt)
    saved = load_checkpoint(ckpt)  # for its epoch and step
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    losses = method_landscape(method.to(device), data, axis, loss=loss, num_batches=num_batches,
                              batch_size=batch_size, seed=seed, epoch=int(saved.get("epoch", 0)),
                              global_step=int(saved.get("global_step", 0)))
    summary = {**summarize(losses, axis, axis, flat_tolerance=flat_tolerance), "seconds": time.time() - start,
               "points": losses.numel(), "batches": num_batches, "seed": seed}
    if rank() != 0:
        return summary, {}
    return summary, write_outputs(Path(out) if out else default_out_dir(ckpt), loss, axis, losses, summary)


def attach_grid_value(argv: list[str]) -> list[str]:
    """["--grid", "-1:1:21"] -> ["--grid=-1:1:21"]: argparse takes a value starting with "-" for an option."""
    out, i = [], 0
    while i < len(argv):
        joined = argv[i] == "--grid" and i + 1 < len(argv)
        out.append(f"--grid={argv[i + 1]}" if joined else argv[i])
        i += 2 if joined else 1
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ssl-lightning landscape", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--grid", default="-1:1:21", help="lo:hi:n for both axes (must contain 0)")
    parser.add_argument("--batches", type=int, default=4, help="fixed batches the loss is averaged over")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the checkpoint's global batch")
    parser.add_argument("--loss", choices=LOSSES, default="pretrain")
    parser.add_argument("--seed", type=int, default=0, help="directions (seed, seed + 1), views, masks")
    parser.add_argument("--flat_tolerance", type=float, default=0.1,
                        help="flatness counts grid points within this fraction of the centre loss")
    parser.add_argument("--out", default=None, help="default: <run>/landscape/ next to the checkpoint")
    parser.add_argument("--no_wandb", action="store_true", help="write files and print only")
    args = parser.parse_args(attach_grid_value(argv))
    if args.batches < 1:
        parser.error(f"--batches {args.batches} must be >= 1")
    started = join_process_group()
    try:
        summary, paths = landscape(args.ckpt, grid=args.grid, loss=args.loss, num_batches=args.batches,
                                   batch_size=args.batch_size, seed=args.seed, flat_tolerance=args.flat_tolerance,
                                   out=args.out)
    finally:
        if started:
            dist.destroy_process_group()
    if not paths:
        return  # not rank 0
    print(f"{args.loss} loss landscape of {args.ckpt}:")
    for key, value in summary.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  written to {paths['npz'].parent}")
    if not args.no_wandb:
        from ssl_lightning.eval.commands import log_to_wandb

        results = {f"landscape/{args.loss}/{k}": float(v) for k, v in summary.items()}
        images = {f"landscape/{args.loss}/{kind}": paths[kind] for kind in ("contour", "surface")}
        print(f"  logged to W&B run {log_to_wandb('landscape', args.ckpt, results, images)}", flush=True)
