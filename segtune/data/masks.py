"""Image/mask folders: pairing image and mask files by name and turning mask files into instance masks."""

from __future__ import annotations

import logging
import re
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


#: A pixel whose channels differ by more than this is coloured (JPEG keeps a grey mask's channels within a few levels).
COLOUR_SPREAD = 48


def _grey(mask: np.ndarray, path: Path) -> np.ndarray:
    """One channel from a mask file; a mask in colour is refused.

    A grey mask saved in RGB (a JPEG) carries the same value in every channel, up to compression. A
    mask whose colours differ (red and green instances, a dark blue class) cannot be read as one
    channel: its brightest channel would drop dark colours and merge colours of the same brightness.
    segtune refuses it rather than guess what each colour means.

    Raises:
        ValueError: naming the file when its pixels are coloured.
    """
    if mask.ndim != 3:
        return mask
    channels = mask[:, :, :3].astype(np.int32)
    coloured = int(((channels.max(axis=2) - channels.min(axis=2)) > COLOUR_SPREAD).sum())
    if coloured >= 16:  # a few JPEG fringe pixels are not colours
        raise ValueError(
            f"{path}: a colour mask ({coloured} coloured pixels); segtune reads masks of one channel: "
            "save it as grayscale, 0/255 for one class (mask_format.kind: binary) or value v for class v "
            "(mask_format.kind: index), e.g. one value per colour"
        )
    return mask.max(axis=2)


def _foreground_values(mask: np.ndarray, fmt: MaskFormat) -> np.ndarray:
    """``[H, W]`` bool: the pixels of a binary mask that are foreground."""
    return mask > (0 if mask.max() <= 1 else fmt.threshold)


def has_foreground(path: Path, fmt: MaskFormat) -> bool:
    """Whether a mask file holds any instance pixel (binary: above the threshold; index: any value > 0)."""
    mask = _grey(read_mask(path), path)
    return bool(_foreground_values(mask, fmt).any() if fmt.kind == "binary" else (mask > 0).any())


def read_instances(path: Path, fmt: MaskFormat, size: tuple[int, int]) -> tuple[list[np.ndarray], list[int]]:
    """Instance masks ``[H, W]`` bool and class indices from one mask file.

    Args:
        path: the mask file.
        fmt: how the file encodes instances.
        size: ``(H, W)`` of the image the mask belongs to.

    Raises:
        ValueError: naming the file, when the mask's size differs from the image's.
    """
    mask = _grey(read_mask(path), path)
    if mask.shape[:2] != tuple(size):
        raise ValueError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {size[1]}x{size[0]}")
    if fmt.kind == "binary":
        semantic = [(_foreground_values(mask, fmt), 0)]
    else:
        semantic = [(mask == v, int(v) - 1) for v in np.unique(mask) if v > 0]
    return split_instances(semantic, fmt.instances, fmt.min_area)


def split_instances(
    semantic: list[tuple[np.ndarray, int]], rule: Literal["semantic", "components"], min_area: int
) -> tuple[list[np.ndarray], list[int]]:
    """Per-class regions -> instance masks and class indices by the instance rule (mask files and
    volume slices share it): a class's whole region, or each 8-connected component of at least
    ``min_area`` pixels. Empty regions give none."""
    masks: list[np.ndarray] = []
    classes: list[int] = []
    for region, cls in semantic:
        if not region.any():
            continue
        if rule == "semantic":
            masks.append(region)
            classes.append(cls)
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
        for c in range(1, count):
            if stats[c, cv2.CC_STAT_AREA] >= min_area:
                masks.append(labels == c)
                classes.append(cls)
    return masks, classes


def index_values(mask_paths: list[Path]) -> list[int]:
    """The distinct non-zero values of index masks (to name classes when the config does not)."""
    values: set[int] = set()
    for path in mask_paths:
        values.update(int(v) for v in np.unique(_grey(read_mask(path), path)) if v > 0)
    return sorted(values)


#: Mask-name endings that pair with the image of the stem before them without any option
#: (``ISIC_0000000_segmentation.png``, ``000_HC_Annotation.png``, ``case1_mask.png``), any case.
MASK_SUFFIXES = ("mask", "masks", "seg", "segmentation", "label", "labels", "gt", "annotation")
_SUFFIX = re.compile(r"^(.+?)[_\-. ](?:" + "|".join(MASK_SUFFIXES) + r")$", re.IGNORECASE)
#: Keys tried, when nothing pairs, to suggest a ``pair_key`` that would.
_SUGGESTIONS = (r"^([^_]+)_", r"^(\d+)", r"^([^_\-. ]+)", r"^(.+)_[^_]+$")


def compile_pair_key(pair_key: str | None) -> re.Pattern | None:
    """``data.init_args.pair_key`` compiled, or None for the default pairing.

    Raises:
        ValueError: the expression does not compile.
    """
    if pair_key is None:
        return None
    try:
        return re.compile(pair_key)
    except re.error as e:
        raise ValueError(f"data.init_args.pair_key: {pair_key!r} is not a regular expression ({e})") from None


def pairing_keys(stem: str, pair_key: re.Pattern | None, mask: bool) -> list[str]:
    """The keys a file stem pairs by, best first (lower case).

    With ``pair_key``: its first group (or the whole match when it has none) searched in the stem;
    no key when it does not match. Without: the stem, and for a mask also the stem without a
    common mask ending (``_mask``, ``_segmentation``, ...).
    """
    if pair_key is not None:
        found = pair_key.search(stem)
        if found is None:
            return []
        return [(found.group(1) if pair_key.groups else found.group(0)).lower()]
    keys = [stem.lower()]
    stripped = _SUFFIX.match(stem) if mask else None
    if stripped:
        keys.append(stripped.group(1).lower())
    return keys


def _match(images: list[Path], masks: list[Path], pair_key: re.Pattern | None) -> dict[Path, Path]:
    """Image -> mask, each mask used once; an exact stem wins over a stripped mask ending."""
    by_key: list[dict[str, Path]] = [{}, {}]
    for path in masks:
        for rank, key in enumerate(pairing_keys(path.stem, pair_key, mask=True)):
            other = by_key[rank].get(key)
            if other is not None and rank == 0:
                raise ValueError(
                    f"{path}: two mask files pair with the same image ({other.name}, {path.name}); "
                    "set data.init_args.pair_key so that each mask's key is its own"
                )
            by_key[rank].setdefault(key, path)
    pairs: dict[Path, Path] = {}
    used: set[Path] = set()
    for rank in (0, 1):
        for image in images:
            if image in pairs:
                continue
            keys = pairing_keys(image.stem, pair_key, mask=False)
            mask = by_key[rank].get(keys[0]) if keys else None
            if mask is not None and mask not in used:
                pairs[image] = mask
                used.add(mask)
    return pairs


def _suggest(images: list[Path], masks: list[Path]) -> str:
    """A ``pair_key`` that pairs at least half of the images, as a hint; empty when none does."""
    for candidate in _SUGGESTIONS:
        try:
            paired = len(_match(images, masks, re.compile(candidate)))
        except ValueError:  # two masks would share a key
            continue
        if paired >= max(1, len(images) // 2):
            return f" (e.g. '{candidate}' pairs {paired} of {len(images)})"
    return ""


def pair_images_and_masks(
    images_dir: Path, masks_dir: Path, pair_key: str | None = None
) -> list[tuple[Path, Path | None]]:
    """Match the files of ``images/`` and ``masks/`` (extensions may differ).

    By default a mask pairs with the image of the same stem, or of its stem without a common mask
    ending (:data:`MASK_SUFFIXES`), case-insensitively; ``pair_key`` replaces that with a regular
    expression whose first group, searched in both stems, is the key (``'^(\\d+)_'`` pairs
    ``21_training.tif`` with ``21_manual1.gif``).

    Images without a mask are returned with ``None``; when some do, the log says how many, with an
    example from each side. Masks without an image are logged and ignored.

    Raises:
        FileNotFoundError: naming the folder when one is missing.
        ValueError: naming the files when two masks pair with one image, or when the folders hold
            images and masks but no pair (with an example of each and the option to set).
    """
    key = compile_pair_key(pair_key)
    images, masks = image_files(images_dir), image_files(masks_dir)
    pairs = _match(images, masks, key)
    unpaired_masks = [m for m in masks if m not in set(pairs.values())]
    unpaired_images = [i for i in images if i not in pairs]
    option = "data.init_args.pair_key" + ("" if key else ": a regular expression whose first group is the shared part")
    if images and masks and not pairs:
        raise ValueError(
            f"{images_dir}: no image pairs with a mask in {masks_dir} (e.g. image {images[0].name}, mask "
            f"{masks[0].name}); set {option}{_suggest(images, masks)}"
        )
    if unpaired_images and unpaired_masks:
        log.warning(
            "%s: %d of %d images pair with no mask in %s and %d mask files have no image (e.g. image %s, mask %s); "
            "those images give no prompt and those masks are ignored. If their names should pair, set %s",
            images_dir, len(unpaired_images), len(images), masks_dir, len(unpaired_masks), unpaired_images[0].name,
            unpaired_masks[0].name, option,
        )  # fmt: skip
    elif unpaired_masks:
        log.warning(
            "%s: %d mask files have no image in %s and are ignored (e.g. %s)",
            masks_dir, len(unpaired_masks), images_dir, unpaired_masks[0].name,
        )  # fmt: skip
    return [(image, pairs.get(image)) for image in images]
