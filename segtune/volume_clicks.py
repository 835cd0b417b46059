"""Corrective clicks on volumes: the CVPR 2025 interactive 3D protocol with a 2D model.

After each object has been followed through the volume by the configured protocol (``box3d`` or ``box2d``,
:mod:`segtune.propagation`), each click round places one 3D click per class: the centre voxel of the class's
largest 26-connected error component (:func:`segtune.clicks.next_volume_click`, with the case's spacing and
:class:`~segtune.click_rounds.ClickScoring`'s rule and seed), positive on a missed voxel, negative on a
false one. The click belongs to the object of its class that holds the voxel (its ground truth for a positive
click, its prediction for a negative one; the nearest object of the class when none does). That object's
slice of the click is predicted again with its box from the last propagation on that slice (the object's box
when none reached it), every click so far on that slice, and, with ``ClickScoring.mask_input``, the slice's
previous low-resolution logits as the mask prompt; then the same protocol with the same options propagates
from that slice in both directions (``box3d`` inside the object's range, ``box2d`` until its stop rule
ends it), and the slices it reaches replace the object's earlier ones (``box2d``: the slice it stops at comes
out empty; slices beyond it keep their masks). Clicks stay where they were given: a propagation that passes a
slice with earlier clicks prompts it with its box and those clicks (:class:`~segtune.slice_prompts.ObjectPredictor`),
as the challenge's 3D model keeps every click.

Every object is followed alone here (:func:`follow_each`: the same masks as followed together, each with the
box and logits of each of its slices kept), through the volume's slice predictor, whose kept encoder outputs
make each slice's encoder pass happen once per case whatever the rounds. The scores of each click state (the
caller's volume Dice and NSD) are computed once per round. numpy and torch only: no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from segtune.click_rounds import ClickScoring
from segtune.click_scores import curve_scores
from segtune.clicks import VolumeClick, next_volume_click
from segtune.propagation import BoxPropagation, Followed, ObjectPrompt, SlicePredictor, largest_component
from segtune.slice_prompts import ObjectPredictor

#: Scores a click state: the objects' ``(class index, mask)`` -> the painted label volume and
#: ``{class: {"dice": .., "nsd": ..}}`` (classes with nothing predicted nor true left out).
Scorer = Callable[[Sequence[tuple[int, np.ndarray]]], tuple[np.ndarray, dict[int, dict[str, float]]]]


@dataclass
class ClickedObject:
    """One object through the click rounds.

    Args:
        cls: its class index.
        target: its ``(S, H, W)`` ground truth.
        prompt: the protocol's prompt (its box, and ``box3d``'s slice range).
        mask: its current ``(S, H, W)`` prediction.
        boxes: the box each slice was last predicted with.
        logits: the low-resolution logits of each slice's last prediction.
        points: the clicks given so far on each slice, ``[x, y, label]`` in the slice's pixels.
    """

    cls: int
    target: np.ndarray
    prompt: ObjectPrompt
    mask: np.ndarray
    boxes: dict[int, np.ndarray]
    logits: dict[int, torch.Tensor | None]
    points: dict[int, list[list[float]]] = field(default_factory=dict)


@dataclass
class VolumeClickCurves:
    """Each class's scores after the first propagation (position 0) and after each click round.

    Args:
        dice: ``{class: [R + 1] volume Dice}`` (NaN where the class is not scored).
        nsd: ``{class: [R + 1] NSD}``.
        clicks: ``{class: its clicks}`` (a class whose prediction is right gets no more).
    """

    dice: dict[int, list[float]]
    nsd: dict[int, list[float]]
    clicks: dict[int, list[VolumeClick]]


def follow_each(
    protocol: BoxPropagation,
    predict: SlicePredictor,
    shape: tuple[int, int, int],
    found: Sequence[tuple[int, np.ndarray]],
    prompts: Sequence[ObjectPrompt],
) -> tuple[list[Followed], list[ClickedObject]]:
    """Each object followed alone by ``protocol``, with the box and logits of each of its slices kept.

    Args:
        protocol: the configured protocol (:data:`segtune.propagation.PROTOCOLS`' class with its options).
        predict: the volume's slice predictor.
        shape: the volume's ``(S, H, W)``.
        found: ``(class index, ground truth)`` of each object.
        prompts: each object's prompt.

    Returns:
        The protocol's :class:`~segtune.propagation.Followed` of each object, and its click-round state.
    """
    followed, objects = [], []
    for (cls, target), prompt in zip(found, prompts, strict=True):
        kept = ObjectPredictor(predict)
        (one,) = protocol(kept, shape, [prompt])
        followed.append(one)
        objects.append(ClickedObject(cls, target, prompt, one.mask.copy(), kept.boxes, kept.logits))
    return followed, objects


def owner(objects: Sequence[ClickedObject], click: VolumeClick, cls: int) -> int | None:
    """The index of the object of class ``cls`` a click corrects: the one whose ground truth (a positive click)
    or prediction (a negative one; the last painted, as painting keeps it) holds the voxel, else the object of
    the class whose ground truth's centre is nearest (an object dropped by ``min_area`` has none of its own)."""
    mine = [i for i, o in enumerate(objects) if o.cls == cls]
    voxel = (click.slice, click.y, click.x)
    holding = [i for i in mine if (objects[i].target if click.positive else objects[i].mask)[voxel]]
    if holding:
        return holding[-1]
    if not mine:
        return None
    where = np.array([click.slice, click.y, click.x], float)
    return min(mine, key=lambda i: float(np.linalg.norm(np.argwhere(objects[i].target).mean(axis=0) - where)))


def reclick(
    protocol: BoxPropagation, predict: SlicePredictor, shape: tuple[int, int, int], o: ClickedObject,
    click: VolumeClick, mask_input: bool,
) -> None:  # fmt: skip
    """Add ``click`` to object ``o``, predict its slice again and propagate from it both ways (module docstring)."""
    o.points.setdefault(click.slice, []).append([click.x + 0.5, click.y + 0.5, float(click.positive)])
    start_box = o.boxes.get(click.slice, np.asarray(o.prompt.prompt, np.float32))
    if np.ndim(start_box) != 1:  # a points-prompted object: no box on that slice (the clicks prompt it alone)
        start_box = None
    points = {k: np.asarray(v, np.float32) for k, v in o.points.items()}
    start_mask = o.logits.get(click.slice) if mask_input else None
    given = ObjectPredictor(predict, points, click.slice, start_box, start_mask)
    (again,) = protocol(given, shape, [replace(o.prompt, slice=click.slice)])
    for step in again.steps:  # the slices it reached replace the earlier ones
        o.mask[step.slice] = again.mask[step.slice]
    o.boxes.update(given.boxes)
    o.logits.update(given.logits)
    if protocol.options.largest_component:  # the option holds for the object as a whole
        o.mask = largest_component(o.mask)


def volume_click_curves(
    protocol: BoxPropagation,
    predict: SlicePredictor,
    objects: Sequence[ClickedObject],
    label: np.ndarray,
    values: Sequence[int],
    rounds: int,
    options: ClickScoring,
    score: Scorer,
    first: tuple[np.ndarray, dict[int, dict[str, float]]],
    case: int = 0,
    mask_input: bool = True,
    spacing: tuple[float, float, float] | None = None,
) -> VolumeClickCurves:
    """Run ``rounds`` click rounds on one case's followed objects (they are updated in place).

    Args:
        protocol: the protocol the objects were followed by (:func:`follow_each`).
        predict: the volume's slice predictor.
        objects: :func:`follow_each`'s states.
        label: the ``(S, H, W)`` ground-truth label volume.
        values: the label value of each class.
        rounds: clicks per class.
        options: the click rule and seed (its ``mask_input`` is read through ``mask_input``).
        score: the caller's scorer of a click state.
        first: the painted prediction and class scores before any click (already scored by the caller).
        case: the case's index: with ``options.seed`` and the class it seeds each class's clicks, so a case
            gets the same clicks in any batch and for the untuned model.
        mask_input: give the clicked slice's previous logits as its mask prompt (``options.mask_input`` and a
            model that takes ``input_masks``).
        spacing: the case's voxel size along ``(S, H, W)`` (mm): where a component's centre is.

    Returns:
        Each class's Dice and NSD after each click state, and its clicks.
    """
    classes = sorted({o.cls for o in objects})
    rngs = {c: np.random.default_rng([options.seed, int(case), c]) for c in classes}
    painted, scores = first
    nan = {"dice": math.nan, "nsd": math.nan}
    dice = {c: [scores.get(c, nan)["dice"]] for c in classes}
    nsd = {c: [scores.get(c, nan)["nsd"]] for c in classes}
    clicks: dict[int, list[VolumeClick]] = {c: [] for c in classes}
    shape = tuple(label.shape)
    for _ in range(rounds):
        placed = {}  # every class's click on the same state, before any object changes
        for c in classes:
            click = next_volume_click(painted == values[c], label == values[c], rngs[c], options.rule, spacing)
            if click is not None:  # a class predicted right gets no click
                placed[c] = click
        for c, click in placed.items():
            clicks[c].append(click)
            i = owner(objects, click, c)
            # a box3d click outside the object's range (a voxel of no object of its own): nothing re-predicted
            if i is not None and protocol.inside(objects[i].prompt, click.slice):
                reclick(protocol, predict, shape, objects[i], click, mask_input)  # type: ignore[arg-type]
        if placed:
            painted, scores = score([(o.cls, o.mask) for o in objects])
        for c in classes:
            dice[c].append(scores.get(c, nan)["dice"])
            nsd[c].append(scores.get(c, nan)["nsd"])
    return VolumeClickCurves(dice, nsd, clicks)


def curve_rows(curves: VolumeClickCurves, classes: Sequence[int], rounds: int) -> dict[int, dict[str, float]]:
    """Each class's click scores for its report row (:func:`segtune.click_scores.click_score_names` with NSD
    beside Dice): Dice and NSD after each click, the Dice curve's AUC, gain and NoC."""
    blank = [math.nan] * (rounds + 1)
    out = {}
    for c in classes:
        dice = torch.tensor([curves.dice.get(c, blank)], dtype=torch.float64)
        nsd = torch.tensor([curves.nsd.get(c, blank)], dtype=torch.float64)
        out[c] = {name: float(value[0]) for name, value in curve_scores(dice, nsd, "nsd").items()}
    return out
