"""``ssl-lightning audit --data.dataset NAME --data.data_dir DIR [--ckpt CKPT] [--out DIR]
[--write-exclude FILE]``: checks every image of the train and val splits once (docs/audit.md).

Writes ``DIR/audit.json`` ({"summary": {...}, "issues": {kind: [{"path": ...}, ...]}}), ``DIR/report.md``
with a thumbnail grid per kind, and prints a one-screen summary. ``--write-exclude FILE`` lists the
paths flagged by ``--exclude-kinds`` for ``data.exclude: FILE``.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

from ssl_lightning.audit import checks, duplicates, report
from ssl_lightning.audit.scan import Split, load_split, scan_split
from ssl_lightning.data.datasets import DATASET_NAMES, ImageFolderDataset, find_data_dir, load_dataset
from ssl_lightning.data.decode import UnreadableImage, decode, open_image

DEFAULT_EXCLUDE_KINDS = "corrupt,exact_duplicate,near_duplicate,split_leak,low_information"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-lightning audit", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a fit config (YAML); its data: section names the dataset")
    parser.add_argument("--data.dataset", dest="dataset", choices=DATASET_NAMES, default=None)
    parser.add_argument("--data.data_dir", dest="data_dir", default=None)
    parser.add_argument("--data.synthetic_size", dest="synthetic_size", type=int, default=None)
    parser.add_argument("--ckpt", help="a checkpoint: adds embedding near duplicates, outliers and clusters")
    parser.add_argument("--out", default=None, help="output folder (default runs/audit-<dataset>)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers decoding the images")
    parser.add_argument("--write-exclude", dest="write_exclude", help="write the flagged paths here")
    parser.add_argument("--exclude-kinds", dest="exclude_kinds", default=DEFAULT_EXCLUDE_KINDS,
                        help="comma-separated kinds whose paths --write-exclude lists")
    for field in dataclasses.fields(checks.Thresholds):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=field.default,
                            type=int if field.type == "int" else float, help=f"threshold (default {field.default})")
    return parser.parse_args(argv)


def data_options(args: argparse.Namespace) -> dict:
    """dataset, data_dir, synthetic_size: the options, else the config's data: section, else imagefolder."""
    data = {}
    if args.config:
        if not Path(args.config).is_file():
            raise ValueError(f"--config {args.config}: no such file")
        data = ((yaml.safe_load(Path(args.config).read_text()) or {}).get("data") or {})
        data = data.get("init_args", data)
    return {"dataset": args.dataset or data.get("dataset") or "imagefolder",
            "data_dir": args.data_dir or data.get("data_dir"),
            "synthetic_size": args.synthetic_size or data.get("synthetic_size") or 512}


def load_splits(data: dict) -> list[Split]:
    """train (and val where it exists), labelled where the data has labels (class folders)."""
    name, data_dir = data["dataset"], data["data_dir"]
    find_data_dir(name, data_dir)
    splits = []
    for split in ("train", "val"):
        try:
            dataset = load_dataset(name, data_dir, split, labelled=True, synthetic_size=data["synthetic_size"])
        except FileNotFoundError:
            if split == "val":
                continue
            dataset = load_dataset(name, data_dir, split, labelled=False)  # no class folders
        splits.append(load_split(dataset, name, split))
    return splits


def image_loader(splits: list[Split]) -> report.Loader:
    """path -> RGB PIL image for the thumbnails (None when unreadable)."""
    where = {p: (s, i) for s in splits for i, p in enumerate(s.paths)}

    def load(path: str) -> Image.Image | None:
        split, index = where[path]
        if isinstance(split.dataset, ImageFolderDataset):
            try:
                with open_image(split.dataset.files[index]) as image:
                    image.draft("RGB", (report.THUMB, report.THUMB))
                    return decode(image, 3).copy()
            except (UnreadableImage, OSError):
                return None
        array = split.dataset.images[index].permute(1, 2, 0).numpy()
        return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")

    return load


def embedding_checks(args, data: dict, records: list[dict], issues: dict, t: checks.Thresholds) -> dict:
    """audit --ckpt: embedding near duplicates, outliers; returns the cluster summary with member paths."""
    from ssl_lightning.audit import embedding_checks as emb
    from ssl_lightning.eval.embed import embed_splits
    from ssl_lightning.eval.features import load_method

    method, _ = load_method(args.ckpt)
    corrupt = [e["path"] for e in issues["corrupt"]]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as exclude:  # embed only readable images
        exclude.write("".join(f"{p}\n" for p in corrupt))
    embed_data = {**data, "labelled": False, "views": [{"size": int(method.hparams.get("image_size", 32))}],
                  "exclude": exclude.name if corrupt else None}
    splits = sorted({r["split"] for r in records}, key=["train", "val"].index)
    embedded = embed_splits(method, embed_data, splits, num_workers=args.num_workers)
    Path(exclude.name).unlink()
    index = {r["path"]: i for i, r in enumerate(records)}
    rows = [index[p] for p in embedded["paths"]]
    z = emb.normalise(embedded["features"])
    flagged = {e["path"] for kind in ("exact_duplicate", "near_duplicate", "split_leak") for e in issues[kind]}
    for i, j, cosine in emb.embedding_pairs(z, t.near_cosine):
        a, b = records[rows[i]], records[rows[j]]
        if b["path"] not in flagged:
            flagged.add(b["path"])
            kind = "split_leak" if a["split"] != b["split"] else "near_duplicate"
            issues[kind].append({"path": b["path"], "split": b["split"], "duplicate_of": a["path"],
                                 "duplicate_split": a["split"], "match": "embedding", "cosine": round(cosine, 4)})
    distance, is_outlier, cutoff = emb.outliers(z, t.knn, t.outlier_mad)
    issues["outlier"] = sorted(({"path": records[rows[i]]["path"], "split": records[rows[i]]["split"],
                                 "knn_distance": round(float(distance[i]), 4), "cutoff": round(cutoff, 4)}
                                for i in torch.nonzero(is_outlier).flatten().tolist()),
                               key=lambda e: -e["knn_distance"])
    assign = emb.kmeans(z, t.clusters)
    summary = emb.cluster_summary(assign, t.clusters)
    members = {c: [records[rows[i]]["path"] for i in torch.nonzero(assign == c).flatten()[:report.GRID_MAX].tolist()]
               for c in summary["ids"]}
    return {**summary, "members": members}


def run_audit(args: argparse.Namespace) -> dict:
    """The whole audit; returns the audit dict written to audit.json."""
    t = checks.Thresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(checks.Thresholds)})
    data = data_options(args)
    splits = load_splits(data)
    start = time.perf_counter()
    records = [r for split in splits for r in scan_split(split, num_workers=args.num_workers)]
    seconds = time.perf_counter() - start
    readable = sum(r["ok"] for r in records)
    if not readable:
        raise ValueError(f"no readable image among the {len(records)} files of {data['dataset']} "
                         f"{data['data_dir'] or ''}".rstrip())
    issues = checks.image_issues(records, t)
    issues.update(duplicates.duplicate_issues(records, max_hamming=t.near_hamming, max_fine=t.near_fine,
                                                  min_std=t.low_information))
    summary = {"dataset": data["dataset"], "data_dir": data["data_dir"], "images": len(records),
               "readable": readable, "splits": {s.name: len(s.paths) for s in splits},
               "scan_seconds": round(seconds, 2), "images_per_s": round(len(records) / max(seconds, 1e-9), 1),
               **checks.size_summary(records), "thresholds": dataclasses.asdict(t)}
    classes = checks.class_counts(records, splits[0].classes)
    if classes:
        summary["classes"] = classes
    audit = {"summary": summary, "issues": issues}
    if args.ckpt:
        clusters = embedding_checks(args, data, records, issues, t)
        summary["clusters"] = {k: v for k, v in clusters.items() if k != "members"}
        audit["clusters"] = clusters
    summary["counts"] = {kind: len(entries) for kind, entries in issues.items()}
    audit["_loader"] = image_loader(splits)
    return audit


def main(argv: list[str]) -> None:
    from ssl_lightning.cli import ConfigError
    from ssl_lightning.console import first_line

    args = parse_args(argv)
    try:
        audit = run_audit(args)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:
        raise ConfigError(first_line(err)) from err
    load = audit.pop("_loader")
    out = Path(args.out or f"runs/audit-{audit['summary']['dataset']}")
    out.mkdir(parents=True, exist_ok=True)
    members = audit.get("clusters", {}).get("members")
    report.write_markdown(audit, out, load, members)
    if members:
        audit["clusters"]["thumbnails"] = {c: f"thumbnails/cluster_{c}.png" for c in members}
    report.write_json(audit, out)
    print(report.summary_table(audit))
    print(f"  wrote {out / 'audit.json'} and {out / 'report.md'}")
    if args.write_exclude:
        kinds = [k.strip() for k in args.exclude_kinds.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in audit["issues"]]
        if unknown:
            raise ConfigError(f"--exclude-kinds: unknown kind(s) {', '.join(unknown)}; "
                              f"choose from {', '.join(audit['issues'])}")
        count = report.write_exclude(audit, kinds, Path(args.write_exclude))
        print(f"  wrote {count} paths ({', '.join(kinds)}) to {args.write_exclude}: set data.exclude to it")
