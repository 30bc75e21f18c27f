"""Host allocator settings: keep freed memory in the heap so CPU tensor temporaries reuse it.

glibc's malloc returns large freed blocks to the kernel: blocks over its mmap threshold are unmapped,
and free space at the top of the heap over its trim threshold is trimmed. The next tensor of that
size is then fresh memory, and every 4 KiB page of it faults in on first touch. The batched view
pipeline (data.augment: device) allocates and frees tens of MB of temporaries per batch, so on a CPU
run it spends much of its time in page faults. On the 2-core sandbox this made it bimodal: 23k or 39k
views/s (CIFAR recipe, batch 256), depending on the heap's state when training starts.

``keep_freed_memory`` raises both thresholds, so freed blocks stay in the heap for reuse. Reusing
freed memory is also what jemalloc and TCMalloc do, the allocators PyTorch's CPU performance guide
recommends. The cost is that the process keeps its peak heap size. The CLI calls it at start-up. It
does nothing off glibc, or if the user chose an allocator or its settings (the environment variables
in ``USER_SETTINGS``).
"""
from __future__ import annotations

import ctypes
import os
import sys

# glibc <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit; larger blocks are still mapped and unmapped
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES",
                 "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and forked workers); True if applied."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
