"""Grids of runs: ``--grid key=v1,v2`` expanded with configs and seeds into tasks, each with a readable,
stable run directory; the schema check of every grid value; the sequential ``--local`` runner; and
``finish``, which every task (SLURM or local) runs after its fit to mark failures and evaluate.

    ssl-lightning submit --config experiments/fashion_mnist/vicreg.yaml \\
        --grid model.init_args.var_weight=0,25 --grid model.init_args.cov_weight=0,1 --seeds 0 1 2 \\
        --eval linear,knn --gpus-per-node 1 --time 4:00:00          # one SLURM array of 12 tasks
    ssl-lightning submit ... --local                                 # the same tasks, one after another here

A task's run directory is ``runs/<sweep>/<config>-<key>=<value>-...-seed<s>`` (the shortest key
suffix that tells the grid keys apart), so a requeued task finds its checkpoint again; ``sweep.json``
there records what was asked (config, overrides, seed), ``summary.json`` (FitSummary) what happened.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ssl_lightning.callbacks.summary import SUMMARY_FILE, read_summary, write_json
from ssl_lightning.cluster.failure_requeue import fit_errors, requeue_after_failure

TASK_FILE = "sweep.json"
EVAL_COMMANDS = ("linear", "knn")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass
class Task:
    """One fit of a sweep: a config, the grid point's overrides (dotted key -> value text) and a seed."""

    config: Path
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    label: str = ""  # the config's name in run names and tables: its file name, or dir-file when two share it
    name: str = ""
    run_dir: Path = Path()

    def override_args(self) -> list[str]:
        return [a for key, value in self.overrides.items() for a in (f"--{key}", value)]


def split_values(text: str) -> list[str]:
    """'0,25' -> ['0', '25']; commas inside brackets or braces stay: '[1,2],[3]' -> ['[1,2]', '[3]']."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``['model.init_args.var_weight=0,25', ...]`` -> {key: values}, in the order given."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid {item!r} is not KEY=V1,V2,...; e.g. --grid model.init_args.var_weight=0,25")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2")
        parsed = split_values(values)
        if "" in parsed or len(set(parsed)) != len(parsed):
            raise ValueError(f"--grid {item!r} has an empty or repeated value; list each value once")
        grid[key] = parsed
    return grid


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares: var_weight, or
    backbone_kwargs.width next to projector_kwargs.width."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        short[key] = suffix
    return short


def config_labels(configs: list[Path]) -> dict[Path, str]:
    """vicreg.yaml -> 'vicreg'; two configs named vicreg.yaml -> 'fashion_mnist-vicreg', 'cifar10-vicreg'."""
    stems = [c.stem for c in configs]
    return {c: c.stem if stems.count(c.stem) == 1 else f"{c.parent.name}-{c.stem}" for c in configs}


def task_name(label: str, overrides: dict[str, str], seed: int | None, short: dict[str, str]) -> str:
    """``vicreg-var_weight=0-cov_weight=1-seed2``: readable, and the same every time it is derived."""
    parts = [label] + [f"{short[k]}={_UNSAFE.sub('_', v)}" for k, v in overrides.items()]
    return "-".join(parts + ([f"seed{seed}"] if seed is not None else []))


def expand(configs: list[Path], grid: dict[str, list[str]], seeds: list[int] | None, root: Path) -> list[Task]:
    """configs x grid points (Cartesian product, first key slowest) x seeds. A plain job (one config, no
    grid, no seeds) runs in root itself; every task of a sweep in root/<its name>, so that later calls
    with more seeds or points add to the same sweep directory."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    short, labels = short_keys(list(grid)), config_labels(configs)
    tasks = [Task(config, point, seed, labels[config]) for config in configs for point in points
             for seed in (seeds or [None])]
    for task in tasks:
        task.name = task_name(task.label, task.overrides, task.seed, short)
        task.run_dir = root if len(tasks) == 1 and not grid and not seeds else root / task.name
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two tasks would share the run directory {clash!r}: give each config once, and grid "
                         "values that differ in letters, digits or . _ + -")
    return tasks


def parse_error(argv: list[str]) -> str | None:
    """What ``ssl-lightning fit`` would reject in ``argv`` (unknown key, wrong type), without building
    anything; None when it parses."""
    from ssl_lightning.cli import SSLCLI

    class Parsed(Exception):
        pass

    class ParseOnly(SSLCLI):
        def before_instantiate_classes(self) -> None:
            raise Parsed  # stop after parsing and validation: no model, data, run directory or W&B id

    stderr = io.StringIO()
    seed_log = logging.getLogger("lightning_fabric.utilities.seed")  # "Seed set to 0" per parse
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            ParseOnly(args=["fit", *argv])
    except Parsed:
        return None
    except SystemExit:
        text = stderr.getvalue()
        return text[text.find("error:"):].removeprefix("error:").strip() if "error:" in text else text.strip()
    finally:
        seed_log.setLevel(level)
    return None


def validate_grid(configs: list[Path], grid: dict[str, list[str]]) -> None:
    """Every grid value, on every config, must pass the config schema: ValueError naming the key,
    value and config otherwise. One parse per config and value (the first parse imports the CLI)."""
    for config in configs:
        for key, values in grid.items():
            for value in values:
                error = parse_error(["--config", str(config), f"--{key}", value])
                if error:
                    raise ValueError(f"--grid {key}={value} does not fit {config}: {error}")


def fit_arguments(task: Task, *, seed: int, accelerator: str, nodes: int, devices: int, extra: list[str]) -> list[str]:
    """The ``ssl-lightning fit`` arguments of one task, the same for a SLURM array task and --local
    (the grid's overrides come last, so they win over ``extra``)."""
    strategy = ["--trainer.strategy", "ddp"] if nodes * devices > 1 else []
    return ["--config", str(task.config), "--seed_everything", str(task.seed if task.seed is not None else seed),
            "--trainer.default_root_dir", str(task.run_dir), "--trainer.accelerator", accelerator,
            "--trainer.num_nodes", str(nodes), "--trainer.devices", str(devices), *strategy, "--ckpt_path", "last",
            *extra, *task.override_args()]


def write_task_files(tasks: list[Task], sweep: str) -> None:
    """sweep.json in every run directory: what the task was asked to do."""
    for task in tasks:
        task.run_dir.mkdir(parents=True, exist_ok=True)
        record = {**asdict(task), "config": str(task.config), "run_dir": str(task.run_dir), "sweep": sweep}
        write_json(task.run_dir / TASK_FILE, record)


def wandb_environment(sweep: str, task: Task) -> dict[str, str]:
    """W&B reads the run's group and display name from these (the logger config stays untouched)."""
    return {"WANDB_RUN_GROUP": sweep, "WANDB_NAME": task.name}


def run_local(tasks: list[Task], fit_args: list[list[str]], sweep: str, eval_options: dict) -> None:
    """Each task's fit in a subprocess (its own log, fit.log in the run directory), then ``finish``.
    A task whose fit already finished (an earlier, interrupted call of the same sweep) is not fitted
    again; it is only evaluated if that is missing."""
    for i, (task, args) in enumerate(zip(tasks, fit_args)):
        start = time.time()
        done = (read_summary(task.run_dir) or {}).get("status") in ("finished", "collapsed")
        code = 0
        if not done:
            env = {**os.environ, **wandb_environment(sweep, task)}
            env.setdefault("WANDB_MODE", "offline")
            env.pop("WANDB_SERVICE", None)  # see slurm/job.sbatch: every fit starts its own W&B service
            with open(task.run_dir / "fit.log", "a") as log:
                code = subprocess.run([sys.executable, "-m", "ssl_lightning", "fit", *args], stdout=log,
                                      stderr=subprocess.STDOUT, env=env).returncode
        summary = finish(task.run_dir, code, **eval_options)
        note = " (fitted before)" if done else ""
        print(f"[{i + 1}/{len(tasks)}] {task.name}: {summary.get('status')}{note} ({time.time() - start:.0f} s)",
              flush=True)


def evaluate(ckpt: str, commands: list[str], *, train_samples: int | None, epochs: int) -> dict[str, float]:
    results: dict[str, float] = {}
    if "linear" in commands:
        from ssl_lightning.eval.linear import linear_eval

        results.update(linear_eval(ckpt, epochs=epochs, train_samples=train_samples))
    if "knn" in commands:
        from ssl_lightning.eval.knn import knn_eval

        results.update(knn_eval(ckpt, train_samples=train_samples))
    return results


def finish(run_dir: Path, exit_code: int, *, commands: list[str] | None = None, train_samples: int | None = None,
           epochs: int = 30, max_failure_requeues: int = 0) -> dict:
    """After a task's fit: a non-zero exit leaves status failed (whatever the fit managed to write),
    except after a preemption (SLURM kills the requeued job's step; the restart continues it) and
    when a SLURM task requeues itself after a failure a restart cures (status requeued:
    ssl_lightning.cluster.failure_requeue); a finished or collapsed fit gets the offline evaluation of its final
    checkpoint stored in its summary under ``eval`` (once: a requeued task that already has it is not
    evaluated again)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) or {}
    if exit_code != 0 and max_failure_requeues > 0 and summary.get("status") != "preempted":
        requeued, line = requeue_after_failure(run_dir, exit_code, max_failure_requeues)
        print(line, flush=True)
        if requeued:
            summary.update(status="requeued", error=line.removeprefix("ssl-lightning: "))
            write_json(run_dir / SUMMARY_FILE, summary)
            return summary
    if exit_code != 0 and summary.get("status") not in ("failed", "preempted"):
        errors = fit_errors(run_dir)
        error = f"rank {errors[0]['rank']}: {errors[0]['error']}" if errors else f"the fit exited with code {exit_code}"
        summary.update(status="failed", error=f"{error}; see the task's log")
    elif exit_code == 0 and not summary:
        summary.update(status="failed", error=f"the fit exited with code 0 but wrote no {SUMMARY_FILE}")
    if commands and summary.get("status") in ("finished", "collapsed") and "eval" not in summary:
        try:
            summary["eval"] = evaluate(summary["checkpoint"], commands, train_samples=train_samples, epochs=epochs)
        except Exception as err:  # the fit's numbers stay; the table shows why the evaluation is missing
            summary["eval_error"] = f"{type(err).__name__}: {err}"
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def eval_commands(text: str) -> list[str]:
    """--eval linear,knn -> ['linear', 'knn']."""
    commands = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in commands if c not in EVAL_COMMANDS]
    if unknown or not commands:
        raise argparse.ArgumentTypeError(f"--eval {text!r}: choose from {', '.join(EVAL_COMMANDS)}, e.g. linear,knn")
    return commands


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval", type=eval_commands, default=None, help="after each fit: linear,knn of its last.ckpt")
    parser.add_argument("--eval-train-samples", type=int, default=None,
                        help="offline evaluation on a fixed seeded subset of the train split (default: all)")
    parser.add_argument("--eval-epochs", type=int, default=30, help="epochs of the offline linear classifier")


def eval_options(args: argparse.Namespace) -> dict:
    return {"commands": args.eval, "train_samples": args.eval_train_samples, "epochs": args.eval_epochs}


def eval_arguments(args: argparse.Namespace) -> list[str]:
    """The --eval options again, for ``python -m ssl_lightning.cluster.sweep finish`` in the job script."""
    if not args.eval:
        return []
    samples = ["--eval-train-samples", str(args.eval_train_samples)] if args.eval_train_samples else []
    return ["--eval", ",".join(args.eval), *samples, "--eval-epochs", str(args.eval_epochs)]


def quoted(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def main(argv: list[str]) -> None:
    """``python -m ssl_lightning.cluster.sweep finish RUN_DIR --exit-code N [--eval ...]`` (the job script's last step)."""
    parser = argparse.ArgumentParser(prog="python -m ssl_lightning.cluster.sweep finish")
    parser.add_argument("command", choices=["finish"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--exit-code", type=int, required=True)
    parser.add_argument("--max-failure-requeues", type=int, default=0,
                        help="inside SLURM: requeue the task after a curable failure at most this often")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    summary = finish(args.run_dir, args.exit_code, **eval_options(args), max_failure_requeues=args.max_failure_requeues)
    print(f"ssl-lightning: {args.run_dir.name} {summary.get('status')}; eval {summary.get('eval', 'not run')}")


if __name__ == "__main__":
    main(sys.argv[1:])
