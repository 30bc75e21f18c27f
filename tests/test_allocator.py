"""keep_freed_memory: freed tensor memory is reused instead of faulting in fresh pages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ssl_lightning import allocator

# Rounds of: allocate and touch five 4 MiB tensors, free them all. When the freed blocks go back to the
# kernel, every round faults in 5120 fresh pages; with freed memory kept, only the first rounds do.
# glibc's own defaults land in between, run to run (153 or 4115 faults per round measured here), so the
# control pins its static 128 KiB mmap threshold: every block is mapped and unmapped.
PROGRAM = """
import resource, sys, torch
from ssl_lightning.allocator import keep_freed_memory
torch.set_num_threads(1)  # OpenMP worker threads fault in pages of their own
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def round_():
    tensors = [torch.empty(1 << 20).fill_(1.0) for _ in range(5)]
    del tensors
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""
PAGES_PER_ROUND = 5 * (4 << 20) // 4096


def faults_per_round(mode: str, **env: str) -> tuple[bool, float]:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_memory_is_reused_without_page_faults():
    applied, kept = faults_per_round("keep")
    _, returned = faults_per_round("default", MALLOC_MMAP_THRESHOLD_=str(128 << 10))
    assert applied
    assert kept < 0.05 * PAGES_PER_ROUND, kept
    assert returned > 0.9 * PAGES_PER_ROUND, returned  # the control: returned memory faults again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_user_allocator_settings_win():
    applied, _ = faults_per_round("keep", MALLOC_TRIM_THRESHOLD_="1000000")
    assert not applied
