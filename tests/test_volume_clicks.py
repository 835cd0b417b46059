"""Corrective clicks on volumes (issue 32, point 3): each round's 3D click at the centre of the largest error
component, its slice predicted from the box with every click there and the previous logits, propagation from it,
and an oracle whose volume Dice never drops. Stand-in predictors only: the CLI run is in tests/test_volumes_cli.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from segtune.click_rounds import ClickScoring
from segtune.data.slices import VolumeOptions
from segtune.propagation import Box3D, PropagationOptions, SliceOutput
from segtune.slice_prompts import SlicePrompt
from segtune.volume_clicks import VolumeClickCurves, curve_rows, follow_each, volume_click_curves
from segtune.volume_scoring import object_prompt, paint, volume_objects

SHAPE = (16, 26, 56)
VALUES = [1, 2]


def hand_made() -> tuple[np.ndarray, np.ndarray]:
    """A label volume and the stand-in's mistakes. Class 1: a block on slices 2-13 and a blob beside it on slices
    9-13, which the middle slice's box does not reach (a 3D error component propagation misses). Class 2: a
    square ring on slices 2-9 whose hole holds, on slices 3-7, a 3x3 patch the stand-in wrongly includes."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:14, 6:18, 2:14] = 1
    label[9:14, 9:16, 17:24] = 1  # 5 x 7 x 7: centre voxel (11, 12, 20)
    label[2:10, 8:17, 34:43] = 2
    label[2:10, 10:15, 36:41] = 0  # the ring's hole
    mistakes = np.zeros(SHAPE, bool)
    mistakes[3:8, 11:14, 37:40] = True  # inside the hole, one pixel from the ring
    return label, mistakes


def filled(box: np.ndarray) -> np.ndarray:
    out = np.zeros(SHAPE[1:], bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    out[max(y0, 0) : y1, max(x0, 0) : x1] = True
    return out


class Oracle:
    """A stand-in model: on slice ``k`` the truth (and its mistakes) inside the box; a positive point adds the true
    2D component under it, a negative one removes the predicted component under it. Records every call."""

    def __init__(self, label: np.ndarray, mistakes: np.ndarray) -> None:
        self.truth, self.mistakes = label > 0, mistakes
        self.calls: list[tuple[int, SlicePrompt, torch.Tensor | None]] = []

    def __call__(self, indices, prompts, masks=None) -> list[SliceOutput]:
        out = []
        for i, (k, prompt) in enumerate(zip(indices, prompts, strict=True)):
            given = SlicePrompt.of(prompt)
            self.calls.append((int(k), given, None if masks is None else masks[i]))
            mask = (self.truth[k] | self.mistakes[k]) & filled(given.box)
            for x, y, positive in given.points if given.points is not None else []:
                parts, _ = ndimage.label(self.truth[k] if positive else mask)
                part = parts[int(y), int(x)]
                if part:
                    mask = mask | (parts == part) if positive else mask & ~(parts == part)
            out.append(SliceOutput(mask, 1.0, torch.full((4, 4), float(len(self.calls)))))
        return out


def dice_only(label: np.ndarray):
    def score(objects):
        painted = paint(objects, VALUES, label.shape)
        out = {}
        for c, v in enumerate(VALUES):
            p, t = painted == v, label == v
            if p.any() or t.any():
                out[c] = {"dice": 2 * (p & t).sum() / (p.sum() + t.sum()), "nsd": math.nan}
        return painted, out

    return score


def run(model, label: np.ndarray, rounds: int) -> tuple[VolumeClickCurves, list]:
    found = volume_objects(label, VALUES, VolumeOptions())
    prompts = [object_prompt(mask, "box3d") for _, mask in found]
    protocol = Box3D(PropagationOptions(margin=1.0))
    _, objects = follow_each(protocol, model, SHAPE, found, prompts)
    score = dice_only(label)
    first = score([(o.cls, o.mask) for o in objects])
    curves = volume_click_curves(protocol, model, objects, label, VALUES, rounds, ClickScoring(), score, first, 3)
    return curves, objects


def test_an_oracles_volume_dice_never_drops_and_each_click_is_at_the_largest_error_components_centre() -> None:
    label, mistakes = hand_made()
    model = Oracle(label, mistakes)
    curves, objects = run(model, label, rounds=4)
    # class 1: the missed blob is the largest error; one positive click at its centre, propagated, finds it all
    assert curves.clicks[0][0].slice == 11 and (curves.clicks[0][0].y, curves.clicks[0][0].x) == (12, 20)
    assert curves.clicks[0][0].positive and len(curves.clicks[0]) == 1  # right after it: no more clicks
    assert curves.dice[0][0] < 1 and curves.dice[0][1:] == [1.0] * 4
    # class 2: the patch on 5 slices; each negative click clears one slice, and clicks stay where they were given
    # (a propagation that passes an earlier click's slice gives it that click again): Dice rises with every click
    # (the patch is 3 pixels wide: its middle three slices are equally far from its border, the seed picks)
    assert curves.clicks[1][0].slice in (4, 5, 6) and not any(c.positive for c in curves.clicks[1])
    assert all(b > a for a, b in zip(curves.dice[1], curves.dice[1][1:], strict=False))
    assert len({c.slice for c in curves.clicks[1]}) == 4 and {c.slice for c in curves.clicks[1]} <= set(range(3, 8))
    # the clicked slice got its box from the last propagation there, the click and that slice's previous logits
    k, given, mask = next(call for call in model.calls if call[1].points is not None)
    assert k == 11 and given.box is not None and given.points.tolist() == [[20.5, 12.5, 1.0]]
    earlier = max(i for i, call in enumerate(model.calls) if call[0] == 11 and call[1].points is None)
    assert mask is not None and float(mask[0, 0]) == earlier + 1  # the logits of slice 11's last prediction
    rows = curve_rows(curves, [0, 1], 4)
    assert rows[0]["dice_click_1"] == 1.0 and rows[1]["click_gain"] > 0 and math.isnan(rows[1]["nsd_click_2"])


def test_box3d_propagation_from_a_click_stays_inside_the_objects_range() -> None:
    label, mistakes = hand_made()
    label[label == 1] = 0  # the ring alone, on slices 2-9 of 16
    model = Oracle(label, mistakes | filled(np.array([30, 4, 50, 22]))[None])  # all it is given, around the ring
    curves, objects = run(model, label, rounds=2)
    assert len(curves.clicks[1]) == 2  # the box filled around the ring: false pixels to click on, twice
    # each click's propagation ran to both ends of the ring's slices 2-9 and no further (8 calls: the first pass)
    assert sorted(k for k, _, _ in model.calls[8:]) == sorted([*range(2, 10)] * 2)
    assert set(np.flatnonzero(objects[0].mask.any(axis=(1, 2)))) <= set(range(2, 10))
