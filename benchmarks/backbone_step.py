"""Backbone + projector training-step throughput (views/s) in fp32, channels_last and bf16 autocast.

    python benchmarks/backbone_step.py [--backbone convnet --width 32 --size 28 --chans 1 --batch 512]

Prints one line per setting; it is how the demo config's precision/memory-format choice was made.
"""
from __future__ import annotations

import argparse

import torch

from ssl_lightning.models import build_backbone, mlp
from timing import clock


def views_per_second(args, channels_last: bool, bf16: bool, device: str) -> float:
    kwargs = {"width": args.width} if args.backbone == "convnet" else {}
    backbone, dim = build_backbone(args.backbone, in_chans=args.chans, image_size=args.size, **kwargs)
    model = torch.nn.Sequential(backbone, mlp(args.projector, dim)).to(device)
    x = torch.randn(args.batch, args.chans, args.size, args.size, device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = clock()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return args.batch * args.steps / (clock() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--projector", default="512-512-512")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--chans", type=int, default=1)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"{args.backbone} {args.size}px x{args.chans}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    for channels_last, bf16 in ((False, False), (True, False), (True, True)):
        rate = views_per_second(args, channels_last, bf16, args.device)
        print(f"  channels_last={channels_last!s:5} bf16={bf16!s:5} {rate:8.0f} views/s")


if __name__ == "__main__":
    main()
