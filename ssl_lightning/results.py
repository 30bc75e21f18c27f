"""``ssl-lightning results runs/<sweep>``: one table of a sweep, read from the files its runs wrote.

    ssl-lightning results runs/fashion_mnist_study-vicreg
    ssl-lightning results runs/fashion_mnist_study-st --plot rank/projector_rankme --x power

Every run directory below the given one with a ``sweep.json`` (what ``submit`` asked for) or a
``summary.json`` (what the fit did, ssl_lightning.callbacks.summary) is a row; nothing needs W&B or a
network. Runs are grouped by config and grid point; each group shows its runs' statuses (pending,
running, finished, preempted, collapsed, failed: none is dropped) and mean +- std over its seeds of
the finished and collapsed runs. Writes results.csv (one row per run), results.md (the grouped
table) and, with --plot, a PNG of a metric against one swept key (a line per value of the other keys,
error bars: std over seeds).
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import Counter
from pathlib import Path

from ssl_lightning.callbacks.summary import SUMMARY_FILE, read_json, read_summary
from ssl_lightning.cluster.sweep import TASK_FILE

# columns of the grouped table, in this order, when any run has them
TABLE_METRICS = ("linear/top1", "knn/top1_k20", "probe/val_top1", "best/probe/val_top1", "knn/top1",
                 "rank/projector_rankme", "rank/backbone_rankme", "train/loss", "step", "wall_seconds")
MEASURED = ("finished", "collapsed")  # statuses whose numbers enter the means


def load_run(run_dir: Path) -> dict:
    """One row: name, config, overrides, seed, status, error and the flat metrics of one run directory."""
    task = read_json(run_dir / TASK_FILE) or {}
    summary = read_summary(run_dir) or {}
    metrics = {**summary.get("final", {}), **{f"best/{k}": v for k, v in summary.get("best", {}).items()},
               **summary.get("eval", {})}
    for key in ("step", "wall_seconds"):
        if key in summary:
            metrics[key] = summary[key]
    return {"name": task.get("name") or run_dir.name, "run_dir": str(run_dir),
            "config": task.get("label") or (Path(task["config"]).stem if "config" in task else summary.get("method")),
            "overrides": task.get("overrides", {}),
            "seed": task.get("seed") if task.get("seed") is not None else summary.get("seed"),
            "status": summary.get("status", "pending"),
            "error": summary.get("error") or summary.get("eval_error") or "", "metrics": metrics}


def collect(root: Path) -> list[dict]:
    """All runs under root (root itself when it is one run), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; give a sweep's directory, e.g. runs/<job name>")
    dirs = {p.parent for name in (TASK_FILE, SUMMARY_FILE) for p in root.rglob(name)}
    if not dirs:
        raise FileNotFoundError(f"no {TASK_FILE} or {SUMMARY_FILE} under {root}: not a sweep or run directory")
    return sorted((load_run(d) for d in dirs), key=lambda r: r["name"])


def point_label(row: dict, leave_out: str | None = None) -> str:
    """config and grid values (but leave_out): 'vicreg var_weight=0 cov_weight=1'."""
    values = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row["overrides"].items() if k != leave_out]
    return " ".join([row["config"], *values])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group(rows: list[dict]) -> list[dict]:
    """Rows grouped by grid point (in order of first appearance): runs, status counts, and for every
    metric (mean, std, n) over the runs whose status is finished or collapsed."""
    groups: dict[str, dict] = {}
    for row in rows:
        g = groups.setdefault(point_label(row), {"point": point_label(row), "config": row["config"],
                                                 "overrides": row["overrides"], "runs": []})
        g["runs"].append(row)
    for g in groups.values():
        g["status"] = Counter(r["status"] for r in g["runs"])
        measured = [r for r in g["runs"] if r["status"] in MEASURED]
        g["metrics"] = {}
        for name in sorted({k for r in measured for k in r["metrics"]}):
            values = [float(r["metrics"][name]) for r in measured if name in r["metrics"]]
            values = [v for v in values if math.isfinite(v)]
            if values:
                g["metrics"][name] = (*mean_std(values), len(values))
    return list(groups.values())


def _format(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def markdown_table(groups: list[dict], metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """The grouped table: point, seeds, statuses, mean +- std (over n > 1 runs) of each of ``metrics``
    that any group has."""
    names = [m for m in metrics if any(m in g["metrics"] for g in groups)]
    header = ["grid point", "runs", "status", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        status = ", ".join(f"{n} {s}" for s, n in sorted(g["status"].items()))
        cells = [g["point"], str(len(g["runs"])), status]
        for name in names:
            if name in g["metrics"]:
                mean, std, n = g["metrics"][name]
                spread = f" ± {_format(std)}" if n > 1 else ""
                cells.append(_format(mean) + spread + (f" (n={n})" if n < len(g["runs"]) else ""))
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    problems = [r for r in (r for g in groups for r in g["runs"]) if r["status"] not in MEASURED]
    if problems:
        lines += ["", "Runs not in the means:"]
        lines += [f"- {r['name']}: {r['status']}" + (f" ({r['error']})" if r["error"] else "") for r in problems]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per run: name, config, each override, seed, status, error, every metric."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    metrics = sorted({k for r in rows for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "config", *keys, "seed", "status", "error", *metrics, "run_dir"])
        for r in rows:
            writer.writerow([r["name"], r["config"], *(r["overrides"].get(k, "") for k in keys), r["seed"],
                             r["status"], r["error"], *(r["metrics"].get(m, "") for m in metrics), r["run_dir"]])


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def plot(groups: list[dict], metric: str, x_key: str, path: Path) -> None:
    """metric (mean, error bar std over seeds) against the swept key x_key (its last dotted part or the
    full key); one line per config and value of the other grid keys. Groups without x_key (a reference
    config such as INTL in the ST sweep) are drawn as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def key_of(g: dict) -> str | None:
        return next((k for k in g["overrides"] if k == x_key or k.rsplit(".", 1)[-1] == x_key), None)

    if not any(key_of(g) for g in groups):
        swept = sorted({k for g in groups for k in g["overrides"]})
        raise ValueError(f"--x {x_key} is not a swept key of this sweep; swept: {', '.join(swept) or 'none'}")
    lines: dict[str, list[tuple]] = {}
    references = []
    for g in groups:
        if metric not in g["metrics"]:
            continue
        mean, std, _ = g["metrics"][metric]
        key = key_of(g)
        if key is None:
            references.append((g["point"], mean, std))
            continue
        lines.setdefault(point_label(g, leave_out=key), []).append((_number(g["overrides"][key]), mean, std))
    if not lines and not references:
        known = sorted({k for g in groups for k in g["metrics"]})
        raise ValueError(f"no finished run has {metric}; metrics: {', '.join(known)}")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, points in lines.items():
        points.sort(key=lambda p: (isinstance(p[0], str), p[0]))
        xs, ys, errs = zip(*points)
        ax.errorbar([str(x) if isinstance(x, str) else x for x in xs], ys, yerr=errs, marker="o", capsize=3,
                    label=label)
    for i, (label, mean, std) in enumerate(references):
        ax.axhline(mean, linestyle="--", color=f"C{len(lines) + i}", label=f"{label} (±{_format(std)})")
    ax.set(xlabel=x_key, ylabel=metric, title=f"{metric} vs {x_key} (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl-lightning results", description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="a sweep's directory, runs/<job name>")
    p.add_argument("--out", type=Path, default=None, help="where results.csv/.md and the plot go (default: root)")
    p.add_argument("--plot", default=None, metavar="METRIC", help="e.g. linear/top1 or rank/projector_rankme")
    p.add_argument("--x", default=None, metavar="KEY", help="the swept key on the plot's x axis, e.g. power")
    p.add_argument("--metrics", default=",".join(TABLE_METRICS),
                   help="the table's columns, comma-separated (any key of summary.json's final, best/..., eval)")
    return p


def main(argv: list[str]) -> None:
    p = parser()
    args = p.parse_args(argv)
    if bool(args.plot) != bool(args.x):
        p.error("--plot METRIC and --x KEY go together, e.g. --plot linear/top1 --x power")
    try:
        rows = collect(args.root)
        groups = group(rows)
        out = args.out or args.root
        out.mkdir(parents=True, exist_ok=True)
        table = markdown_table(groups, tuple(m.strip() for m in args.metrics.split(",") if m.strip()))
        (out / "results.md").write_text(table)
        write_csv(rows, out / "results.csv")
        print(table)
        print(f"{len(rows)} runs; written: {out / 'results.md'}, {out / 'results.csv'}")
        if args.plot:
            path = out / f"{args.plot.replace('/', '_')}_vs_{args.x.rsplit('.', 1)[-1]}.png"
            plot(groups, args.plot, args.x, path)
            print(f"plot: {path}")
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
