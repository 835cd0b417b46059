"""Image/mask folders: pairing files by stem and turning mask files into instance masks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from segtune.data.images import image_files, read_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskFormat:
    """How mask files encode instances.

    Args:
        kind: ``"binary"``: one foreground class, stored as 0/1, 0/255 or lossy JPEG.
            ``"index"``: pixel value ``v > 0`` is class ``v`` (class ``categories[v - 1]``), one
            semantic mask per value present.
        threshold: binary masks whose values go above 1 are foreground where the value is above
            this (127 suits 0/255 files and the grey fringes JPEG adds around edges).
        instances: ``"semantic"``: one instance per class present in the image. ``"components"``:
            every connected component of a class is its own instance (one prompt per polyp, say).
        min_area: connected components smaller than this many pixels are dropped (JPEG speckle);
            only used with ``instances="components"``.
    """

    kind: Literal["binary", "index"] = "binary"
    threshold: int = 127
    instances: Literal["semantic", "components"] = "semantic"
    min_area: int = 16


def _grey(mask: np.ndarray) -> np.ndarray:
    # Colour masks (a JPEG saved in RGB) carry the same value in every channel, up to compression.
    return mask.max(axis=2) if mask.ndim == 3 else mask


def read_instances(path: Path, fmt: MaskFormat, size: tuple[int, int]) -> tuple[list[np.ndarray], list[int]]:
    """Instance masks ``[H, W]`` bool and class indices from one mask file.

    Args:
        path: the mask file.
        fmt: how the file encodes instances.
        size: ``(H, W)`` of the image the mask belongs to.

    Raises:
        ValueError: naming the file, when the mask's size differs from the image's.
    """
    mask = _grey(read_mask(path))
    if mask.shape[:2] != tuple(size):
        raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {size[1]}x{size[0]}")
    if fmt.kind == "binary":
        semantic = [(mask > (0 if mask.max() <= 1 else fmt.threshold), 0)]
    else:
        semantic = [(mask == v, int(v) - 1) for v in np.unique(mask) if v > 0]
    masks: list[np.ndarray] = []
    classes: list[int] = []
    for region, cls in semantic:
        if not region.any():
            continue
        if fmt.instances == "semantic":
            masks.append(region)
            classes.append(cls)
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
        for c in range(1, count):
            if stats[c, cv2.CC_STAT_AREA] >= fmt.min_area:
                masks.append(labels == c)
                classes.append(cls)
    return masks, classes


def index_values(mask_paths: list[Path]) -> list[int]:
    """The distinct non-zero values of index masks (to name classes when the config does not)."""
    values: set[int] = set()
    for path in mask_paths:
        values.update(int(v) for v in np.unique(_grey(read_mask(path))) if v > 0)
    return sorted(values)


def pair_images_and_masks(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path | None]]:
    """Match ``images/`` and ``masks/`` files by stem (case-insensitive; extensions may differ).

    Images without a mask are returned with ``None``; masks without an image are logged and ignored.

    Raises:
        FileNotFoundError: naming the folder when one is missing.
        ValueError: naming the files when two masks share a stem.
    """
    masks: dict[str, Path] = {}
    for path in image_files(masks_dir):
        key = path.stem.lower()
        if key in masks:
            raise ValueError(f"{path}: two mask files for the same image ({masks[key].name}, {path.name})")
        masks[key] = path
    pairs = [(image, masks.pop(image.stem.lower(), None)) for image in image_files(images_dir)]
    if masks:
        log.warning(
            "%s: %d mask files have no image in %s and are ignored (e.g. %s)",
            masks_dir, len(masks), images_dir, next(iter(masks.values())).name,
        )  # fmt: skip
    return pairs
