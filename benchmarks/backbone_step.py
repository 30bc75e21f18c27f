"""Backbone + projector training step on this machine: fp32 and bf16 autocast side by side, with the CPU's flags.

    python benchmarks/backbone_step.py [--backbone convnet --width 32 --size 28 --chans 1 --batch 512]

Prints the CPU (model, AVX-512/AMX flags, which ATen kernels run, any ISA-limiting environment variables,
e.g. ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 to emulate an AVX2-only CPU), then ms per step
and views/s in fp32 and bf16 for both memory formats. On a CPU without native bf16 (no AVX512-BF16/AMX)
bf16 is emulated and several times slower; this is how the precision and memory-format choices were made.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
from pathlib import Path

import torch

from ssl_lightning.models import build_backbone, mlp
from timing import clock

ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_summary() -> str:
    """One line: model name (as lscpu), torch's bf16/AMX checks, ATen's kernels, avx512/amx flags, ISA limits."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = sorted(set(re.findall(r"\b(avx512\w*|amx\w*)\b", info)))
    limits = [f"{name}={os.environ[name]}" for name in ISA_VARIABLES if name in os.environ]
    return (f"CPU {model.group(1) if model else platform.processor()}, {os.cpu_count()} cores; "
            f"torch.cpu avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, amx_tile "
            f"{torch.cpu._is_amx_tile_supported()}; ATen kernels {torch.backends.cpu.get_cpu_capability()}; "
            f"flags: {' '.join(flags) or 'no avx512/amx'}; "
            + (f"EMULATED with {' '.join(limits)}" if limits else "native (no ISA limit set)"))


def seconds_per_step(args, channels_last: bool, bf16: bool, device: str) -> float:
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
    return (clock() - start) / args.steps


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
    print(torch.cuda.get_device_name() if args.device == "cuda" else cpu_summary())
    print(f"{args.backbone} {args.size}px x{args.chans}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps after {args.warmup}, torch {torch.__version__}")
    for channels_last in (False, True):
        fp32, bf16 = (seconds_per_step(args, channels_last, bf16, args.device) for bf16 in (False, True))
        print(f"  {'channels_last' if channels_last else 'contiguous':13}  fp32 {fp32 * 1e3:8.1f} ms/step "
              f"{args.batch / fp32:7.0f} views/s   bf16 autocast {bf16 * 1e3:8.1f} ms/step {args.batch / bf16:7.0f} "
              f"views/s   bf16/fp32 time {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
