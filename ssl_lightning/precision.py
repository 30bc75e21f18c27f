"""``trainer.precision: auto``: the precision the hardware computes fast, chosen before the Trainer is built.

bf16 autocast halves the memory traffic and, where the hardware has bf16 units, doubles the matmul
rate; where it has none it is emulated and several times slower than fp32. Measured on 2-core
machines (2026-12-04): a small ConvNet training step took 207 ms in fp32 and 1,571 ms under bf16
autocast (7.6x) on an AMD EPYC with AVX2 only, while an Intel Xeon with AMX runs the demo 1.8x
faster in bf16 than in fp32. So ``auto`` is:

- a CUDA device with bf16 (compute capability 8.0 and newer: A100, H100, ...): ``bf16-mixed``;
- an older CUDA device (V100, T4): ``16-mixed`` (fp16 tensor cores with loss scaling; every loss
  keeps an fp32 island, tests/test_precision_and_pipelines.py);
- a CPU with native bf16 (AVX512-BF16 or AMX): ``bf16-mixed``;
- any other CPU or accelerator: ``32-true``.

An explicit precision always wins; ``bf16-mixed`` on a CPU without native bf16 gets one warning.
"""
from __future__ import annotations

from typing import Literal, Union

import torch

AUTO = "auto"
EMULATED_BF16_SLOWDOWN = ("a training step measured 7.6x slower under bf16 autocast than in fp32 "
                          "(small ConvNet, 2-core AMD EPYC with AVX2 only, 2026-12-04)")


def cpu_bf16_support() -> tuple[bool, str]:
    """(native, what the CPU has): native bf16 means AVX512-BF16 or AMX tiles, and kernels allowed to
    use them (``ATEN_CPU_CAPABILITY=avx2``, which also emulates an AVX2-only CPU on a newer one, forbids)."""
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
    amx = torch.cpu._is_amx_tile_supported()
    found = [name for name, present in (("AVX512-BF16", avx512_bf16), ("AMX", amx)) if present]
    if not found:
        return False, "neither AVX512-BF16 nor AMX"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX512", "AMX")):
        return False, f"{' and '.join(found)}, but kernels limited to {capability} (ATEN_CPU_CAPABILITY)"
    return True, " and ".join(found)


def _name(accelerator: object) -> str:
    """Lightning's accelerator setting as a name: "cpu", "gpu", "auto", ... or the class name, lower case."""
    return accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()


def uses_cuda(accelerator: object) -> bool:
    """Lightning's accelerator setting names CUDA ("gpu", "cuda" or "auto") and a GPU is there (without
    one, Lightning itself says that the GPU is missing)."""
    return _name(accelerator) in ("gpu", "cuda", "cudaaccelerator", "auto") and torch.cuda.is_available()


def uses_cpu(accelerator: object) -> bool:
    name = _name(accelerator)
    return name in ("cpu", "cpuaccelerator") or (name == "auto" and not torch.cuda.is_available()
                                                   and not torch.backends.mps.is_available())


def resolve_precision(requested: object, accelerator: object) -> tuple[object, str | None]:
    """(precision for the Trainer, the line to print). The line says what ``auto`` chose and why, or
    warns about an explicit bf16 on a CPU that emulates it; None when there is nothing to say."""
    if requested != AUTO:
        if str(requested) in ("bf16-mixed", "bf16-true", "bf16") and uses_cpu(accelerator):
            native, found = cpu_bf16_support()
            if not native:
                return requested, (f"warning: precision {requested} on a CPU with {found}: bf16 is emulated there "
                                   f"and slow ({EMULATED_BF16_SLOWDOWN}); use --trainer.precision auto "
                                   "(32-true on this CPU)")
        return requested, None
    if uses_cuda(accelerator):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name()
            return "bf16-mixed", f"precision auto: bf16-mixed ({name} computes bf16 natively)"
        return "16-mixed", (f"precision auto: 16-mixed ({torch.cuda.get_device_name()} has no native bf16; "
                            "fp16 with loss scaling)")
    if uses_cpu(accelerator):
        native, found = cpu_bf16_support()
        if native:
            return "bf16-mixed", f"precision auto: bf16-mixed (this CPU has {found})"
        return "32-true", (f"precision auto: 32-true (this CPU has {found}, so bf16 would be emulated: "
                           f"{EMULATED_BF16_SLOWDOWN})")
    return "32-true", f"precision auto: 32-true (accelerator {accelerator!r})"


def accept_auto(typehint: object) -> object:
    """Lightning's precision type with "auto" added, for the CLI's parser."""
    return Union[Literal["auto"], typehint]
