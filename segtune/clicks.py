"""Simulated corrective clicks: where a user would click next, given a prediction and its ground truth.

Two rules, as interactive-segmentation evaluations place them:

* ``"center"`` (the default; RITM, SAM-Med2D's evaluation, the CVPR 2025 interactive 3D challenge
  that nnInteractive won): the largest connected error region (false negatives and false positives
  labelled separately), and in it the pixel farthest from the region's border. The distance transform
  runs on the region padded with a zero border, so the image's edge counts as a border, as RITM's
  ``Clicker`` pads before ``cv2.distanceTransform``. A false-negative region gives a positive click,
  a false-positive region a negative one.
* ``"random"`` (micro-sam's and SAM-Med2D's training): a uniformly drawn error pixel, positive on a
  false negative, negative on a false positive.

Ties (two regions of the same size, several pixels at the same largest distance) are broken by the
caller's generator, so a seed gives the same clicks every run. 2D regions are 8-connected, 3D ones
26-connected (the labelling :mod:`segtune.data.slices` uses for volumes). numpy and scipy only: no
torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

#: How the next click is placed (see the module docstring).
ClickRule = Literal["center", "random"]
CLICK_RULES = ("center", "random")


@dataclass(frozen=True)
class Click:
    """One simulated click on an image.

    Args:
        y: row of the clicked pixel.
        x: column of the clicked pixel.
        positive: ``True`` on a missed object pixel (a false negative), ``False`` on a false positive.
    """

    y: int
    x: int
    positive: bool

    def xy(self) -> tuple[float, float]:
        """The pixel's centre as SAM's point prompts take it: ``(x + 0.5, y + 0.5)`` in image pixels."""
        return self.x + 0.5, self.y + 0.5


@dataclass(frozen=True)
class VolumeClick:
    """One simulated click in a volume, on the slice it falls in.

    Args:
        slice: index along the volume's first axis (the slice the click is placed on).
        y: row within that slice.
        x: column within that slice.
        positive: ``True`` on a false negative, ``False`` on a false positive.
    """

    slice: int
    y: int
    x: int
    positive: bool


def _errors(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    return target & ~pred, pred & ~target


def _largest_region(missed: np.ndarray, false: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool] | None:
    """The largest connected region of ``missed`` or ``false`` (ties drawn by ``rng``) and whether it is missed."""
    structure = ndimage.generate_binary_structure(missed.ndim, missed.ndim)  # 8- (2D) or 26-connected (3D)
    regions: list[tuple[int, bool, int]] = []  # (size, positive, label)
    labelled = {}
    for positive, errors in ((True, missed), (False, false)):
        labels, count = ndimage.label(errors, structure)
        if not count:
            continue
        labelled[positive] = labels
        sizes = np.bincount(labels.ravel())[1:]
        regions += [(int(size), positive, k + 1) for k, size in enumerate(sizes)]
    if not regions:
        return None
    largest = max(size for size, _, _ in regions)
    candidates = [(positive, label) for size, positive, label in regions if size == largest]
    positive, label = candidates[int(rng.integers(len(candidates)))] if len(candidates) > 1 else candidates[0]
    return labelled[positive] == label, positive


def _centre(region: np.ndarray, rng: np.random.Generator, spacing: tuple[float, ...] | None = None) -> tuple[int, ...]:
    """The pixel of ``region`` farthest from its border (the image edge included), ties drawn by ``rng``."""
    # crop to the region's bounding box, one pixel of zeros around it: the image edge is a border too
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    crop = np.pad(region[box], 1)
    distance = ndimage.distance_transform_edt(crop, sampling=spacing)
    best = np.flatnonzero(distance == distance.max())
    pick = best[int(rng.integers(len(best)))] if len(best) > 1 else best[0]
    inside = np.unravel_index(pick, crop.shape)
    return tuple(int(i) - 1 + s.start for i, s in zip(inside, box, strict=True))


def _random_error(missed: np.ndarray, false: np.ndarray, rng: np.random.Generator) -> tuple[tuple[int, ...], bool]:
    errors = np.flatnonzero(missed | false)
    pick = int(errors[int(rng.integers(len(errors)))])
    where = np.unravel_index(pick, missed.shape)
    return tuple(int(i) for i in where), bool(missed.flat[pick])


def next_click(
    pred: np.ndarray, target: np.ndarray, rng: np.random.Generator, rule: ClickRule = "center"
) -> Click | None:
    """Where a user clicks next on one image: a positive click on what the prediction missed, a negative one
    on what it wrongly covers.

    Args:
        pred: ``[H, W]`` bool predicted mask.
        target: ``[H, W]`` bool ground truth.
        rng: breaks ties (``"center"``) or draws the pixel (``"random"``).
        rule: ``"center"``: the centre of the largest connected error region; ``"random"``: a random
            error pixel.

    Returns:
        The click, or ``None`` when the prediction equals the ground truth (nothing to correct).
    """
    missed, false = _errors(pred, target)
    if not (missed.any() or false.any()):
        return None
    if rule == "random":
        (y, x), positive = _random_error(missed, false, rng)
        return Click(y, x, positive)
    region, positive = _largest_region(missed, false, rng)  # type: ignore[misc]
    y, x = _centre(region, rng)
    return Click(y, x, positive)


def next_volume_click(
    pred: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    rule: ClickRule = "center",
    spacing: tuple[float, float, float] | None = None,
) -> VolumeClick | None:
    """:func:`next_click` in 3D: the centre voxel of the largest 26-connected error component of a volume.

    The click is then given on that voxel's slice (the CVPR 2025 interactive 3D protocol with a 2D
    model: re-predict that slice with its prompts and the click, then propagate from it).

    Args:
        pred: ``[S, H, W]`` bool predicted volume (slices along the first axis).
        target: ``[S, H, W]`` bool ground truth.
        rng: breaks ties (``"center"``) or draws the voxel (``"random"``).
        rule: as :func:`next_click`.
        spacing: voxel size along the three axes (mm); the distance to the border is measured in it, so an
            anisotropic volume's centre is the one a user sees. ``None``: isotropic.

    Returns:
        The click (slice, row, column, positive), or ``None`` when the prediction equals the ground truth.
    """
    missed, false = _errors(pred, target)
    if missed.ndim != 3:
        raise ValueError(f"a volume click needs [S, H, W] masks, got shape {missed.shape}")
    if not (missed.any() or false.any()):
        return None
    if rule == "random":
        (k, y, x), positive = _random_error(missed, false, rng)
        return VolumeClick(k, y, x, positive)
    region, positive = _largest_region(missed, false, rng)  # type: ignore[misc]
    k, y, x = _centre(region, rng, spacing)
    return VolumeClick(k, y, x, positive)
