"""``ssl-lightning hessian --ckpt PATH``: the Hessian's extreme eigenvalues and trace at a checkpoint.

    ssl-lightning hessian --ckpt runs/x/checkpoints/last.ckpt --loss pretrain --batches 4
    ssl-lightning hessian --ckpt runs/x/checkpoints/epoch=2.ckpt --loss probe

The objective is the landscape's (same fixed batches, masks and seed, same moved parameters):
lambda_max and lambda_min from Lanczos on Hessian-vector products, |lambda_min / lambda_max| and
Hutchinson's trace estimate with its standard error. Printed, written to hessian_<loss>.json in --out
(default: the landscape's folder, <run>/landscape/[<stem>/]) and logged to a W&B eval run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssl_lightning.landscape.command import default_out_dir, load_at_step
from ssl_lightning.landscape.curvature import point_curvature
from ssl_lightning.landscape.objectives import LOSSES


def checkpoint_hessian(ckpt: str, *, loss: str = "pretrain", num_batches: int = 4, batch_size: int | None = None,
                       seed: int = 0, iters: int = 100, tol: float = 1e-3, trace_samples: int = 50) -> dict[str, float]:
    """point_curvature of the checkpoint at its saved epoch and step, on GPU where there is one."""
    method, data, epoch, step = load_at_step(ckpt)
    return point_curvature(method, data, loss=loss, num_batches=num_batches, batch_size=batch_size, seed=seed,
                           epoch=epoch, global_step=step, iters=iters, tol=tol, trace_samples=trace_samples)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ssl-lightning hessian", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--loss", choices=LOSSES, default="pretrain")
    parser.add_argument("--batches", type=int, default=4, help="fixed batches the loss is averaged over")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the checkpoint's global batch")
    parser.add_argument("--seed", type=int, default=0, help="views, masks, Lanczos start, Hutchinson vectors")
    parser.add_argument("--iters", type=int, default=100, help="Lanczos steps at most")
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos stops at this relative residual")
    parser.add_argument("--trace_samples", type=int, default=50, help="Rademacher vectors for the trace")
    parser.add_argument("--out", default=None, help="default: <run>/landscape/ next to the checkpoint")
    parser.add_argument("--no_wandb", action="store_true", help="write the file and print only")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.iters < 2:
        parser.error(f"--batches {args.batches} must be >= 1 and --iters {args.iters} >= 2")
    result = checkpoint_hessian(args.ckpt, loss=args.loss, num_batches=args.batches, batch_size=args.batch_size,
                                seed=args.seed, iters=args.iters, tol=args.tol, trace_samples=args.trace_samples)
    result.update(batches=args.batches, seed=args.seed, iters=args.iters)
    out = Path(args.out) if args.out else default_out_dir(args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hessian_{args.loss}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Hessian of the {args.loss} loss at {args.ckpt}:")
    for key, value in result.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  written to {path}")
    if not args.no_wandb:
        from ssl_lightning.eval.commands import log_to_wandb

        results = {f"hessian/{args.loss}/{k}": float(v) for k, v in result.items()}
        print(f"  logged to W&B run {log_to_wandb('hessian', args.ckpt, results)}", flush=True)
