"""Host memory on CPU runs: keep freed memory for reuse instead of handing it back to the system.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on ``free``. A CPU training or scoring step allocates and
frees activations of hundreds of MiB (a ViT-B global attention at 1024 px: 12 x 4096 x 4096 floats),
so each step maps them anew and the kernel zero-fills every page on its first touch: on the 2-core
machine this project measures on, a LiteMedSAM encoder pass spent about a third of its CPU time in
those page faults (``benchmarks/allocator_speed.py`` gives the numbers). PyTorch's CPU performance
guide recommends a caching allocator (jemalloc, tcmalloc) for this; glibc's own ``mallopt`` gets
the same effect without a preloaded library, which is what :class:`ReuseFreedMemory` does.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: glibc's defaults, set back when the run ends
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024
#: free memory kept at the top of the heap before it is returned (mallopt takes an int)
KEEP_TRIM_THRESHOLD = 2**31 - 1


def glibc() -> Any | None:
    """The C library when it is glibc (the one whose ``mallopt`` this module sets), else ``None``."""
    try:
        libc = ctypes.CDLL(None)  # the process's own C library (Windows has no such handle: TypeError)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() and hasattr(libc, "mallopt") else None


def keep_freed_memory(libc: Any) -> bool:
    """Set glibc's ``mallopt`` so that freed blocks stay in the heap for reuse; ``True`` when glibc took both."""
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))


def return_freed_memory(libc: Any) -> None:
    """glibc's defaults back, and the freed memory returned to the system."""
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)


class ReuseFreedMemory(Callback):
    """On CPU runs, let glibc keep freed blocks for the next step instead of unmapping them.

    While a fit, validate, test or predict runs on the CPU, ``malloc`` serves large blocks from its
    heap (``M_MMAP_MAX`` 0) and keeps up to 2 GiB of freed memory (``M_TRIM_THRESHOLD``), so a
    step's activations reuse the pages the previous step freed. The process's resident memory stays
    near its peak until the run ends instead of falling between steps; when the run ends glibc's
    defaults come back and the freed memory is returned (``malloc_trim``). Does nothing on GPU runs
    and where the C library is not glibc (macOS, musl). Remove it from ``trainer.callbacks`` to
    keep glibc's defaults.
    """

    def __init__(self) -> None:
        super().__init__()
        self._libc: Any | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: D102
        if self._libc is not None or trainer.strategy.root_device.type != "cpu":
            return
        libc = glibc()
        if libc is None:
            log.debug("not glibc: malloc keeps its defaults")
            return
        if keep_freed_memory(libc):
            self._libc = libc
            log.info(
                "CPU run: freed memory is kept for the next step (glibc mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 "
                "GiB) instead of being unmapped and faulted in again; segtune.allocator.ReuseFreedMemory in "
                "trainer.callbacks does this"
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: D102
        if self._libc is None:
            return
        return_freed_memory(self._libc)
        self._libc = None
