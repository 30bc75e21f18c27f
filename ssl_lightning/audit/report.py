"""What the audit writes: ``audit.json``, ``report.md`` with one thumbnail grid per kind of issue
(``thumbnails/<kind>.png``, and ``thumbnails/cluster_<id>.png`` with ``--ckpt``), the exclude file,
and the one-screen summary table it prints."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

THUMB = 64  # px per thumbnail
GRID_COLUMNS = 8
GRID_MAX = 32  # thumbnails per grid

Loader = Callable[[str], "Image.Image | None"]  # path -> RGB image (None when unreadable)


def thumbnail_grid(paths: list[str], load: Loader, out: Path) -> Path:
    """Writes up to GRID_MAX images as a grid of THUMB px tiles (grey with a cross: unreadable) to ``out``."""
    paths = paths[:GRID_MAX]
    rows = max(1, -(-len(paths) // GRID_COLUMNS))
    grid = Image.new("RGB", (GRID_COLUMNS * THUMB, rows * THUMB), (255, 255, 255))
    for n, path in enumerate(paths):
        image = load(path)
        tile = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
        if image is None:
            ImageDraw.Draw(tile).line([(0, 0), (THUMB, THUMB)], fill=(200, 0, 0), width=3)
        else:
            image.thumbnail((THUMB, THUMB))
            tile.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
        grid.paste(tile, ((n % GRID_COLUMNS) * THUMB, (n // GRID_COLUMNS) * THUMB))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def write_json(audit: dict, out_dir: Path) -> Path:
    path = out_dir / "audit.json"
    path.write_text(json.dumps(audit, indent=1))
    return path


def write_markdown(audit: dict, out_dir: Path, load: Loader, clusters: dict[int, list[str]] | None = None) -> Path:
    """report.md: the summary, then per kind its count, a thumbnail grid and the first entries."""
    summary, issues = audit["summary"], audit["issues"]
    lines = ["# Data audit", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in summary.items()
              if k != "counts"]
    lines += ["", "| kind | images |", "|---|---|"] + [f"| {k} | {len(v)} |" for k, v in issues.items()]
    for kind, entries in issues.items():
        if not entries:
            continue
        grid = thumbnail_grid([e["path"] for e in entries], load, out_dir / "thumbnails" / f"{kind}.png")
        lines += ["", f"## {kind} ({len(entries)})", "", f"![{kind}]({grid.relative_to(out_dir)})", ""]
        for e in entries[:GRID_MAX]:
            extra = ", ".join(f"{k}: {v}" for k, v in e.items() if k != "path")
            lines.append(f"- `{e['path']}` ({extra})")
    for cluster, paths in (clusters or {}).items():
        grid = thumbnail_grid(paths, load, out_dir / "thumbnails" / f"cluster_{cluster}.png")
        lines += ["", f"## cluster {cluster}", "", f"![cluster {cluster}]({grid.relative_to(out_dir)})"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_exclude(audit: dict, kinds: list[str], out: Path) -> int:
    """Writes the paths flagged by ``kinds`` (each once, sorted) to ``out`` for ``data.exclude``; returns
    how many. Duplicate entries name the second copy, so the first one stays in the data."""
    paths = sorted({e["path"] for kind in kinds for e in audit["issues"].get(kind, [])})
    header = f"# written by ssl-lightning audit: kinds {', '.join(kinds)}\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "".join(f"{p}\n" for p in paths))
    return len(paths)


def summary_table(audit: dict) -> str:
    """One screen: images per split, then each kind with its count and first path."""
    s = audit["summary"]
    rows = [f"audit of {s['dataset']} {s.get('data_dir') or ''}".rstrip(),
            f"  images: {s['images']} ({', '.join(f'{k} {v}' for k, v in s['splits'].items())}), "
            f"{s['images_per_s']:.0f} images/s"]
    if s.get("classes"):
        rows.append(f"  class imbalance (largest / smallest train class): {s['classes'].get('imbalance')}")
    if s.get("clusters"):
        c = s["clusters"]
        rows.append(f"  k-means on the embeddings (k={c['k']}): largest cluster {c['largest_share']:.1%} "
                    f"({c['largest_vs_even']}x an even split)")
    rows.append(f"  {'kind':<18}{'images':>8}  first")
    for kind, entries in audit["issues"].items():
        first = entries[0]["path"] if entries else ""
        rows.append(f"  {kind:<18}{len(entries):>8}  {first[-60:]}")
    return "\n".join(rows)
