"""The 3D prompt protocols (segtune.propagation): box3d inside the known range, box2d stopping where the
object ends, boxes that do not compound their margin, the stop rule chosen from one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.propagation import (
    STOP_GRID,
    STOP_TOLERANCE,
    Box2D,
    Box3D,
    ObjectPrompt,
    PropagationOptions,
    SliceOutput,
    StopRule,
    choose_stop,
    largest_component,
    loosest,
    next_box,
    stop_counts,
)
from segtune.volume_scoring import VolumeScoring, margin_pixels, object_prompt, range_errors, slice_range
from tests.test_volume_scoring import ellipsoid


def filled(box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.zeros(size, bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    out[max(y0, 0) : y1, max(x0, 0) : x1] = True
    return out


class StandIn:
    """A model stand-in that records every call: ``answer(k, box)`` gives the mask, ``score(k)`` its
    predicted IoU (1 by default)."""

    def __init__(self, answer, score=lambda k: 1.0) -> None:
        self.answer, self.score = answer, score
        self.calls: list[tuple[int, np.ndarray]] = []
        self.masks: list[object] = []

    def __call__(self, indices, prompts, masks=None):
        out = []
        for i, (k, box) in enumerate(zip(indices, prompts, strict=True)):
            self.calls.append((int(k), np.asarray(box).copy()))
            self.masks.append(None if masks is None else masks[i])
            mask = self.answer(int(k), np.asarray(box))
            out.append(SliceOutput(mask, self.score(int(k)), torch.full((4, 4), float(k))))
        return out


def truth_in_box(truth: np.ndarray):
    return lambda k, box: truth[k] & filled(box, truth.shape[1:])


def full_box(truth: np.ndarray):
    return lambda k, box: filled(box, truth.shape[1:])


OPTIONS = PropagationOptions(margin=1.0)


def test_box3d_follows_the_object_inside_its_range_and_nowhere_else() -> None:
    truth = ellipsoid()
    first, last = slice_range(truth)
    prompt = object_prompt(truth, "box3d")
    assert prompt.slices == (first, last) and first <= prompt.slice <= last
    model = StandIn(truth_in_box(truth))
    (followed,) = Box3D(OPTIONS)(model, truth.shape, [prompt])
    assert np.array_equal(followed.mask, truth)
    assert sorted(k for k, _ in model.calls) == list(range(first, last + 1))  # every slice of the range, once
    # a model that fills every box it is given still predicts nothing outside the range
    model = StandIn(full_box(truth))
    (followed,) = Box3D(OPTIONS)(model, truth.shape, [prompt])
    predicted = np.flatnonzero(followed.mask.any(axis=(1, 2)))
    assert (predicted[0], predicted[-1]) == (first, last)
    assert range_errors(followed.mask, truth)["outside_slices"] == 0


def test_box3d_prompts_the_3d_box_again_after_an_empty_slice() -> None:
    truth = ellipsoid()
    prompt = object_prompt(truth, "box3d")
    gap = prompt.slice + 2
    model = StandIn(lambda k, box: np.zeros(truth.shape[1:], bool) if k == gap else truth[k] & filled(box, (48, 48)))
    (followed,) = Box3D(OPTIONS)(model, truth.shape, [prompt])
    given = {k: box for k, box in model.calls}
    assert np.array_equal(given[gap + 1], prompt.prompt)  # the slice after the empty one: the object's 3D box
    assert not followed.mask[gap].any() and followed.mask[gap + 1].any()
    errors = range_errors(followed.mask, truth)
    assert errors == {"outside_slices": 0.0, "empty_slices": 1.0}


def test_box2d_stops_within_a_slice_of_the_end_where_the_model_says_so() -> None:
    truth = ellipsoid()
    first, last = slice_range(truth)
    # the stand-in fills every box it gets, on every slice, and is unsure wherever the object is not
    model = StandIn(full_box(truth), score=lambda k: 0.95 if truth[k].any() else 0.3)
    (followed,) = Box2D(OPTIONS, StopRule(min_score=0.5, min_overlap=0.0))(
        model, truth.shape, [object_prompt(truth, "box2d")]
    )
    predicted = np.flatnonzero(followed.mask.any(axis=(1, 2)))
    assert (predicted[0], predicted[-1]) == (first, last)
    assert sorted({k for k, _ in model.calls}) == list(range(first - 1, last + 2))  # one call past each end
    # the same stand-in without a stop rule runs to both ends of the volume (what box2d exists to prevent)
    (runaway,) = Box2D(OPTIONS, StopRule(0.0, 0.0))(model, truth.shape, [object_prompt(truth, "box2d")])
    assert runaway.mask.any(axis=(1, 2)).all()


def test_box2d_stops_where_consecutive_masks_stop_overlapping() -> None:
    truth = ellipsoid()
    truth[[3, 15]] = False  # the one-voxel caps: consecutive slices inside the object overlap by IoU >= 0.55

    def jumps(k: int, box: np.ndarray) -> np.ndarray:  # past the object the model finds something elsewhere
        if truth[k].any():
            return truth[k] & filled(box, truth.shape[1:])
        out = np.zeros(truth.shape[1:], bool)
        out[40:46, 40:46] = True
        return out

    (followed,) = Box2D(OPTIONS, StopRule(min_score=0.0, min_overlap=0.5))(
        StandIn(jumps), truth.shape, [object_prompt(truth, "box2d")]
    )
    assert np.array_equal(followed.mask, truth)


def test_box2d_stops_where_the_mask_shrinks_to_a_speck() -> None:
    truth = ellipsoid()
    truth[[3, 15]] = False  # the one-voxel caps: every slice of the object is larger than the speck
    first, last = slice_range(truth)

    def specks(k: int, box: np.ndarray) -> np.ndarray:  # past the object: a confident one-pixel speck in the box
        if truth[k].any():
            return truth[k] & filled(box, truth.shape[1:])
        out = np.zeros(truth.shape[1:], bool)
        out[int(box[1]) + 1, int(box[0]) + 1] = True
        return out

    prompt = object_prompt(truth, "box2d")
    smallest = min(truth[k].sum() for k in range(first, last + 1)) / truth[prompt.slice].sum()
    (followed,) = Box2D(OPTIONS, StopRule(0.0, 0.0, min_area=smallest))(StandIn(specks), truth.shape, [prompt])
    assert np.array_equal(followed.mask, truth)
    (runaway,) = Box2D(OPTIONS, StopRule(0.0, 0.0))(StandIn(specks), truth.shape, [prompt])
    assert runaway.mask.any(axis=(1, 2)).all()  # overlap and score alone follow the speck to the volume's ends


def test_margins_do_not_compound() -> None:
    shape = (15, 60, 60)
    box = np.array([20, 20, 36, 30], np.float32)
    model = StandIn(lambda k, b: filled(b, shape[1:]))  # returns its box exactly
    Box3D(PropagationOptions(margin=3.0))(model, shape, [ObjectPrompt(7, box, (0, 14))])
    sizes = {(float(b[2] - b[0]), float(b[3] - b[1])) for _, b in model.calls}
    assert sizes == {(16.0, 10.0)}  # the same box size on every slice, not 6 px wider per slice
    # a shrinking object's next box is its tight box with the margin, never wider than the first box
    small = np.zeros((60, 60), bool)
    small[24:27, 25:30] = True
    assert next_box(small, 3.0, box, (60, 60)).tolist() == [22, 21, 33, 30]
    # the margin is defined in the model's input frame: 3 px at 256 is 0.59 px on a 50-pixel slice
    assert margin_pixels(VolumeScoring(box_margin=3), 256, (35, 50)) == pytest.approx(3 * 50 / 256)


def test_objects_advance_together_each_as_alone() -> None:
    truth = ellipsoid()
    other = ellipsoid(centre=(12, 20, 30), radii=(4, 8, 6))
    prompts = [object_prompt(truth, "box3d"), object_prompt(other, "box3d")]
    both = Box3D(OPTIONS)(StandIn(lambda k, b: (truth[k] | other[k]) & filled(b, (48, 48))), truth.shape, prompts)
    alone = [
        Box3D(OPTIONS)(StandIn(lambda k, b: (truth[k] | other[k]) & filled(b, (48, 48))), truth.shape, [p])[0]
        for p in prompts
    ]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(both, alone, strict=True))


def test_a_stop_rule_read_from_one_pass_is_the_rule_run_alone() -> None:
    truth = ellipsoid()
    rng = np.random.default_rng(0)
    scores = {k: float(rng.uniform(0.4, 1.0)) for k in range(truth.shape[0])}
    model = StandIn(full_box(truth), score=scores.get)
    prompt = object_prompt(truth, "box2d")
    follow = loosest(STOP_GRID)
    (once,) = Box2D(OPTIONS, StopRule(0.0, 0.1), follow)(model, truth.shape, [prompt])
    counts = stop_counts(once, truth)
    for rule in (StopRule(0.6, 0.1), StopRule(0.8, 0.5), StopRule(0.0, 0.7)):
        (alone,) = Box2D(OPTIONS, rule)(model, truth.shape, [prompt])
        assert np.array_equal(once.truncated(rule), alone.mask)
        outside = alone.mask.any(axis=(1, 2)) & ~truth.any(axis=(1, 2))
        assert counts[rule] == (float((alone.mask & truth).sum()), float(alone.mask.sum()), float(outside.sum()))


def test_choose_stop_takes_the_best_mean_dice() -> None:
    good, bad = StopRule(0.7, 0.3), StopRule(0.0, 0.1)
    rows = [{r: (10.0, 40.0) for r in STOP_GRID} for _ in range(2)]
    for row in rows:
        row[good] = (30.0, 32.0)  # Dice 2*30/(32+30) against 2*10/(40+30)
    assert choose_stop(rows, [30.0, 30.0]) == good
    assert choose_stop([{r: (10.0, 40.0) for r in STOP_GRID}], [30.0]) == STOP_GRID[0]  # a tie: the loosest
    assert bad in STOP_GRID and good in STOP_GRID


def test_choose_stop_prefers_the_rule_that_stops_at_the_object_among_equally_good_ones() -> None:
    best, near, far = StopRule(0.5, 0.2), StopRule(0.0, 0.1, 0.2), StopRule(0.9, 0.7, 0.2)
    row = {r: (10.0, 40.0, 9.0) for r in STOP_GRID}
    row[best] = (30.0, 32.0, 5.0)  # Dice 0.9677, 5 slices past the object
    row[near] = (29.8, 32.0, 0.0)  # Dice 0.9613: within STOP_TOLERANCE of it, none past
    row[far] = (20.0, 20.0, 0.0)  # Dice 0.8: none past, but far worse
    assert choose_stop([row], [30.0]) == near
    assert choose_stop([row], [30.0], tolerance=0.0) == best
    assert choose_stop([row], [30.0], tolerance=0.2) == near  # among those none past, the better Dice
    assert {best, near, far} <= set(STOP_GRID) and STOP_TOLERANCE == 0.01


def test_mask_prompt_passes_the_previous_slices_logits() -> None:
    truth = ellipsoid()
    model = StandIn(truth_in_box(truth))
    prompt = object_prompt(truth, "box3d")
    Box3D(PropagationOptions(margin=1.0, mask_prompt=True))(model, truth.shape, [prompt])
    for (k, _), mask in zip(model.calls, model.masks, strict=True):
        if k == prompt.slice:
            assert mask is None
        else:  # the stand-in's logits carry the slice they came from: the neighbour towards the prompt
            assert float(mask[0, 0]) == k - 1 if k > prompt.slice else float(mask[0, 0]) == k + 1


def test_largest_component_drops_strays() -> None:
    mask = np.zeros((6, 10, 10), bool)
    mask[1:5, 1:5, 1:5] = True
    mask[5, 8, 8] = True
    assert largest_component(mask).sum() == 64
    truth = ellipsoid()
    corner = np.zeros((48, 48), bool)
    corner[0, 0] = True  # a pixel far from the object on one slice
    stray = StandIn(lambda k, b: (truth[k] & filled(b, (48, 48))) | (corner & (k == 4)))
    (kept,) = Box3D(PropagationOptions(margin=1.0, largest_component=True))(
        stray, truth.shape, [object_prompt(truth, "box3d")]
    )
    assert np.array_equal(kept.mask, truth)


def test_nsd_runs_under_the_trainers_bf16_autocast() -> None:
    from segtune.volume_scoring import surface_dice

    truth = ellipsoid()
    shifted = np.roll(truth, 1, axis=0)
    plain = surface_dice(shifted, truth, (2.0, 1.0, 1.0), 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as evaluation runs under bf16-mixed
        assert surface_dice(shifted, truth, (2.0, 1.0, 1.0), 2.0) == plain
