"""``ssl-lightning robustness --ckpt ...``: linear-probe error under ImageNet-C-style corruptions.

A linear probe is trained on clean training features (as ``ssl-lightning linear``), then evaluated
on the validation images under each corruption x severity (ssl_lightning.eval.corruptions). The
corruptions act on the raw images: clean float images in [0, 1] -> corrupt -> normalise -> backbone.
With ``--baseline`` the baseline checkpoint takes AlexNet's place in Hendrycks & Dietterich's
corruption errors: CE_c = sum_s E(c, s) / sum_s E_base(c, s), mCE = mean_c CE_c, and relative
CE_c = sum_s (E(c, s) - E(clean)) / sum_s (E_base(c, s) - E_base(clean)), relative mCE = mean_c.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
import zlib
from pathlib import Path

import torch

from ssl_lightning.cli import ConfigError
from ssl_lightning.data.datasets import TensorImageDataset
from ssl_lightning.data.views import build_eval_transform
from ssl_lightning.eval.corruptions import COLOUR_ONLY, CORRUPTIONS, SEVERITIES, applicable, corrupt
from ssl_lightning.eval.features import build_datamodule, extract_features, load_method
from ssl_lightning.eval.linear import train_linear
from ssl_lightning.eval.transfer import (add_data_arguments, backbone_channels, data_options, evaluation_data,
                                         input_adapter)
from ssl_lightning.methods import SSLMethod

Errors = dict[str, dict[int, float]]  # corruption -> severity -> top-1 error


def check_request(corruptions: list[str], severities: list[int], channels: int, dataset: str) -> None:
    """ConfigError for an unknown corruption, a severity outside 1..5, saturate on 1-channel data."""
    unknown = [name for name in corruptions if name not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruption {unknown[0]!r}; choose from {', '.join(CORRUPTIONS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ConfigError(f"severity {bad[0]} is outside 1..5 (ImageNet-C's five levels); e.g. --severities 1 2 3 4 5")
    colour = [name for name in corruptions if name in COLOUR_ONLY and channels != 3]
    if colour:
        raise ConfigError(f"{colour[0]} needs colour images but {dataset} has {channels} channel(s); "
                          f"drop it from --corruptions")


def validation_images(data: dict, max_samples: int | None = None, seed: int = 0,
                      image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, C, S, S), labels (N,)) of the labelled validation split of the data module
    described by ``data``, resized and centre-cropped as the eval transform does but not normalised;
    the seeded subset of ``max_samples`` that SSLDataModule.eval_loader draws. S defaults to the data
    module's image size (pass the model's for another dataset)."""
    datamodule = build_datamodule(data)
    base = datamodule._load("val", labelled=True)
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))
    indices = order[:min(max_samples or len(base), len(base))]
    size = image_size or datamodule.image_size
    if isinstance(base, TensorImageDataset) and base.images.shape[-1] == size:
        return base.images[indices], base.labels[indices]
    channels = datamodule.info.channels
    to_unit = build_eval_transform(size, (0.0,) * channels, (1.0,) * channels)  # resize, crop, /255
    samples = [base[i] for i in indices.tolist()]
    images = torch.stack([(to_unit(image) * 255).round().to(torch.uint8) for image, _ in samples])
    return images, torch.tensor([label for _, label in samples])


def batch_seed(seed: int, corruption: str, severity: int, batch: int) -> int:
    """A stable seed per (run seed, corruption, severity, batch): the same images get the same noise."""
    return zlib.crc32(f"{seed}/{corruption}/{severity}/{batch}".encode())


@torch.no_grad()
def corrupted_features(method: SSLMethod, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                       corruption: str | None = None, severity: int = 0, *, seed: int = 0,
                       batch_size: int = 256, adapt: torch.nn.Module | None = None) -> torch.Tensor:
    """(N, D) features of uint8 images (N, C, S, S): to [0, 1], corrupted (None: clean), normalised
    with the per-channel ``mean``/``std`` (C,), through the method's evaluated backbone."""
    feats = []
    for index, chunk in enumerate(images.split(batch_size)):
        x = chunk.float().div(255)
        if corruption is not None:
            x = corrupt(x, corruption, severity, seed=batch_seed(seed, corruption, severity, index))
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        feats.append(method(adapt(x) if adapt is not None else x).float())  # adapt: other data's channels
    return torch.cat(feats)


def corruption_errors(method: SSLMethod, data: dict, corruptions: list[str], severities: list[int], *,
                      val_samples: int | None = None, train_samples: int | None = None, epochs: int = 30,
                      seed: int = 0, num_workers: int = 0) -> tuple[float, Errors]:
    """(clean top-1 error, errors[corruption][severity]) of a linear probe trained on the clean
    training features of ``data`` (extract, standardise with the train statistics, train_linear)."""
    info = build_datamodule(data).info
    check_request(corruptions, severities, info.channels, data.get("dataset", "?"))
    train_x, train_y = extract_features(method, data, "train", num_workers=num_workers, max_samples=train_samples,
                                        seed=seed)
    f_mean, f_std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    images, labels = validation_images(data, val_samples, seed)
    num_classes = info.num_classes or int(max(train_y.max(), labels.max())) + 1
    head = train_linear((train_x - f_mean) / f_std, train_y, num_classes=num_classes, epochs=epochs, seed=seed)
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)

    def error(corruption: str | None, severity: int = 0) -> float:
        feats = corrupted_features(method, images, mean, std, corruption, severity, seed=seed,
                                   adapt=input_adapter(backbone_channels(method), info))
        with torch.no_grad():
            predictions = head((feats - f_mean) / f_std).argmax(1)
        return (predictions != labels).float().mean().item()

    return error(None), {c: {s: error(c, s) for s in severities} for c in corruptions}


def summarise(clean: float, errors: Errors) -> dict:
    """Per-corruption mean error over severities and their mean (the unnormalised mCE)."""
    per_corruption = {c: sum(e.values()) / len(e) for c, e in errors.items()}
    return {"clean_error": clean, "errors": errors, "corruption_error": per_corruption,
            "mean_corruption_error": sum(per_corruption.values()) / len(per_corruption)}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def relative_to_baseline(clean: float, errors: Errors, base_clean: float, base_errors: Errors) -> dict:
    """Hendrycks & Dietterich's CE_c, mCE, relative CE_c and relative mCE with the baseline in AlexNet's
    place; a ratio whose baseline denominator is <= 0 (the baseline not hurt at all) is NaN."""
    ce = {c: _ratio(sum(errors[c].values()), sum(base_errors[c].values())) for c in errors}
    relative = {c: _ratio(sum(e - clean for e in errors[c].values()),
                          sum(e - base_clean for e in base_errors[c].values())) for c in errors}
    return {"CE": ce, "mCE": sum(ce.values()) / len(ce),
            "relative_CE": relative, "relative_mCE": sum(relative.values()) / len(relative)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(panels: dict[str, dict], path: Path) -> Path:
    """Error (%) per corruption (rows) x clean + severity (columns), numbers in the cells; one panel
    per entry of ``panels`` (name -> summarise() output)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(1.2 + 4.8 * len(panels), 1.0 + 0.42 * len(next(iter(panels.values()))["errors"])))
    for ax, (title, summary) in zip(axes[0], panels.items()):
        names = list(summary["errors"])
        severities = list(next(iter(summary["errors"].values())))
        grid = torch.tensor([[summary["clean_error"]] + [summary["errors"][c][s] for s in severities] for c in names])
        ax.imshow(grid.numpy() * 100, cmap="magma_r", vmin=0, vmax=100, aspect="auto")
        for (i, j), value in zip(torch.cartesian_prod(torch.arange(len(names)), torch.arange(grid.shape[1])).tolist(),
                                 grid.flatten().tolist()):
            ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if value > 0.5 else "black")
        ax.set_xticks(range(grid.shape[1]), ["clean"] + [str(s) for s in severities])
        ax.set_yticks(range(len(names)), names)
        ax.set(xlabel="severity", title=f"{title}: top-1 error (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def example_grid(image: torch.Tensor, corruptions: list[str], path: Path, seed: int = 0) -> Path:
    """One uint8 image (C, S, S) under each corruption (rows) at clean and severities 1-5 (columns)."""
    plt = _pyplot()
    clean = image.float().div(255)[None]
    fig, axes = plt.subplots(len(corruptions), 6, figsize=(7.2, 1.25 * len(corruptions)), squeeze=False)
    for row, name in enumerate(corruptions):
        for col in range(6):
            x = clean if col == 0 else corrupt(clean, name, col, seed=batch_seed(seed, name, col, 0))
            ax = axes[row][col]
            ax.imshow(x[0].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title("clean" if col == 0 else f"severity {col}", fontsize=8)
        axes[row][0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(summary: dict, baseline: dict | None, ratios: dict | None) -> str:
    """One screen: error (%) per corruption and severity, its mean, and the baseline's CE figures."""
    severities = list(next(iter(summary["errors"].values())))
    head = f"{'corruption':18s}" + "".join(f"{s:>7d}" for s in severities) + f"{'mean':>8s}"
    if baseline:
        head += f"{'base':>8s}{'CE':>8s}{'rel CE':>8s}"
    lines = [head]
    for name, by_severity in summary["errors"].items():
        line = f"{name:18s}" + "".join(f"{100 * e:7.1f}" for e in by_severity.values())
        line += f"{100 * summary['corruption_error'][name]:8.1f}"
        if baseline and ratios:
            line += (f"{100 * baseline['corruption_error'][name]:8.1f}{100 * ratios['CE'][name]:8.1f}"
                     f"{100 * ratios['relative_CE'][name]:8.1f}")
        lines.append(line)
    lines.append(f"clean error {100 * summary['clean_error']:.1f}%, mean corruption error "
                 f"{100 * summary['mean_corruption_error']:.1f}%")
    if baseline and ratios:
        lines.append(f"baseline: clean {100 * baseline['clean_error']:.1f}%, mean corruption error "
                     f"{100 * baseline['mean_corruption_error']:.1f}%; mCE {100 * ratios['mCE']:.1f}%, "
                     f"relative mCE {100 * ratios['relative_mCE']:.1f}%")
    return "\n".join(lines)


def write_tables(results: dict, out: Path) -> None:
    """robustness.json (NaN as null) and robustness.csv (corruption, severity, error[, baseline_error];
    the clean error as corruption "clean", severity 0)."""
    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value

    (out / "robustness.json").write_text(json.dumps(plain(results), indent=2) + "\n")
    model, base = results["model"], results.get("baseline_model")
    with open(out / "robustness.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["corruption", "severity", "error"] + (["baseline_error"] if base else []))
        writer.writerow(["clean", 0, model["clean_error"]] + ([base["clean_error"]] if base else []))
        for name, by_severity in model["errors"].items():
            for severity, error in by_severity.items():
                writer.writerow([name, severity, error] + ([base["errors"][name][severity]] if base else []))


def flat_metrics(results: dict) -> dict[str, float]:
    """robustness/<name> numbers for W&B."""
    model = results["model"]
    flat = {"robustness/clean_error": model["clean_error"],
            "robustness/mean_corruption_error": model["mean_corruption_error"]}
    for name, by_severity in model["errors"].items():
        flat[f"robustness/{name}/error"] = model["corruption_error"][name]
        flat.update({f"robustness/{name}/severity_{s}": e for s, e in by_severity.items()})
    for key in ("mCE", "relative_mCE"):
        if key in results:
            flat[f"robustness/{key}"] = results[key]
    for name, value in results.get("CE", {}).items():
        flat[f"robustness/{name}/CE"] = value
    return flat


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-lightning robustness", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--baseline", default=None, help="a checkpoint in AlexNet's place for CE / mCE")
    parser.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                        help=f"default: all that apply to the data ({', '.join(CORRUPTIONS)})")
    parser.add_argument("--severities", type=int, nargs="+", default=list(SEVERITIES))
    parser.add_argument("--val_samples", type=int, default=None, help="fixed seeded subset of the validation split")
    parser.add_argument("--train_samples", type=int, default=None, help="fixed seeded subset of the train split")
    parser.add_argument("--epochs", type=int, default=30, help="linear probe epochs")
    parser.add_argument("--seed", type=int, default=0, help="subsets, probe and corruption noise")
    parser.add_argument("--out", default=None, help="default: <run dir>/robustness next to the checkpoints/ dir")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--no_wandb", action="store_true", help="print and write files only")
    add_data_arguments(parser)  # --data.dataset / --data.data_dir: another dataset (eval.transfer)
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
    args, start = parse_args(argv), time.time()
    check_request(args.corruptions or [], args.severities, 3, "")  # names and severities, before any loading
    method, data = load_method(args.ckpt)
    data = evaluation_data(method, data, **data_options(args))
    channels = build_datamodule(data).info.channels
    corruptions = args.corruptions or applicable(channels)
    if args.corruptions is None and len(corruptions) < len(CORRUPTIONS):
        print(f"skipping {', '.join(sorted(set(CORRUPTIONS) - set(corruptions)))}: needs colour images, "
              f"{data.get('dataset')} has {channels} channel(s)")
    check_request(corruptions, args.severities, channels, data.get("dataset", "?"))
    options = dict(val_samples=args.val_samples, train_samples=args.train_samples, epochs=args.epochs,
                   seed=args.seed, num_workers=args.num_workers)
    summary = summarise(*corruption_errors(method, data, corruptions, args.severities, **options))
    results = {"checkpoint": str(args.ckpt), "baseline": args.baseline, "dataset": data.get("dataset"),
               "severities": args.severities, **options, "model": summary}
    baseline = ratios = None
    if args.baseline:
        base_method, base_data = load_method(args.baseline)
        base_data = evaluation_data(base_method, base_data, **data_options(args))
        if base_data.get("dataset") != data.get("dataset"):
            raise ConfigError(f"--baseline {args.baseline} was trained on {base_data.get('dataset')}, the checkpoint "
                              f"on {data.get('dataset')}; compare checkpoints of the same dataset")
        baseline = summarise(*corruption_errors(base_method, base_data, corruptions, args.severities, **options))
        ratios = relative_to_baseline(summary["clean_error"], summary["errors"],
                                      baseline["clean_error"], baseline["errors"])
        results.update(baseline_model=baseline, **ratios)
    results["seconds"] = time.time() - start
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / "robustness"
    out.mkdir(parents=True, exist_ok=True)
    write_tables(results, out)
    panels = {"model": summary, **({"baseline": baseline} if baseline else {})}
    images = {"robustness/heatmap": heatmap(panels, out / "robustness_heatmap.png"),
              "robustness/examples": example_grid(validation_images(data, 1, args.seed)[0][0], corruptions,
                                                  out / "robustness_examples.png", args.seed)}
    print(f"robustness of {args.ckpt} (top-1 error %, linear probe):")
    print(table(summary, baseline, ratios))
    print(f"{results['seconds']:.0f} s; wrote {out}/robustness.json, .csv, robustness_heatmap.png, "
          "robustness_examples.png")
    if not args.no_wandb:
        from ssl_lightning.eval.commands import log_to_wandb

        print(f"logged to W&B run {log_to_wandb('robustness', args.ckpt, flat_metrics(results), images)}", flush=True)
    return results
