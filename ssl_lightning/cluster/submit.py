"""``ssl-lightning submit``: validate resources against the config, render slurm/job.sbatch, sbatch it.

    ssl-lightning submit --config experiments/cifar10/simclr.yaml --nodes 2 --gpus-per-node 4 --time 1-00:00:00
    ssl-lightning submit --config a.yaml b.yaml --seeds 0 1 2 --gpus-per-node 1 --time 12:00:00   # job array
    ssl-lightning submit --config a.yaml --grid model.init_args.var_weight=0,25 --seeds 0 1 --eval linear,knn ...
    ssl-lightning submit ... --local                            # the same tasks one after another, no SLURM
    ssl-lightning submit ... --dry-run                                                            # print only
    ssl-lightning submit --config ... -- --trainer.max_epochs 10                                 # extra fit args

Everything the job writes lives under runs/<job name>/ (one sub-directory per array task, named
after its config, grid values and seed: ssl_lightning.cluster.sweep), so a requeued job (same name) finds
its checkpoint and W&B run; all tasks share the W&B group <job name>. Each task ends with
``python -m ssl_lightning.cluster.sweep finish`` (failure status, optional offline evaluation), and
``ssl-lightning results runs/<job name>`` tabulates the sweep. Impossible resources are rejected before
sbatch is called: an indivisible global batch, more nodes / CPUs / GPUs than the partition has, a
malformed time limit, a warning signal later than the time limit.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

import yaml

from ssl_lightning.cluster import sweep
from ssl_lightning.cluster.shared_fs import check_run_dir

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "job.sbatch"
SBATCH = "sbatch"
TIME_FORMATS = (r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)", r"(?P<d>\d+)-(?P<h>\d+)",
                r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)")


def time_limit_seconds(text: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    for pattern in TIME_FORMATS:
        match = re.fullmatch(pattern, text)
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            return ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
    raise ValueError(f"--time {text!r} is not a SLURM time limit; use e.g. 30 (minutes), 4:00:00 or 1-12:00:00")


@dataclass
class Partition:
    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int


def parse_gres_gpus(gres: str) -> int:
    """'gpu:4', 'gpu:h100:8(S:0-1)', '(null)' -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def query_partition(name: str | None) -> Partition | None:
    """The partition's size from sinfo (the default partition when name is None); None without sinfo."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    rows = [line.split("|") for line in out.stdout.split()]
    for part, nodes, cpus, gres in rows:
        is_default = part.endswith("*")
        if (name is None and is_default) or part.rstrip("*") == name:
            return Partition(part.rstrip("*"), int(nodes), int(cpus.rstrip("+")), parse_gres_gpus(gres))
    if name is not None:
        known = ", ".join(r[0].rstrip("*") for r in rows)
        raise ValueError(f"--partition {name!r} does not exist on this cluster; partitions: {known}")
    return None


def global_batch_size(config: Path, extra: list[str]) -> int:
    for flag, value in zip(extra, extra[1:]):
        if flag == "--data.batch_size":
            return int(value)
    try:
        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {config}: {err}") from err
    return int(data.get("batch_size", 256))


def validate(args: argparse.Namespace, partition: Partition | None) -> None:
    """Raise ValueError naming the bad value and the fix, before anything is submitted."""
    if args.nodes < 1:
        raise ValueError(f"--nodes {args.nodes} must be at least 1")
    if args.gpus_per_node < 0 or args.cpus_per_task < 1:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} must be >= 0 and --cpus-per-task "
                         f"{args.cpus_per_task} >= 1")
    if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
        raise ValueError(f"--tasks-per-node {args.tasks_per_node} must equal --gpus-per-node {args.gpus_per_node}: "
                         "Lightning runs one process per GPU")
    if args.max_failure_requeues < 0:
        raise ValueError(f"--max-failure-requeues {args.max_failure_requeues} must be >= 0 (0: never requeue "
                         "after a failure)")
    processes = args.nodes * args.tasks_per_node
    for config in args.config:
        if not config.is_file():
            raise ValueError(f"--config {config} does not exist")
        batch = global_batch_size(config, args.extra)
        if batch % processes:
            lower, upper = batch // processes * processes, (batch // processes + 1) * processes
            raise ValueError(f"data.batch_size {batch} in {config} is not divisible by {processes} processes "
                             f"({args.nodes} nodes x {args.tasks_per_node} per node); use {lower or upper} or {upper}")
        print(f"{config.name}: global batch {batch} = {args.nodes} node(s) x {args.tasks_per_node} task(s) per node x "
              f"{batch // processes} per task (the learning rate follows the global batch, not the node count)")
    if args.local:
        return  # no SLURM resources to check
    if args.time is None:
        raise ValueError("--time is required for a SLURM job (e.g. --time 4:00:00); or run here with --local")
    limit = time_limit_seconds(args.time)
    if args.signal_seconds >= limit:
        raise ValueError(f"--signal-seconds {args.signal_seconds} is not shorter than the time limit "
                         f"{args.time} ({limit} s); the job would be warned before it starts working")
    if partition is None:
        check_shared_run_dir(args)
        return
    if args.nodes > partition.nodes:
        raise ValueError(f"--nodes {args.nodes} exceeds the {partition.nodes} node(s) of partition {partition.name}")
    cpus = args.tasks_per_node * args.cpus_per_task
    if cpus > partition.cpus_per_node:
        raise ValueError(f"{args.tasks_per_node} tasks x {args.cpus_per_task} CPUs = {cpus} CPUs per node exceeds the "
                         f"{partition.cpus_per_node} CPUs per node of partition {partition.name}; lower "
                         "--cpus-per-task or --tasks-per-node")
    if args.gpus_per_node > partition.gpus_per_node:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} exceeds the {partition.gpus_per_node} GPUs per node "
                         f"of partition {partition.name}")
    check_shared_run_dir(args)


def check_shared_run_dir(args: argparse.Namespace) -> None:
    """Refuses a node-local run directory for a multi-node job; prints a note for a local disk."""
    if not args.allow_node_local_runs:
        note = check_run_dir(Path(args.runs), args.nodes)
        if note:
            print(note, file=sys.stderr)


def job_name(args: argparse.Namespace) -> str:
    if args.job_name:
        return args.job_name
    first = args.config[0]
    single = len(args.config) == 1 and not args.grid
    return f"{first.parent.name}-{first.stem}" if single else f"{first.parent.name}-sweep"


def plan(args: argparse.Namespace) -> tuple[Path, list[sweep.Task]]:
    """runs/<job name> and its tasks (configs x grid points x seeds), each with its own run directory."""
    root = (Path(args.runs) / job_name(args)).resolve()
    return root, sweep.expand([c.resolve() for c in args.config], args.grid, args.seeds, root)


def task_fit_arguments(args: argparse.Namespace, tasks: list[sweep.Task]) -> list[list[str]]:
    return [sweep.fit_arguments(t, seed=args.default_seed, accelerator="gpu" if args.gpus_per_node else "cpu",
                                nodes=args.nodes, devices=args.tasks_per_node, extra=args.extra) for t in tasks]


def render(args: argparse.Namespace, root: Path, tasks: list[sweep.Task]) -> str:
    """The job script: one task, or an array with one task per run directory."""
    array = len(tasks) > 1
    optional = []
    if args.gpus_per_node:
        optional.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    if args.partition:
        optional.append(f"#SBATCH --partition={args.partition}")
    if array:
        optional.append(f"#SBATCH --array=0-{len(tasks) - 1}")
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job_name(args), nodes=args.nodes, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        time=args.time, signal_seconds=args.signal_seconds,
        log_path=root / ("slurm-%a.out" if array else "slurm.out"), optional_lines="\n".join(optional),
        workdir=shlex.quote(str(Path.cwd())), python=shlex.quote(sys.executable),
        run_dirs=" ".join(shlex.quote(str(t.run_dir)) for t in tasks),
        names=" ".join(shlex.quote(t.name) for t in tasks),
        task_args="\n  ".join(shlex.quote(sweep.quoted(a)) for a in task_fit_arguments(args, tasks)),
        group=shlex.quote(job_name(args)),
        finish_args=sweep.quoted([*sweep.eval_arguments(args), "--max-failure-requeues", str(args.max_failure_requeues)]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl-lightning submit", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, nargs="+", required=True,
                   help="one or more YAML configs (several: job array)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeatable): one task per point of the Cartesian product")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="0 runs on CPUs (gloo); default 1 on SLURM, with --local 1 if CUDA is available else 0")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--time", default=None, help="SLURM time limit, e.g. 4:00:00 or 1-00:00:00 (not with --local)")
    p.add_argument("--partition", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one array task per config x grid point x seed")
    p.add_argument("--default-seed", type=int, default=0, help="seed when --seeds is not given")
    p.add_argument("--signal-seconds", type=int, default=120, help="SIGUSR1 this long before the time limit")
    p.add_argument("--job-name", default=None,
                   help="the sweep's name: runs/<name> and the W&B group "
                        "(default: <dataset>-<method>, or <dataset>-sweep for several configs or a grid)")
    p.add_argument("--runs", default="runs", help="parent of the run directory runs/<job name>")
    p.add_argument("--allow-node-local-runs", action="store_true",
                   help="with --nodes > 1: accept a run directory under /tmp or on tmpfs (only where every node "
                        "shares it, as on the local test cluster)")
    p.add_argument("--max-array", type=int, default=1000, help="refuse sweeps with more tasks than this")
    p.add_argument("--max-failure-requeues", type=int, default=2,
                   help="requeue a task at most this often after a rank died or hung (exit 3 or a signal), "
                        "each time resuming from the newest valid checkpoint; 0: never")
    p.add_argument("--local", action="store_true", help="run the tasks one after another here, without SLURM")
    p.add_argument("--dry-run", action="store_true",
                   help="print the script (with --local: the fit commands); do not write, submit or run anything")
    sweep.add_eval_arguments(p)
    return p


def resolve_defaults(args: argparse.Namespace) -> None:
    if args.gpus_per_node is None:
        if args.local:
            import torch

            args.gpus_per_node = int(torch.cuda.is_available())
        else:
            args.gpus_per_node = 1
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node or 1


def main(argv: list[str]) -> None:
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = parser()
    args = p.parse_args(own)
    args.extra = extra
    resolve_defaults(args)
    try:
        args.grid = sweep.parse_grid(args.grid)
        root, tasks = plan(args)
        points = len(tasks) // len(args.config) // len(args.seeds or [None])
        print(f"sweep {job_name(args)}: {len(args.config)} config(s) x {points} grid point(s) x "
              f"{len(args.seeds or [None])} seed(s) = {len(tasks)} task(s)", flush=True)
        if len(tasks) > args.max_array:
            raise ValueError(f"{len(tasks)} tasks exceed --max-array {args.max_array}; split the sweep or raise "
                             "--max-array (up to the cluster's MaxArraySize)")
        validate(args, None if args.local else query_partition(args.partition))
        sweep.validate_grid(args.config, args.grid)
    except ValueError as err:
        p.error(str(err))
    if args.local and args.dry_run:
        for args_of_task in task_fit_arguments(args, tasks):
            print(f"{sys.executable} -m ssl_lightning fit {sweep.quoted(args_of_task)}")
        return
    if args.local:
        sweep.write_task_files(tasks, job_name(args))
        sweep.run_local(tasks, task_fit_arguments(args, tasks), job_name(args), sweep.eval_options(args))
        print(f"results: ssl-lightning results {root}")
        return
    script = render(args, root, tasks)
    if args.dry_run:
        print(script)
        return
    sweep.write_task_files(tasks, job_name(args))
    path = root / "job.sbatch"
    path.write_text(script)
    result = subprocess.run([SBATCH, "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id} ({job_name(args)}): script {path}, logs and checkpoints under {root}")
    print(job_id)
