"""``ssl-lightning linear|knn|finetune --ckpt ...``: offline evaluation of a checkpoint of any method.

linear and knn look at the frozen backbone; finetune trains it end-to-end on a fraction of the labels.
``--data.dataset`` / ``--data.data_dir`` evaluate on another dataset (ssl_lightning.eval.transfer).

Results are printed and logged to W&B under ``eval/`` (offline unless WANDB_MODE=online) in a run of
their own (job_type "eval"), grouped with the pre-training run whose id is stored next to the
checkpoint. A run of its own, not a resume of the pre-training run: two evaluations resuming one id
within the same second would share a directory and lose data.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ssl_lightning.eval.transfer import add_data_arguments, data_options
from ssl_lightning.wandb_run import RUN_ID_FILE


def log_to_wandb(command: str, ckpt: str, results: dict[str, float], images: dict[str, Path] | None = None) -> str:
    """Logs ``eval/<name>`` (numbers, and image files if given) to a new W&B run grouped with the
    checkpoint's run; returns its directory."""
    import wandb

    run_dir = Path(ckpt).resolve().parent.parent
    id_file = run_dir / RUN_ID_FILE
    pretrain_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project="ssl-lightning", dir=str(run_dir), job_type="eval", group=pretrain_id,
                     name=f"{pretrain_id or run_dir.name}-{command}",
                     config={"checkpoint": str(ckpt), "pretrain_run_id": pretrain_id, "command": command},
                     mode="online" if os.environ.get("WANDB_MODE") == "online" else "offline")
    values = {f"eval/{k}": v for k, v in results.items()}
    run.log({**values, **{f"eval/{k}": wandb.Image(str(path)) for k, path in (images or {}).items()}})
    run.summary.update(values)
    run.finish()
    return run.dir.removesuffix("/files")


def label_percent(value: str) -> float:
    """--labels: percent of each class in (0, 100]."""
    percent = float(value)
    if not 0 < percent <= 100:
        raise argparse.ArgumentTypeError(f"--labels {value} is not a percentage in (0, 100]; use e.g. 1, 10 or 100")
    return percent


def add_command_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command in ("linear", "knn"):
        parser.add_argument("--train_samples", type=int, default=None, help="fixed seeded subset of the train split")
    if command == "linear":
        parser.add_argument("--epochs", type=int, default=30)
    elif command == "knn":
        parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
        parser.add_argument("--temperature", type=float, default=0.07)
    elif command == "finetune":
        parser.add_argument("--labels", type=label_percent, required=True,
                            help="percent of each class of the train split to fine-tune on (1, 10, 100)")
        parser.add_argument("--epochs", type=int, default=30)
        parser.add_argument("--lr", type=float, default=3e-3, help="AdamW lr of the linear head (cosine to 0)")
        parser.add_argument("--backbone_lr_scale", type=float, default=0.1, help="backbone lr = lr x this")
        parser.add_argument("--batch_size", type=int, default=64)
        parser.add_argument("--seed", type=int, default=0, help="picks the labelled subset, head init, augmentation")
        parser.add_argument("--random_init", action="store_true",
                            help="fine-tune the same architecture from scratch (baseline)")


def run_command(command: str, args: argparse.Namespace) -> dict[str, float]:
    if command == "linear":
        from ssl_lightning.eval.linear import linear_eval

        return linear_eval(args.ckpt, epochs=args.epochs, num_workers=args.num_workers,
                           train_samples=args.train_samples, data_options=data_options(args))
    if command == "knn":
        from ssl_lightning.eval.knn import knn_eval

        return knn_eval(args.ckpt, ks=tuple(args.ks), temperature=args.temperature, num_workers=args.num_workers,
                        train_samples=args.train_samples, data_options=data_options(args))
    if command == "finetune":
        from ssl_lightning.eval.finetune import finetune_eval

        return finetune_eval(args.ckpt, label_fraction=args.labels / 100, epochs=args.epochs, lr=args.lr,
                             backbone_lr_scale=args.backbone_lr_scale, batch_size=args.batch_size, seed=args.seed,
                             random_init=args.random_init, num_workers=args.num_workers,
                             data_options=data_options(args))
    raise ValueError(f"unknown evaluation command {command!r}")


def run_name(command: str, args: argparse.Namespace) -> str:
    """finetune runs are told apart by label percent and init in W&B: finetune-1pct, finetune-random-10pct;
    another dataset is appended: linear-digits."""
    name = command
    if command == "finetune":
        name = f"finetune-{'random-' if args.random_init else ''}{args.labels:g}pct"
    return f"{name}-{args.data_dataset}" if args.data_dataset else name


def main(command: str, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"ssl-lightning {command}", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--no_wandb", action="store_true", help="print only")
    add_command_arguments(parser, command)
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    results = run_command(command, args)
    name = run_name(command, args)
    print(f"{name} evaluation of {args.ckpt}:")
    for key, value in results.items():
        print(f"  {key}: {value:.4f}")
    if not args.no_wandb:
        print(f"  logged to W&B run {log_to_wandb(name, args.ckpt, results)}", flush=True)
