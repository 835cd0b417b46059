"""What the volume library does not check: NIfTI files read as stored.

SimpleITK (2.5.7 here) reads a NIfTI file whose voxel data stops early without an error and fills the
missing voxels with zeros, compressed (``.nii.gz``) or not; and it returns the NaN voxels of a float
NIfTI as 0. Its NRRD and MetaImage readers refuse a short file and keep NaN, so only NIfTI is read a
second time here, as stored: the header's size against the data's, the gzip stream to its end (Python's
``gzip`` checks the stream's length and CRC), and the non-finite voxels of float data, which
:func:`segtune.data.volumes.read_volume` puts back where the library wrote 0.

A file is checked once per process (by path, size and modification time), so a volume read again by a
later epoch costs nothing more.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

#: NIfTI datatype codes of real floating-point voxels -> numpy type (complex and RGB types are refused
#: by the reader before this matters: segtune reads single-channel volumes).
_FLOAT_TYPES = {16: "f4", 64: "f8", 1536: "f16"}


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _raw_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed to the end of its gzip stream.

    Raises:
        ValueError: naming the file when the compressed stream ends early or is damaged.
    """
    data = path.read_bytes()
    if not path.name.lower().endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except EOFError:
        raise ValueError(
            f"{path}: the compressed stream ends before its end: the file is truncated (copy or download it again)"
        ) from None
    except (OSError, zlib.error) as e:  # a bad CRC or length, or bytes that are no gzip
        raise ValueError(f"{path}: the compressed stream is damaged ({e}); copy or download it again") from None


def _header(raw: bytes, path: Path) -> tuple[str, list[int], int, int, int]:
    """``(byte order, dims, datatype, bits per voxel, data offset)`` of a NIfTI-1 or NIfTI-2 header."""
    for order in "<>":
        if len(raw) >= 4 and struct.unpack(order + "i", raw[:4])[0] == 348 and len(raw) >= 348:  # NIfTI-1
            dim = list(struct.unpack(order + "8h", raw[40:56]))
            datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
            offset = int(struct.unpack(order + "f", raw[108:112])[0])
            return order, dim, datatype, bitpix, offset
        if len(raw) >= 4 and struct.unpack(order + "i", raw[:4])[0] == 540 and len(raw) >= 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
            dim = list(struct.unpack(order + "8q", raw[16:80]))
            offset = struct.unpack(order + "q", raw[168:176])[0]
            return order, dim, datatype, bitpix, offset
    raise ValueError(f"{path}: no NIfTI header (the file is shorter than one, or damaged)")


def nonfinite_voxels(path: Path) -> np.ndarray:
    """Check a NIfTI file as stored, and find its non-finite voxels.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The flat indices (C order of the ``(z, y, x)`` array SimpleITK gives) of the NaN and infinite
        voxels of float data; empty for integer data or when there are none.

    Raises:
        ValueError: one line naming the file: a truncated or damaged gzip stream, or voxel data shorter
            than the header's dimensions need.
    """
    stat = path.stat()
    return _nonfinite(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4096)
def _nonfinite(name: str, size: int, mtime_ns: int) -> np.ndarray:
    # size and mtime are the cache key: a file written again is checked again
    path = Path(name)
    raw = _raw_bytes(path)
    order, dim, datatype, bitpix, offset = _header(raw, path)
    rank = dim[0] if 1 <= dim[0] <= 7 else 3
    count = int(np.prod([max(d, 1) for d in dim[1 : rank + 1]], dtype=np.int64))
    need = offset + count * max(bitpix, 8) // 8
    if len(raw) < need:
        raise ValueError(
            f"{path}: the file is truncated: its voxel data holds {max(len(raw) - offset, 0)} of the "
            f"{need - offset} bytes its header's {'x'.join(str(d) for d in dim[1 : rank + 1])} voxels need "
            "(copy or download it again)"
        )
    kind = _FLOAT_TYPES.get(datatype)
    if kind is None:
        return np.zeros(0, np.int64)
    data = np.frombuffer(raw, np.dtype(order + kind), count, offset)
    found = np.flatnonzero(~np.isfinite(data))
    found.flags.writeable = False  # shared by every caller of the cache
    return found


def forget_checks() -> None:
    """Forget which files were checked (a benchmark measures the check again; a test rewrites a file in place
    within the clock's resolution)."""
    _nonfinite.cache_clear()
