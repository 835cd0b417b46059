"""Decoded images kept in memory up to a budget, and instance masks from mask files kept run-length
encoded, so later epochs skip decoding them.

A dataset holds one :class:`ImageCache` (when ``cache_images`` is set) and one :class:`MaskCache`.
DataLoader worker processes each hold their own copy of the dataset, so each worker fills its own
caches and they outlive an epoch only when the workers do (``persistent_workers: true``); with
``num_workers: 0`` the main process holds them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from pycocotools import mask as mask_utils
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)


class ImageCache:
    """Images by dataset index, first come first kept, until ``budget_mib`` is used.

    Nothing is evicted: with shuffled epochs every image is as likely to come back as any other,
    so replacing one cached image by another saves nothing. An image that does not fit is decoded
    every time; a smaller one later may still fit.

    Cached arrays are read-only, so code that writes into an image in place fails loudly instead of
    changing what later epochs see; :meth:`get` hands out a writable copy when asked (augmentations
    may transform in place).

    Args:
        budget_mib: memory budget in MiB (per process; see the module docstring).
        total: images in the dataset, for the log line.
        name: what the log line calls the dataset.
    """

    def __init__(self, budget_mib: int, total: int, name: str = "dataset") -> None:
        if budget_mib < 0:
            raise ValueError(f"data.init_args.cache_images must be a budget in MiB >= 0, got {budget_mib}")
        self.budget = int(budget_mib) * 2**20
        self.total = total
        self.name = name
        self.images: dict[int, np.ndarray] = {}
        self.used = 0
        self._reported = False

    def get(self, index: int, decode: Callable[[], np.ndarray], copy: bool = False) -> np.ndarray:
        """The image at ``index``: from the cache, or ``decode()`` and kept when it fits the budget.

        Args:
            index: the dataset index.
            decode: reads the image (called only on a miss).
            copy: return a writable copy of a cached image.
        """
        image = self.images.get(index)
        if image is None:
            image = decode()
            if self.used + image.nbytes <= self.budget:
                if image.base is not None:  # a view (e.g. RGB of RGBA) would keep its larger base alive
                    image = image.copy()
                image.flags.writeable = False
                self.images[index] = image
                self.used += image.nbytes
                if len(self.images) == self.total:
                    self._report(f"all {self.total} images fit")
            else:
                self._report(f"{len(self.images)} of {self.total} images fit")
        return image.copy() if copy and not image.flags.writeable else image

    def _report(self, what: str) -> None:
        worker = get_worker_info()
        if self._reported or (worker is not None and worker.id != 0):  # once, not once per worker
            return
        self._reported = True
        log.info(
            "%s: image cache: %s in data.init_args.cache_images=%d MiB (%.0f MiB used%s)",
            self.name, what, self.budget // 2**20, self.used / 2**20,
            "; per worker, kept across epochs only with persistent_workers" if worker is not None else "",
        )  # fmt: skip


class MaskCache:
    """Instance masks by dataset index, kept as COCO run-length encodings (a few KiB per instance).

    Reading a mask file, thresholding it and splitting it into connected components costs more than
    the rest of a sample once the image itself is not decoded (an embedding-cache hit): about 15 ms
    of a 25 ms Kvasir sample on this project's CPU. Decoding the run lengths back takes about 1 ms.
    The masks depend only on the file and the mask format, both fixed for a dataset; an entry is
    used only for the image size it was decoded at.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[list[dict], list[int], tuple[int, int]]] = {}

    def get(
        self, index: int, size: tuple[int, int], decode: Callable[[], tuple[list[np.ndarray], list[int]]]
    ) -> tuple[list[np.ndarray], list[int]]:
        """The ``[H, W]`` bool masks and class indices at ``index``: decoded from the kept run lengths,
        or by ``decode()`` (then kept).

        Args:
            index: the dataset index.
            size: ``(H, W)`` of the image.
            decode: reads the masks (called only on a miss).
        """
        entry = self.entries.get(index)
        if entry is not None and entry[2] == tuple(size):
            rles, classes, _ = entry
            if not rles:
                return [], []
            planes = mask_utils.decode(rles)  # [H, W, N] uint8, Fortran order
            return [planes[:, :, i].astype(bool) for i in range(planes.shape[2])], list(classes)
        masks, classes = decode()
        rles = mask_utils.encode(np.asfortranarray(np.stack(masks, axis=2).astype(np.uint8))) if masks else []
        self.entries[index] = (rles, list(classes), (int(size[0]), int(size[1])))
        return masks, classes
