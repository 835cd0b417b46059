"""Scoring volumes: box propagation through the slices, volume Dice and NSD with the case's spacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.data.slices import VolumeOptions
from segtune.volume_scoring import (
    VolumeScoring,
    class_scores,
    middle_slice,
    propagate,
    propagate_all,
    surface_dice,
    volume_objects,
)


def ellipsoid(shape=(20, 48, 48), centre=(9, 24, 22), radii=(6, 14, 10)) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii, strict=True)) <= 1


class BoxedTruth:
    """A model stand-in: predicts the ground truth inside the prompt box (nothing where the object is not)."""

    def __init__(self, truth: np.ndarray) -> None:
        self.truth = truth
        self.calls: list[int] = []

    def __call__(self, indices, prompts):
        out = []
        for k, box in zip(indices, prompts, strict=True):
            self.calls.append(int(k))
            inside = np.zeros(self.truth.shape[1:], bool)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            inside[y0:y1, x0:x1] = True
            out.append(self.truth[k] & inside)
        return out


def test_propagation_follows_the_object_both_ways_and_stops_where_it_ends() -> None:
    truth = ellipsoid()
    extent = np.flatnonzero(truth.any(axis=(1, 2)))
    start = middle_slice(truth)
    assert start == (extent[0] + extent[-1]) // 2
    model = BoxedTruth(truth)
    rows, cols = np.flatnonzero(truth[start].any(1)), np.flatnonzero(truth[start].any(0))
    box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
    predicted = propagate(model, truth.shape, start, box, VolumeScoring(box_margin=3))
    assert np.array_equal(predicted, truth)  # every slice reached through the previous slice's box
    # one call past each end (where the prediction vanishes), none further
    assert sorted(model.calls) == list(range(extent[0] - 1, extent[-1] + 2))
    # an object that moves 2 px a slice: the grown box keeps up with it, the tight one loses part of it
    slanted = np.zeros((12, 40, 60), bool)
    for k in range(12):
        slanted[k, 10:30, 8 + 2 * k : 20 + 2 * k] = True
    box = np.array([18, 10, 30, 30], np.float32)  # slice 5's object
    grown = propagate(BoxedTruth(slanted), slanted.shape, 5, box, VolumeScoring(box_margin=3))
    tight = propagate(BoxedTruth(slanted), slanted.shape, 5, box, VolumeScoring(box_margin=0))
    assert np.array_equal(grown, slanted) and tight.sum() < slanted.sum()
    # two objects advance together, both ways in one call per step, each as it would alone
    model = BoxedTruth(slanted)
    both = propagate_all(model, slanted.shape, [5, 2], [box, np.array([12, 10, 24, 30], np.float32)], VolumeScoring())
    assert all(np.array_equal(b, slanted) for b in both) and len(set(model.calls)) == 12


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
    # 56 border voxels each: the cap 5 mm away fails a 2 mm tolerance, all else lies within 1 mm: 40 of 56
    assert scores["nsd"] == pytest.approx(5 / 7)
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
    expected = compute_surface_dice(p, t, [2.0], include_background=True, spacing=list(spacing))
    assert scores["nsd"] == pytest.approx(float(expected), abs=1e-6) and 0 < scores["nsd"] < 1
