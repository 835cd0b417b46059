"""CPU runs reuse freed step memory: large blocks are not unmapped and page-faulted in again."""

from __future__ import annotations

import resource

import pytest
import torch
from lightning.pytorch import Trainer

from segtune.allocator import ReuseFreedMemory, glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="the C library is not glibc: the callback does nothing")

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): by default every such block is a fresh mapping


def faults_of_reuse() -> int:
    """Minor page faults of allocating, filling and freeing a 64 MiB tensor four times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        block = torch.ones(BLOCK // 4)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_cpu_run_reuses_freed_blocks_and_gives_them_back_when_it_ends() -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    pages = BLOCK // resource.getpagesize()
    default = faults_of_reuse()
    if default < pages:
        pytest.skip(f"{default} page faults for 4 fresh 64 MiB blocks: this kernel maps them in huge pages already")
    callback = ReuseFreedMemory()
    callback.setup(trainer, None, "fit")
    try:
        faults_of_reuse()  # the first block grows the heap once
        reused = faults_of_reuse()
    finally:
        callback.teardown(trainer, None, "fit")
    assert reused < pages // 4 < default  # the same pages serve every block
    assert faults_of_reuse() >= pages  # glibc's defaults are back after the run: fresh mappings again
