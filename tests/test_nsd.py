"""segtune's NSD is the published one: DeepMind's surface Dice (surface elements weighted by area), as MedSAM,
its challenges and the Decathlon compute it; tests/reference_surface_dice.py is DeepMind's algorithm.

segtune's arrays are ``(S, H, W)`` (``(z, y, x)`` unless sliced across another axis) and ``spacing`` is mm along
those axes (``PreparedVolume.spacing``), the order DeepMind's ``spacing_mm`` and MONAI's ``spacing`` take.
MONAI sums the areas in float32, hence the 1e-6 tolerance.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from segtune.volume_scoring import class_scores, surface_dice
from tests.reference_surface_dice import surface_dice as reference

SPACING = (0.5, 1.0, 2.5)  # mm along (z, y, x): three different spacings, so a swapped axis shows


def voxel_counting(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...], tolerance: float) -> float:
    """segtune's NSD before issue 31: MONAI's default, every boundary voxel counted once."""
    from monai.metrics import compute_surface_dice

    with warnings.catch_warnings():  # monai 1.5+ warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        score = compute_surface_dice(
            torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None], [tolerance],
            include_background=True, spacing=list(spacing),
        )  # fmt: skip
    return float(score.item())


def cubes(axis: int) -> tuple[np.ndarray, np.ndarray]:
    """A 5x6x4-voxel box and the same box one voxel further along ``axis``."""
    pred = np.zeros((12, 14, 10), bool)
    pred[3:8, 4:10, 3:7] = True
    return pred, np.roll(pred, 1, axis=axis)


def ellipsoid(shape: tuple[int, int, int], centre_mm: np.ndarray, radius_mm: float, spacing: tuple[float, ...]):
    """A ball of ``radius_mm`` in mm (so, in voxels, an ellipsoid flattened along the coarse axes)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij"))
    return ((grid - np.reshape(centre_mm, (3, 1, 1, 1))) ** 2).sum(0) <= radius_mm**2


def blob(seed: int, shape: tuple[int, int, int] = (20, 24, 18)) -> np.ndarray:
    """A random smooth blob: smoothed noise above a threshold, inside the volume."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma=3)
    mask = field > np.quantile(field, 0.7)
    mask[[0, -1]] = False  # so that the objects do not touch the volume's ends along z
    return mask


# tolerances below the finest spacing, at each spacing and between them
@pytest.mark.parametrize("tolerance", [0.4, 0.5, 0.9, 1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_is_deepmind_nsd(axis: int, tolerance: float) -> None:
    pred, target = cubes(axis)
    expected = reference(pred, target, SPACING, tolerance)
    assert surface_dice(pred, target, SPACING, tolerance) == pytest.approx(expected, abs=1e-6)
    if tolerance >= SPACING[axis]:  # the shift is within the tolerance: every surface element is
        assert expected == pytest.approx(1.0)


def test_shifted_cube_differs_from_voxel_counting() -> None:
    """The case that failed before issue 31: a box one 2.5 mm voxel further along x, 1 mm tolerance."""
    pred, target = cubes(axis=2)
    new, old = surface_dice(pred, target, SPACING, 1.0), voxel_counting(pred, target, SPACING, 1.0)
    assert new == pytest.approx(reference(pred, target, SPACING, 1.0), abs=1e-6)
    assert new == pytest.approx(0.836614, abs=1e-6) and old == pytest.approx(0.6875)


def test_spacing_follows_the_array_axes() -> None:
    """``spacing`` is mm along the arrays' axes: the same objects with their axes moved (as PreparedVolume moves
    the slice axis first) and their spacing moved with them score the same; with the spacing left behind, not."""
    pred, target = cubes(axis=2)
    expected = reference(pred, target, SPACING, 1.0)
    moved = (SPACING[2], SPACING[0], SPACING[1])  # slices across x: (x, z, y)
    p, t = np.moveaxis(pred, 2, 0), np.moveaxis(target, 2, 0)
    assert surface_dice(p, t, moved, 1.0) == pytest.approx(expected, abs=1e-6)
    assert abs(surface_dice(p, t, SPACING, 1.0) - expected) > 0.05


def test_ball_against_eroded_ball_is_deepmind_nsd() -> None:
    shape = (24, 20, 16)
    ball = ellipsoid(shape, np.array([12 * 0.5, 10 * 1.0, 8 * 2.5]), 9.0, SPACING)
    eroded = ndimage.binary_erosion(ball)
    for tolerance in (0.5, 1.0, 2.0):
        expected = reference(eroded, ball, SPACING, tolerance)
        assert surface_dice(eroded, ball, SPACING, tolerance) == pytest.approx(expected, abs=1e-6)
    assert surface_dice(eroded, ball, SPACING, 3.0) == pytest.approx(1.0)  # erosion moves the surface one voxel
    assert abs(voxel_counting(eroded, ball, SPACING, 1.0) - reference(eroded, ball, SPACING, 1.0)) > 0.01


@pytest.mark.parametrize("spacing", [SPACING, (3.0, 0.8, 0.6)])  # the second: a CT's (z, y, x)
def test_random_blobs_are_deepmind_nsd(spacing: tuple[float, float, float]) -> None:
    pred, target = blob(1), blob(2)
    assert 0.05 < (pred & target).sum() / (pred | target).sum() < 0.95  # they overlap in part
    for tolerance in (1.0, 2.0, 5.0):
        expected = reference(pred, target, spacing, tolerance)
        assert 0 < expected < 1
        assert surface_dice(pred, target, spacing, tolerance) == pytest.approx(expected, abs=1e-6)


def test_class_scores_report_deepmind_nsd() -> None:
    """The per-class rows of a report carry the same NSD, and the empty cases keep their conventions."""
    pred, target = blob(3), blob(4)
    label = target.astype(np.uint8)
    predicted = pred.astype(np.uint8) * 2  # class 1 (value 2) predicted where class 0 (value 1) is
    predicted[pred & target] = 1
    scores = class_scores(predicted, label, [1, 2], SPACING, 2.0)
    assert scores[0]["nsd"] == pytest.approx(reference(pred & target, target, SPACING, 2.0), abs=1e-6)
    assert scores[1]["nsd"] == 0.0  # predicted, absent from the ground truth
    assert np.isnan(surface_dice(np.zeros_like(pred), np.zeros_like(pred), SPACING, 2.0))
