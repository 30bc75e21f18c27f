"""``ssl-lightning label-efficiency --ckpt ... --fractions 1 2 5 10 25 100 --protocol linear|finetune
--seeds 0 1 2 [--baseline scratch|CKPT]``: top-1 accuracy against the fraction of labels, for a
checkpoint and a baseline under the same protocol, and the labels pre-training saves.

Subsets: per class one seeded order of the train split's samples; fraction f keeps the first
max(1, round(f * count)) of it, so the subsets of one seed nest (1% inside 10%), and both models see
the same ones. ``linear`` extracts features once per model and fits a linear probe (ssl_lightning.eval.
linear, features standardised with the statistics of the whole train split, which uses no labels) for
every fraction and seed; ``finetune`` fine-tunes a fresh copy per fraction and seed (eval.finetune).
Baselines: ``scratch`` is the same architecture from random initialisation, fine-tuned end to end
(finetune) or, under ``linear``, the frozen random network (one initialisation, seeded with the first
seed) probed linearly; a checkpoint path is that checkpoint under the same protocol.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ssl_lightning.eval.commands import log_to_wandb
from ssl_lightning.eval.features import build_datamodule, extract_features, load_method
from ssl_lightning.eval.finetune import finetune_method, nested_subsets, untrained_copy
from ssl_lightning.eval.linear import topk_accuracy
from ssl_lightning.eval.transfer import add_data_arguments, data_options, evaluation_data
from ssl_lightning.methods import SSLMethod

PROTOCOLS = ("linear", "finetune")
LINEAR_MIN_STEPS = 300  # a probe on 10 images gets as many Adam steps as one on 60000 (30 epochs of 59 batches)

Curves = dict[str, dict[float, list[float]]]  # model ("ssl", "baseline") -> fraction (%) -> top-1 per seed


@dataclass(frozen=True)
class LabelsSaved:
    fraction: float  # percent at which the SSL accuracy was measured
    needed: float  # percent the baseline needs to reach it; a bound unless bound is "="
    bound: str  # "=" interpolated, "<=" reached at the smallest fraction already, ">" never reached

    @property
    def ratio(self) -> float:
        """needed / fraction: how many times the labels the baseline needs."""
        return self.needed / self.fraction

    def text(self) -> tuple[str, str]:
        prefix = "" if self.bound == "=" else f"{self.bound} "
        return f"{prefix}{self.needed:.3g}%", f"{prefix}{self.ratio:.3g}x"


def labels_saved(fractions: Sequence[float], ssl: Sequence[float], baseline: Sequence[float]) -> list[LabelsSaved]:
    """For each fraction f_i (percent, strictly ascending) the fraction g the baseline needs to reach the
    SSL accuracy a = ssl[i]: the first point where the baseline curve, linear between its measured points
    on a log-fraction axis, reaches a. Between f_j and f_{j+1} with baseline[j] < a <= baseline[j+1]:
    log g = log f_j + (a - b_j) / (b_{j+1} - b_j) * (log f_{j+1} - log f_j). When baseline[0] >= a,
    g <= f_0 (bound "<="); when the baseline never reaches a, g > the largest fraction (bound ">",
    "> 100%" when that is 100). Example: fractions 1, 10, 100 with baseline 0.5, 0.7, 0.9 and SSL 0.6
    at 1%: g = 10 ** 0.5 = 3.16%, the baseline needs 3.16x the labels."""
    if any(b <= a for a, b in zip(fractions, fractions[1:])) or not len(fractions) == len(ssl) == len(baseline):
        raise ValueError(f"fractions {list(fractions)} must be strictly ascending, one SSL and one baseline "
                         "accuracy each")
    out = []
    for f, a in zip(fractions, ssl):
        if baseline[0] >= a:
            out.append(LabelsSaved(f, fractions[0], "<="))
            continue
        needed = LabelsSaved(f, fractions[-1], ">")
        for (f0, b0), (f1, b1) in zip(zip(fractions, baseline), zip(fractions[1:], baseline[1:])):
            if b0 < a <= b1:
                t = (a - b0) / (b1 - b0)
                at = f1 if t == 1 else math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))  # f1 exactly
                needed = LabelsSaved(f, at, "=")
                break
        out.append(needed)
    return out


def rounding_notes(labels: torch.Tensor, fractions: Sequence[float]) -> list[str]:
    """One line per fraction (percent) that is less than one image in some class of ``labels`` (N,)
    and is rounded up to one image there."""
    counts = torch.bincount(labels[labels >= 0])
    counts = counts[counts > 0]
    notes = []
    for f in fractions:
        short = [c for c in counts.tolist() if round(f / 100 * c) < 1]
        if short:
            kept = sum(max(1, round(f / 100 * c)) for c in counts.tolist())
            notes.append(f"note: {f:g}% is less than one image in {len(short)} of {len(counts)} classes "
                         f"(of {min(short)}..{max(short)}): rounded up to 1 per class, {kept} labelled images "
                         f"({100 * kept / int(counts.sum()):.3g}% of {int(counts.sum())})")
    return notes


def train_linear_heads(xs: torch.Tensor, ys: torch.Tensor, *, num_classes: int, seeds: Sequence[int], epochs: int,
                       lr: float = 1e-2, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """ssl_lightning.eval.linear.train_linear for S probes at once: xs (S, n, D) standardised features and
    ys (S, n) labels of S subsets of one size. Probe s gets the initialisation and the shuffling that
    train_linear(xs[s], ys[s], seed=seeds[s]) gives it, and the summed loss and Adam keep the probes
    independent, so they are train_linear's (to float rounding), S times faster on a CPU where small
    steps are overhead. Returns weights (S, D, C) and biases (S, C)."""
    count, n, dim = xs.shape
    inits = []
    for seed in seeds:
        torch.manual_seed(seed)
        inits.append(torch.nn.Linear(dim, num_classes))
    weight = torch.stack([head.weight.detach().T for head in inits]).requires_grad_()
    bias = torch.stack([head.bias.detach() for head in inits]).requires_grad_()
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    opt = torch.optim.Adam([weight, bias], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-n // batch_size), eta_min=lr * 1e-6)
    rows = torch.arange(count)[:, None]
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in generators])
        for idx in order.split(batch_size, dim=1):
            logits = torch.baddbmm(bias[:, None], xs[rows, idx], weight)  # (S, B, C)
            loss = F.cross_entropy(logits.transpose(1, 2), ys[rows, idx], reduction="none").mean(1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return weight.detach(), bias.detach()


def linear_curves(models: dict[str, tuple[SSLMethod, dict]], fractions: Sequence[float], seeds: Sequence[int], *,
                  epochs: int, num_workers: int = 0) -> Curves:
    """Features of each model's train and val splits once (the same images in the same order for every
    model), then a linear probe per fraction (percent) and seed on the same subsets for every model."""
    curves: Curves = {}
    subsets: dict[int, dict[float, torch.Tensor]] = {}
    for name, (method, data) in models.items():
        start = time.time()
        train_x, train_y = extract_features(method, data, "train", num_workers=num_workers)
        val_x, val_y = extract_features(method, data, "val", num_workers=num_workers)
        extracted = time.time()
        if not subsets:
            subsets = {seed: nested_subsets(train_y, [f / 100 for f in fractions], seed=seed) for seed in seeds}
            reference = train_y
        elif not torch.equal(train_y, reference):
            raise ValueError(f"{name} was evaluated on other train images than the first model; "
                             "give both the same data")
        mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)  # all train images, no labels
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
        num_classes = int(max(train_y.max(), val_y.max())) + 1
        curves[name] = {}
        for f in fractions:
            idx = torch.stack([subsets[seed][f / 100] for seed in seeds])  # (S, n): one size for every seed
            steps_per_epoch = -(-idx.shape[1] // 1024)
            weight, bias = train_linear_heads(train_x[idx], train_y[idx], num_classes=num_classes, seeds=seeds,
                                              epochs=max(epochs, -(-LINEAR_MIN_STEPS // steps_per_epoch)))
            with torch.no_grad():
                logits = torch.baddbmm(bias[:, None], val_x.expand(len(seeds), -1, -1), weight)
            curves[name][f] = [topk_accuracy(seed_logits, val_y, 1) for seed_logits in logits]
        print(f"{name}: features of {len(train_x)} + {len(val_x)} images in {extracted - start:.1f} s, "
              f"{len(fractions) * len(seeds)} probes in {time.time() - extracted:.1f} s", flush=True)
    return curves


def finetune_curves(models: dict[str, tuple[Callable[[int], SSLMethod], dict]], fractions: Sequence[float],
                    seeds: Sequence[int], **finetune_kwargs) -> Curves:
    """A fresh copy of each model (``make(seed)``) fine-tuned per fraction and seed (finetune_method)."""
    curves: Curves = {}
    for name, (make, data) in models.items():
        curves[name] = {f: [] for f in fractions}
        for seed in seeds:
            for f in fractions:
                result = finetune_method(make(seed), data, label_fraction=f / 100, seed=seed, **finetune_kwargs)
                curves[name][f].append(result["finetune/top1"])
    return curves


def summarise(curves: Curves, fractions: Sequence[float], labelled: dict[float, int]) -> list[dict]:
    """One row per fraction: labelled images, mean and std (over seeds) of both models, labels saved."""
    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    ssl = [stats(curves["ssl"][f]) for f in fractions]
    base = [stats(curves["baseline"][f]) for f in fractions]
    saved = labels_saved(fractions, [m for m, _ in ssl], [m for m, _ in base])
    return [{"fraction_percent": f, "labelled": labelled[f], "ssl_top1_mean": s[0], "ssl_top1_std": s[1],
             "baseline_top1_mean": b[0], "baseline_top1_std": b[1], "baseline_needs_percent": x.needed,
             "baseline_needs_bound": x.bound, "labels_saved_ratio": x.ratio}
            for f, s, b, x in zip(fractions, ssl, base, saved)]


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, f"{'labels':>8} {'images':>7} {'SSL top-1 %':>14} {'baseline top-1 %':>17} "
                     f"{'baseline needs':>15} {'labels saved':>13}"]
    for r in rows:
        needs, ratio = LabelsSaved(r["fraction_percent"], r["baseline_needs_percent"], r["baseline_needs_bound"]).text()
        lines.append(f"{r['fraction_percent']:>7g}% {r['labelled']:>7} "
                     f"{100 * r['ssl_top1_mean']:>7.2f} +- {100 * r['ssl_top1_std']:<4.2f}"
                     f"{100 * r['baseline_top1_mean']:>9.2f} +- {100 * r['baseline_top1_std']:<5.2f}"
                     f"{needs:>15} {ratio:>13}")
    return "\n".join(lines)


def write_outputs(rows: list[dict], curves: Curves, seeds: Sequence[int], out: Path, stem: str,
                  names: tuple[str, str], title: str = "label efficiency") -> dict[str, Path]:
    """``<stem>.csv`` (the table), ``<stem>_runs.csv`` (top-1 per model, fraction, seed), ``<stem>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "runs": out / f"{stem}_runs.csv", "plot": out / f"{stem}.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["runs"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "fraction_percent", "seed", "top1"])
        writer.writerows([model, fraction, seed, top1] for model, per_fraction in curves.items()
                         for fraction, values in per_fraction.items() for seed, top1 in zip(seeds, values))
    plot_curves(rows, paths["plot"], names, title)
    return paths


def plot_curves(rows: list[dict], path: Path, names: tuple[str, str], title: str = "label efficiency") -> Path:
    """Top-1 (mean +- std over seeds) against the label fraction, log x, both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["fraction_percent"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, name, marker in (("ssl", names[0], "o"), ("baseline", names[1], "s")):
        ax.errorbar(x, [100 * r[f"{key}_top1_mean"] for r in rows], yerr=[100 * r[f"{key}_top1_std"] for r in rows],
                    marker=marker, capsize=3, label=name)
    ax.set(xscale="log", xlabel="labelled fraction of the train split (%)", ylabel="top-1 accuracy (%)",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def copies(source: SSLMethod, *, random_init: bool) -> Callable[[int], SSLMethod]:
    """seed -> a fresh copy of ``source`` to train: its weights, or (random_init) the same architecture
    initialised with torch seed ``seed``."""
    def make(seed: int) -> SSLMethod:
        torch.manual_seed(seed)
        return untrained_copy(source) if random_init else copy.deepcopy(source)
    return make


def fraction_percent(value: str) -> float:
    """--fractions: percent of each class in (0, 100]."""
    percent = float(value)
    if not 0 < percent <= 100:
        raise argparse.ArgumentTypeError(f"--fractions {value} is not a percentage in (0, 100]; use e.g. 1 10 100")
    return percent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-lightning label-efficiency", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--fractions", type=fraction_percent, nargs="+", default=[1, 2, 5, 10, 25, 100],
                        help="percent of each class of the train split")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="linear")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baseline", default="scratch", help="scratch (random init) or another checkpoint")
    parser.add_argument("--out", default=None, help="output folder (default: <run dir>/label_efficiency)")
    parser.add_argument("--epochs", type=int, default=30,
                        help=f"linear: probe epochs (at least {LINEAR_MIN_STEPS} steps); finetune: epochs per run")
    parser.add_argument("--lr", type=float, default=3e-3, help="finetune: AdamW lr of the head")
    parser.add_argument("--backbone_lr_scale", type=float, default=0.1, help="finetune: backbone lr = lr x this")
    parser.add_argument("--batch_size", type=int, default=64, help="finetune")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--no_wandb", action="store_true", help="print and write files only")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error(f"--epochs {args.epochs} and --batch_size {args.batch_size} must both be >= 1")
    return args


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    start = time.time()
    fractions, seeds = sorted(set(args.fractions)), list(dict.fromkeys(args.seeds))
    method, stored = load_method(args.ckpt)
    data = evaluation_data(method, stored, **data_options(args))
    same_data = {"dataset": data.get("dataset"), "data_dir": data.get("data_dir")}
    if args.baseline == "scratch":
        base_method, base_data = method, data
        base_name = f"scratch ({'frozen random network' if args.protocol == 'linear' else 'random init'})"
    else:
        base_method, base_stored = load_method(args.baseline)
        base_data = evaluation_data(base_method, base_stored, **{**data_options(args), **same_data})
        base_name = Path(args.baseline).resolve().parent.parent.name
    labels = torch.as_tensor(build_datamodule(data)._load("train", labelled=True).labels)
    for note in rounding_notes(labels, fractions):
        print(note, flush=True)
    if args.protocol == "linear":
        if args.baseline == "scratch":
            base_method = copies(method, random_init=True)(seeds[0]).eval()
        curves = linear_curves({"ssl": (method, data), "baseline": (base_method, base_data)}, fractions, seeds,
                               epochs=args.epochs, num_workers=args.num_workers)
    else:
        curves = finetune_curves({"ssl": (copies(method, random_init=False), data),
                                  "baseline": (copies(base_method, random_init=args.baseline == "scratch"),
                                               base_data)},
                                 fractions, seeds, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 backbone_lr_scale=args.backbone_lr_scale, num_workers=args.num_workers)
    counts = torch.bincount(labels[labels >= 0])
    labelled = {f: sum(max(1, round(f / 100 * c)) for c in counts[counts > 0].tolist()) for f in fractions}
    rows = summarise(curves, fractions, labelled)
    seconds = time.time() - start
    header = (f"label efficiency of {args.ckpt} on {data.get('dataset')} ({args.protocol} protocol, top-1 on the "
              f"val split, mean +- std over seeds {' '.join(map(str, seeds))}); baseline: {base_name}; "
              f"{seconds:.1f} s")
    print(format_table(rows, header), flush=True)
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / "label_efficiency"
    paths = write_outputs(rows, curves, seeds, out, args.protocol, ("SSL checkpoint", f"baseline: {base_name}"),
                          f"label efficiency on {data.get('dataset')} ({args.protocol} protocol)")
    print(f"wrote {paths['csv']}, {paths['runs']}, {paths['plot']}", flush=True)
    if not args.no_wandb:
        exact = ("baseline_needs_percent", "labels_saved_ratio")  # logged where not a bound
        results = {f"label_efficiency/{key}_{r['fraction_percent']:g}pct": r[key] for r in rows
                   for key in ("ssl_top1_mean", "ssl_top1_std", "baseline_top1_mean", "baseline_top1_std") + exact
                   if key not in exact or r["baseline_needs_bound"] == "="}
        run = log_to_wandb(f"label-efficiency-{args.protocol}", args.ckpt, {**results, "label_efficiency/seconds":
                           seconds}, images={"label_efficiency/plot": paths["plot"]})
        print(f"logged to W&B run {run}", flush=True)
    return rows
