"""Scoring volumes: objects, volume Dice and NSD with the case's spacing (propagation: tests/test_propagation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.data.slices import VolumeOptions
from segtune.volume_scoring import (
    class_scores,
    middle_slice,
    surface_dice,
    volume_objects,
)


def ellipsoid(shape=(20, 48, 48), centre=(9, 24, 22), radii=(6, 14, 10)) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii, strict=True)) <= 1


def test_objects_follow_the_instance_rule() -> None:
    label = np.zeros((10, 20, 20), np.uint8)
    label[2:5, 2:6, 2:6] = 1
    label[6:9, 12:16, 12:16] = 1  # a second component of label 1
    label[1:3, 10:14, 2:5] = 3
    semantic = volume_objects(label, [1, 3], VolumeOptions())
    components = volume_objects(label, [1, 3], VolumeOptions(instances="components"))
    assert [c for c, _ in semantic] == [0, 1] and [c for c, _ in components] == [0, 0, 1]
    assert middle_slice(semantic[0][1]) in (4, 6)  # slice 5 is empty: the nearest one with the object
    corner = np.zeros((6, 6, 6), np.uint8)
    corner[0:2, 0:2, 0:2] = corner[2:4, 2:4, 2:4] = 1  # two blocks touching at one corner: 26-connected
    assert len(volume_objects(corner, [1], VolumeOptions(instances="components", min_area=1))) == 1


def cubes(shift: int) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.zeros((10, 12, 12), bool), np.zeros((10, 12, 12), bool)
    pred[2:6, 4:8, 4:8] = True
    target[2 + shift : 6 + shift, 4:8, 4:8] = True
    return pred, target


def test_volume_dice_and_nsd_by_hand() -> None:
    pred, target = cubes(shift=1)  # 4 slices of 4x4, the target one slice further
    values, label = [1], target.astype(np.uint8)
    scores = class_scores(pred.astype(np.uint8), label, values, (5.0, 1.0, 1.0), 2.0)[0]
    assert scores["dice"] == pytest.approx(2 * 48 / (64 + 64))
    # surface area within 2 mm over all of it (DeepMind's NSD, tests/test_nsd.py): only the surface elements on the
    # corner plane of each cube's cap that sticks out (the cap and its sides' rim) are 5 mm away; counting the 56
    # border voxels of each instead (MONAI's default, before issue 31) gave 40 of 56 = 0.714
    assert scores["nsd"] == pytest.approx(0.860198, abs=1e-6)
    assert surface_dice(pred, target, (5.0, 1.0, 1.0), 6.0) == pytest.approx(1.0)  # the cap is within 6 mm
    assert surface_dice(pred, target, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)  # 1 mm slices: within 2 mm
    same = class_scores(target.astype(np.uint8), label, values, (5.0, 1.0, 1.0), 2.0)[0]
    assert same == {"dice": 1.0, "nsd": 1.0}
    missed = class_scores(np.zeros_like(label), label, values, (5.0, 1.0, 1.0), 2.0)[0]
    assert missed == {"dice": 0.0, "nsd": 0.0}
    assert class_scores(np.zeros_like(label), np.zeros_like(label), values, (1, 1, 1), 2.0) == {}  # nothing to score


def test_scores_agree_with_monai() -> None:
    from monai.metrics import compute_dice, compute_surface_dice

    pred = ellipsoid(centre=(9, 25, 21), radii=(5, 13, 11))
    target = ellipsoid()
    spacing = (3.0, 0.8, 0.6)
    scores = class_scores(pred.astype(np.uint8), target.astype(np.uint8), [1], spacing, 2.0)[0]
    p, t = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(target)[None, None].float()
    assert scores["dice"] == pytest.approx(float(compute_dice(p, t)), abs=1e-6)
    expected = compute_surface_dice(p, t, [2.0], include_background=True, spacing=list(spacing), use_subvoxels=True)
    assert scores["nsd"] == pytest.approx(float(expected), abs=1e-6) and 0 < scores["nsd"] < 1
