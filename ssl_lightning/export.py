"""``ssl-lightning export --ckpt <checkpoint> --out DIR``: the evaluated backbone, for use outside the suite.

Writes ``DIR/model.safetensors`` (the backbone's state dict: the EMA teacher's where the method
evaluates the teacher; never a projector, predictor or probe) and ``DIR/config.json`` (what is
needed to rebuild it and feed it: architecture, input size, normalisation, provenance).

Loading it back:

    import ssl_lightning
    backbone = ssl_lightning.load_backbone("DIR")           # any backbone: convnet, small stems, timm

    import timm, json                                        # stock timm architectures (config "stock_timm": true)
    cfg = json.load(open("DIR/config.json"))
    backbone = timm.create_model(cfg["timm_architecture"], pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": "DIR/model.safetensors"}, **cfg["timm_kwargs"])
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_lightning.models.backbones import build_backbone, timm_spec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "ssl-lightning-backbone"
FORMAT_VERSION = 1


def backbone_config(method: nn.Module, data: dict[str, Any], epoch: int | None, global_step: int | None,
                    source: str) -> dict[str, Any]:
    """config.json of a method's evaluated backbone: how to rebuild it (ours and timm's way) and feed it."""
    from ssl_lightning.data.datasets import dataset_info

    hp = method.hparams
    kwargs = dict(hp.backbone_kwargs or {})
    info = dataset_info(data["dataset"], data.get("data_dir"), image_size=hp.image_size,
                        labelled=bool(data.get("labelled", True))) if data.get("dataset") else None
    spec = timm_spec(hp.backbone, in_chans=hp.in_chans, image_size=hp.image_size, **kwargs)
    teacher = getattr(method, "teacher", None)
    evaluates_teacher = teacher is not None and any(method.evaluated_modules()[0] is m for m in teacher.values())
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "backbone": hp.backbone, "backbone_kwargs": kwargs,
        "timm_architecture": spec and spec.architecture, "timm_kwargs": spec and spec.kwargs,
        "stock_timm": spec is not None and not spec.small_stem, "small_stem": spec is not None and spec.small_stem,
        "in_chans": hp.in_chans, "image_size": hp.image_size, "input_size": [hp.in_chans, hp.image_size, hp.image_size],
        "feature_dim": int(method.feature_dim),
        "mean": list(info.mean) if info else None, "std": list(info.std) if info else None,
        "dataset": data.get("dataset"),
        "method": type(method).__name__, "evaluated": "ema_teacher" if evaluates_teacher else "online",
        "epoch": epoch, "global_step": global_step, "source_checkpoint": source,
    }


def export_backbone(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write the evaluated backbone of ``ckpt`` to ``out_dir`` (model.safetensors + config.json); returns out_dir."""
    from safetensors.torch import save_file

    from ssl_lightning.checkpointing import load_checkpoint
    from ssl_lightning.eval.features import load_method

    method, data = load_method(ckpt)
    raw = load_checkpoint(ckpt)  # verified, weights_only; for its epoch and step
    backbone = method.evaluated_modules()[0]
    state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    config = backbone_config(method, data, raw.get("epoch"), raw.get("global_step"), str(Path(ckpt).resolve()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_backbone(path: str | Path) -> nn.Module:
    """The backbone exported to ``path`` (a directory written by ``ssl-lightning export``), in eval mode.

    Maps (N, in_chans, H, W) images, normalised with config.json's mean/std, to (N, feature_dim) features.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    missing = [str(f) for f in (config_file, weights_file) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing; {path} is not a directory written by "
                                "`ssl-lightning export --ckpt <checkpoint> --out <dir>`")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_file} has format {config.get('format')!r}, not {FORMAT!r}; "
                         "export the checkpoint again with `ssl-lightning export`")
    module, _ = build_backbone(config["backbone"], in_chans=config["in_chans"], image_size=config["image_size"],
                               **config["backbone_kwargs"])
    module.load_state_dict(load_file(str(weights_file)), strict=True)
    return module.eval()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ssl-lightning export", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--out", required=True, help="directory for model.safetensors and config.json")
    args = parser.parse_args(argv)
    out = export_backbone(args.ckpt, args.out)
    config = json.loads((out / CONFIG_FILE).read_text())
    print(f"exported the {config['evaluated']} {config['backbone']} backbone of {config['method']} "
          f"(epoch {config['epoch']}, step {config['global_step']}, {config['feature_dim']}-d features) to {out}")
    print(f"  load: ssl_lightning.load_backbone({str(out)!r})")
    if config["stock_timm"]:
        print(f"  or:   timm.create_model({config['timm_architecture']!r}, pretrained=True, num_classes=0, "
              f"pretrained_cfg_overlay={{'file': {str(out / WEIGHTS_FILE)!r}}}, **{config['timm_kwargs']!r})")
