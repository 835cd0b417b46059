"""How much memory the volume cache takes when ``data.init_args.cache_images`` is left to segtune.

A volume case is read, checked and normalised once, and then serves all its slices; re-reading it for
each slice costs a decompression and a normalisation per slice. The cache is sized from the volumes'
headers (voxels, without reading them) and the memory available: all of the split's cases when they fit
in a quarter of the available memory, else that quarter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from segtune.data.volumes import VolumeCase, volume_header

log = logging.getLogger(__name__)

#: Bytes a kept voxel costs: the normalised image (float32) and its label (uint8).
BYTES_PER_VOXEL = 5
#: The share of the available memory an automatic cache may take (per split's dataset and process).
SHARE = 0.25


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; else free pages); None: unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def automatic_cache_mib(cases: Sequence[VolumeCase], where: str, available: int | None = None) -> int:
    """The volume cache's MiB for ``cases``: all of them, or a quarter of the available memory; said at INFO.

    Args:
        cases: the split's cases.
        where: the split, for the log line.
        available: bytes available (tests); None: :func:`available_memory`.
    """
    headers = [volume_header(c.image) for c in cases]  # None: unreadable (reading the case names the problem)
    sizes = [int(np.prod(h[0], dtype=np.int64)) * BYTES_PER_VOXEL for h in headers if h is not None]
    need = sum(sizes)
    available = available_memory() if available is None else available
    allowed = int(available * SHARE) if available is not None else need
    mib = max(1, -(-min(need, allowed) // 2**20))
    free = f"{_size(available)} available" if available is not None else "memory available unknown"
    if mib * 2**20 >= need:
        log.info("%s: volume cache %d MiB: its %d cases' normalised volumes, each read once (%s; "
                 "data.init_args.cache_images sets another)", where, mib, len(cases), free)  # fmt: skip
    else:
        kept = int(np.searchsorted(np.cumsum(sorted(sizes)), mib * 2**20, side="right"))
        log.info("%s: volume cache %d MiB (a quarter of the %s) keeps about %d of its %d cases; the others are "
                 "read again for each slice (data.init_args.cache_images sets another)", where, mib, free, kept,
                 len(cases))  # fmt: skip
    return mib


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
