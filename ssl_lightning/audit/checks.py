"""Per-image checks on the scan records, and class counts. Thresholds: docs/audit.md (how they were chosen)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    """Every limit of the audit; each is a command-line option (``--dark 12`` ...)."""
    dark: float = 8.0  # mean gray level (0-255) below this: too dark
    bright: float = 247.0  # mean gray level above this: too bright
    low_information: float = 3.0  # std of the gray levels below this: near-constant
    blurry: float = 0.2  # sharpness below this fraction of the collection's median: blurry
    odd_size: float = 4.0  # pixel count this many times above or below the collection's median
    odd_aspect: float = 2.0  # width / height this many times above or below the collection's median
    grayscale: float = 4.0  # 99th percentile of the R, G, B spread at most this (stored as RGB): grayscale
    near_hamming: int = 6  # 64-bit perceptual hashes within this many bits: near-duplicate candidates
    near_fine: int = 24  # ... and 256-bit perceptual hashes within this many bits: near duplicates
    near_cosine: float = 0.97  # with --ckpt: embeddings with cosine similarity at least this: near duplicates
    outlier_mad: float = 6.0  # with --ckpt: kNN distance above median + this x MAD (x 1.4826): outlier
    clusters: int = 10  # with --ckpt: k of the k-means on the embeddings
    knn: int = 5  # with --ckpt: neighbours of the kNN distance


def _entry(record: dict, **values) -> dict:
    return {"path": record["path"], "split": record["split"], **{k: round(v, 3) for k, v in values.items()}}


def image_issues(records: list[dict], t: Thresholds) -> dict[str, list[dict]]:
    """``corrupt``, ``dark``, ``bright``, ``low_information``, ``blurry``, ``odd_size``, ``odd_aspect`` and
    ``grayscale`` entries: each names its file and the measured value."""
    issues: dict[str, list[dict]] = {k: [] for k in ("corrupt", "dark", "bright", "low_information", "blurry",
                                                     "odd_size", "odd_aspect", "grayscale")}
    ok = [r for r in records if r["ok"]]
    issues["corrupt"] = [{"path": r["path"], "split": r["split"], "error": r["error"]} for r in records if not r["ok"]]
    if not ok:
        return issues
    area = np.log([r["width"] * r["height"] for r in ok])
    aspect = np.log([r["width"] / r["height"] for r in ok])
    median_area, median_aspect = float(np.median(area)), float(np.median(aspect))
    sharp = [r["sharpness"] for r in ok if r["std"] >= t.low_information and not math.isnan(r["sharpness"])]
    median_sharp = float(np.median(sharp)) if sharp else float("nan")
    for r, log_area, log_aspect in zip(ok, area, aspect):
        if r["mean"] < t.dark:
            issues["dark"].append(_entry(r, mean=r["mean"]))
        if r["mean"] > t.bright:
            issues["bright"].append(_entry(r, mean=r["mean"]))
        if r["std"] < t.low_information:
            issues["low_information"].append(_entry(r, std=r["std"]))
        elif r["sharpness"] < t.blurry * median_sharp:
            issues["blurry"].append(_entry(r, sharpness=r["sharpness"], relative=r["sharpness"] / median_sharp))
        if abs(log_area - median_area) > math.log(t.odd_size):
            issues["odd_size"].append({**_entry(r), "width": r["width"], "height": r["height"],
                                       "relative_area": round(math.exp(log_area - median_area), 3)})
        if abs(log_aspect - median_aspect) > math.log(t.odd_aspect):
            issues["odd_aspect"].append({**_entry(r), "width": r["width"], "height": r["height"],
                                         "relative_aspect": round(math.exp(log_aspect - median_aspect), 3)})
        if r["channels"] >= 3 and r["spread"] <= t.grayscale and r["std"] >= t.low_information:
            issues["grayscale"].append(_entry(r, spread=r["spread"]))
    return issues


def class_counts(records: list[dict], classes: list[str]) -> dict:
    """Per split {class name: count} and the imbalance (largest / smallest count of the train split);
    empty when unlabelled."""
    labelled = [r for r in records if r["label"] >= 0]
    if not labelled:
        return {}
    out: dict = {}
    for split in ("train", "val"):
        counts = np.bincount([r["label"] for r in labelled if r["split"] == split], minlength=len(classes) or 1)
        if counts.sum():
            names = classes or [str(i) for i in range(len(counts))]
            out[split] = {names[i]: int(c) for i, c in enumerate(counts)}
    train = [c for c in out.get("train", {}).values()]
    if train:
        out["imbalance"] = round(max(train) / max(1, min(train)), 3)
    return out


def size_summary(records: list[dict]) -> dict:
    """Median width and height of the readable images."""
    ok = [r for r in records if r["ok"]]
    if not ok:
        return {}
    return {"median_width": float(np.median([r["width"] for r in ok])),
            "median_height": float(np.median([r["height"] for r in ok]))}
