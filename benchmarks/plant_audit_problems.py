"""Plant known problems in a real Fashion-MNIST image folder, then score `ssl-lightning audit` against them.

    python benchmarks/plant_audit_problems.py write --out DIR [--train 2000 --val 500 --per-kind 5]
    ssl-lightning audit --data.dataset imagefolder --data.data_dir DIR --out AUDIT
    python benchmarks/plant_audit_problems.py score --out DIR --audit AUDIT/audit.json

`write` writes a seeded subset of Fashion-MNIST as PNGs (`ssl_lightning.data.write_folder`), then plants
`--per-kind` files of each kind below, each made from a different clean train image (seed 0), and lists
them in DIR/planted.json:

- corrupt: PNGs cut to half their bytes, and text files named `.png` (alternately)
- exact_duplicate: a train image re-saved with other PNG bytes (compress level 1, a text chunk), same class
- near_duplicate: a train image brightened 10% and saved as JPEG quality 80, same class
- split_leak: a train image copied byte for byte into val/ (same class)
- dark / bright / low_information: black, white, and constant gray (64..192) 28 x 28 images
- blurry, odd_size (112 x 112), odd_aspect (28 x 84), grayscale (saved as RGB): the clean image is replaced
  by the modified one (no source left behind, so no duplicate pair is created)

`score` prints, per kind: planted, found, missed, flags on other planted files, and flags on the clean
files (the clean part has no planted problem, so these are false positives or genuine look-alikes).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, PngImagePlugin

KINDS = ("corrupt", "exact_duplicate", "near_duplicate", "split_leak", "dark", "bright", "low_information",
         "blurry", "odd_size", "odd_aspect", "grayscale")


def plant(root: Path, per_kind: int, seed: int = 0) -> dict[str, list[str]]:
    sources = sorted((root / "train").glob("*/*.png"))
    random.Random(seed).shuffle(sources)
    sources = iter(sources)
    planted: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for i in range(per_kind):
        src = next(sources)
        bad = src.with_name(f"zz_corrupt_{i}.png")
        if i % 2 == 0:
            bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        else:
            bad.write_text("this is text, not a PNG")
        planted["corrupt"].append(bad)
        src = next(sources)
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "same pixels, other bytes")
        copy = src.with_name(f"zz_exact_{src.stem}.png")
        Image.open(src).save(copy, compress_level=1, pnginfo=info)
        planted["exact_duplicate"].append(copy)
        src = next(sources)
        near = src.with_name(f"zz_near_{src.stem}.jpg")
        ImageEnhance.Brightness(Image.open(src).convert("L")).enhance(1.1).save(near, quality=80)
        planted["near_duplicate"].append(near)
        src = next(sources)
        leak = root / "val" / src.parent.name / f"zz_leak_{src.stem}.png"
        shutil.copy(src, leak)
        planted["split_leak"].append(leak)
        folder = src.parent
        for kind, value in (("dark", 0), ("bright", 255), ("low_information", 64 + 32 * i)):
            path = folder / f"zz_{kind}_{i}.png"
            Image.new("L", (28, 28), value).save(path)
            planted[kind].append(path)
        for kind, change in (("blurry", lambda im: im.filter(ImageFilter.GaussianBlur(1.5))),
                             ("odd_size", lambda im: im.resize((112, 112))),
                             ("odd_aspect", lambda im: im.resize((28, 84))),
                             ("grayscale", lambda im: im.convert("RGB"))):
            src = next(sources)
            path = src.with_name(f"zz_{kind}_{src.stem}.png")
            change(Image.open(src)).save(path)
            src.unlink()
            planted[kind].append(path)
    return {kind: [str(p.resolve()) for p in paths] for kind, paths in planted.items()}


def score(root: Path, audit_json: Path) -> list[dict]:
    planted = json.loads((root / "planted.json").read_text())
    every_planted = {p for paths in planted.values() for p in paths}
    issues = json.loads(audit_json.read_text())["issues"]
    rows = []
    for kind in sorted(set(KINDS) | set(issues)):
        flagged = {str(Path(e["path"]).resolve()) for e in issues.get(kind, [])}
        mine = set(planted.get(kind, []))
        rows.append({"kind": kind, "planted": len(mine), "found": len(flagged & mine), "missed": len(mine - flagged),
                     "on_other_planted": len((flagged - mine) & every_planted),
                     "on_clean": len(flagged - every_planted),
                     "clean_examples": sorted(flagged - every_planted)[:3]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("write", "score"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--per-kind", dest="per_kind", type=int, default=5)
    parser.add_argument("--audit", type=Path, help="audit.json to score")
    args = parser.parse_args()
    if args.action == "write":
        from ssl_lightning.data.write_folder import write_image_folder
        write_image_folder("fashion_mnist", args.out, data_dir=args.data_dir, per_split=args.train, splits=("train",))
        write_image_folder("fashion_mnist", args.out, data_dir=args.data_dir, per_split=args.val, splits=("val",))
        planted = plant(args.out, args.per_kind)
        (args.out / "planted.json").write_text(json.dumps(planted, indent=1))
        print(f"wrote {args.train} train + {args.val} val images to {args.out}, planted "
              f"{sum(map(len, planted.values()))} files ({args.per_kind} per kind)")
    else:
        rows = score(args.out, args.audit)
        print("| kind | planted | found | missed | flags on other planted files | flags on clean files |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['planted']} | {r['found']} | {r['missed']} | {r['on_other_planted']} "
                  f"| {r['on_clean']} |")
        (args.audit.parent / "score.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
