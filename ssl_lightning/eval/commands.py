"""``ssl-lightning linear|knn --ckpt ...``: offline evaluation of a frozen checkpoint of any method.

Results are printed and logged to W&B under ``eval/`` (offline unless WANDB_MODE=online) in a run of
their own (job_type "eval"), grouped with the pre-training run whose id is stored next to the
checkpoint. A run of its own, not a resume of the pre-training run: two evaluations resuming one id
within the same second would share a directory and lose data.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ssl_lightning.wandb_run import RUN_ID_FILE


def log_to_wandb(command: str, ckpt: str, results: dict[str, float]) -> str:
    """Logs ``eval/<name>`` to a new W&B run grouped with the checkpoint's run; returns its directory."""
    import wandb

    run_dir = Path(ckpt).resolve().parent.parent
    id_file = run_dir / RUN_ID_FILE
    pretrain_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project="ssl-lightning", dir=str(run_dir), job_type="eval", group=pretrain_id,
                     name=f"{pretrain_id or run_dir.name}-{command}",
                     config={"checkpoint": str(ckpt), "pretrain_run_id": pretrain_id, "command": command},
                     mode="online" if os.environ.get("WANDB_MODE") == "online" else "offline")
    values = {f"eval/{k}": v for k, v in results.items()}
    run.log(values)
    run.summary.update(values)
    run.finish()
    return run.dir.removesuffix("/files")


def main(command: str, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"ssl-lightning {command}", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--train_samples", type=int, default=None, help="fixed seeded subset of the train split")
    parser.add_argument("--no_wandb", action="store_true", help="print only")
    if command == "linear":
        parser.add_argument("--epochs", type=int, default=30)
    else:
        parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
        parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args(argv)
    common = {"num_workers": args.num_workers, "train_samples": args.train_samples}
    if command == "linear":
        from ssl_lightning.eval.linear import linear_eval

        results = linear_eval(args.ckpt, epochs=args.epochs, **common)
    else:
        from ssl_lightning.eval.knn import knn_eval

        results = knn_eval(args.ckpt, ks=tuple(args.ks), temperature=args.temperature, **common)
    print(f"{command} evaluation of {args.ckpt}:")
    for key, value in results.items():
        print(f"  {key}: {value:.4f}")
    if not args.no_wandb:
        print(f"  logged to W&B run {log_to_wandb(command, args.ckpt, results)}", flush=True)
