"""How objects are followed through a volume's slices: the 3D prompt protocols, each a small part chosen by name.

A protocol gets a :class:`SlicePredictor` (the model on one volume's slices) and one
:class:`ObjectPrompt` per object, and returns each object's ``(S, H, W)`` prediction with what the
model said on every slice it predicted (:class:`Followed`). Nothing here knows about Lightning or
about scoring.

- ``box3d`` (:class:`Box3D`), the slice range known: MedSAM's LiteMedSAM 3D inference and the CVPR 2024
  and 2025 segmentation challenges. The object's middle slice is prompted with the 3D box's in-plane
  extent; each next slice inside the range with the previous slice's predicted box (:func:`next_box`),
  or the 3D box again when the previous slice came out empty. Nothing is predicted outside the range.
- ``box2d`` (:class:`Box2D`), one box on one slice and the range unknown (a user's quickest prompt): each
  next slice is prompted with the previous slice's predicted box, until the model says the object has
  ended (:class:`StopRule`: the model's predicted IoU, the overlap of consecutive masks, as micro-sam's
  ``iou_threshold``, or the mask's area against the prompted slice's), or the mask vanishes.

Boxes never grow from slice to slice beyond the margin: a next box is the previous mask's tight box
grown by ``margin`` pixels (defined in the model's input frame, as LiteMedSAM's 3 px at 256, and
converted to the slice's pixels by the caller), and never larger than the object's first box, so a
model that returns its box filled keeps that box slice after slice instead of widening it by the
margin each time.

Options shared by the protocols: the previous slice's low-resolution mask logits as a mask prompt
(micro-sam's ``projection: mask``) and keeping each object's largest 3D connected component
(MedSAM2's post-processing).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from segtune.data.prompts import mask_to_box
from segtune.data.slices import connected_components

#: The 3D prompt protocols by name (``volume_scoring.prompt``).
PromptProtocol = Literal["box3d", "box2d"]


@dataclass(frozen=True)
class SliceOutput:
    """The model's answer for one prompt on one slice.

    Args:
        mask: ``[H, W]`` bool mask at the slice's resolution.
        score: the model's predicted IoU of that mask.
        logits: its ``[s, s]`` low-resolution logits (what a mask prompt takes), when asked for.
    """

    mask: np.ndarray
    score: float = 1.0
    logits: torch.Tensor | None = None


class SlicePredictor(Protocol):
    """``predict(slice_indices, prompts, masks)`` -> one :class:`SliceOutput` per prompt; a prompt is an
    ``[4]`` box or ``[P, 3]`` points (``x, y, label``) on that slice, ``masks`` (optional) one
    low-resolution logit mask per prompt (``None`` for none) given as a mask prompt."""

    def __call__(
        self, indices: Sequence[int], prompts: Sequence[np.ndarray], masks: Sequence[torch.Tensor | None] | None = None
    ) -> list[SliceOutput]: ...


@dataclass(frozen=True)
class ObjectPrompt:
    """One object's prompt.

    Args:
        slice: the prompted slice.
        prompt: an ``[4]`` xyxy box or ``[P, 3]`` points (``x, y, label``) on that slice.
        slices: the object's first and last slice (``box3d``; the box is then its 3D box's in-plane
            extent); ``None`` when unknown.
    """

    slice: int
    prompt: np.ndarray
    slices: tuple[int, int] | None = None


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool; NaN and infinities are: each check says what it takes)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_fraction(value: Any) -> bool:
    """Whether ``value`` is a number in [0, 1] (NaN is not)."""
    return is_number(value) and 0 <= value <= 1


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite number."""
    return is_number(value) and math.isfinite(value)


def check_options(prefix: str, checks: Iterable[tuple[str, Any, bool, str]]) -> None:
    """Stop at the first failed check, before any work, in one line naming the option's config key.

    Args:
        prefix: the options' config key (``model.init_args.volume_scoring``).
        checks: ``(key, value, ok, need)`` each: ``<prefix>.<key> must be <need> (got <value>)`` unless ``ok``.

    Raises:
        ValueError: for the first check that is not ``ok``.
    """
    for key, value, ok, need in checks:
        if not ok:
            raise ValueError(f"{prefix}.{key} must be {need} (got {value!r})")


@dataclass(frozen=True)
class StopRule:
    """``box2d``: where an object ends when its slice range is unknown (``model.init_args.volume_scoring.stop``).
    A slice whose prediction fails the rule is not kept, and the object stops there in that direction.

    Args:
        min_score: the model's predicted IoU of the slice's mask must reach this.
        min_overlap: the IoU of the slice's mask with the previous slice's mask must reach this (micro-sam's
            ``iou_threshold``; an object that jumps elsewhere, or a mask that balloons, fails it).
        min_area: the slice's mask area as a fraction of the object's mask on its prompted slice must reach
            this (a mask that has shrunk to a speck; the untuned LiteMedSAM's masks past a hippocampus
            object's end keep a few pixels with a confident score and a steady overlap: docs/volumes.md).
    """

    min_score: float = 0.0
    min_overlap: float = 0.5
    min_area: float = 0.0

    def __post_init__(self) -> None:
        # set only as volume_scoring.stop (a checkpoint's chosen rule comes from STOP_GRID): named by that key
        check_options("model.init_args.volume_scoring.stop", (
            (key, value, is_fraction(value), "in [0, 1]") for key, value in vars(self).items()
        ))  # fmt: skip

    def __str__(self) -> str:
        return ", ".join(f"{key} {value}" for key, value in vars(self).items())

    def keeps(self, step: Step) -> bool:
        """Whether a propagated slice with what ``step`` measured is kept."""
        return step.score >= self.min_score and step.overlap >= self.min_overlap and step.area >= self.min_area


#: The stop rules ``box2d`` chooses among on the validation split (:func:`choose_stop`): the model's predicted
#: IoU x the overlap with the previous mask x the mask's area against the prompted slice's. Their loosest corner
#: bounds how far propagation runs while the choice is being made.
STOP_GRID: tuple[StopRule, ...] = tuple(
    StopRule(s, o, a)
    for a, s, o in itertools.product(
        (0.0, 0.1, 0.2), (0.0, 0.5, 0.6, 0.7, 0.8, 0.9), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    )
)
#: :func:`choose_stop`: rules whose mean validation Dice is within this of the best count as equally good, and
#: among them the one that predicts the fewest slices outside the objects' ranges is chosen. On 8 validation
#: (case, class) rows the best few rules differ by less than this; the untuned LiteMedSAM's best by Dice ran 4.6
#: slices past its hippocampus objects on validation where a rule 0.004 below it ran none (docs/volumes.md).
STOP_TOLERANCE = 0.01


@dataclass
class Step:
    """One predicted slice of one object: what the stop rule reads.

    Args:
        slice: the slice.
        direction: 0 for the prompted slice, +1 or -1 for the way propagation went.
        score: the model's predicted IoU.
        overlap: IoU of the mask with the previous slice's mask in that direction (1.0 on the prompted slice).
        area: the mask's area as a fraction of the prompted slice's mask (1.0 there).
    """

    slice: int
    direction: int
    score: float
    overlap: float
    area: float = 1.0


@dataclass
class Followed:
    """One followed object: its ``(S, H, W)`` bool prediction and every slice predicted, in the order of
    each direction (``box2d`` keeps slices past its stop here so that a stop rule can be chosen later:
    :meth:`truncated`)."""

    mask: np.ndarray
    steps: list[Step] = field(default_factory=list)
    full: np.ndarray | None = None  # box2d: every slice followed, before the stop rule cut it

    @property
    def followed(self) -> np.ndarray:
        """Every slice followed (``box2d``: before the stop rule cut them)."""
        return self.full if self.full is not None else self.mask

    def kept(self, rule: StopRule) -> list[Step]:
        """The steps ``rule`` keeps: the prompted slice, and each direction up to its first slice that fails."""
        stopped: set[int] = set()
        out = []
        for step in self.steps:
            if step.direction != 0 and (step.direction in stopped or not rule.keeps(step)):
                stopped.add(step.direction)
                continue
            out.append(step)
        return out

    def truncated(self, rule: StopRule) -> np.ndarray:
        """The prediction when the object stops, in each direction, at the first slice that fails ``rule``."""
        followed = self.followed
        out = np.zeros_like(followed)
        for step in self.kept(rule):
            out[step.slice] = followed[step.slice]
        return out


@dataclass(frozen=True)
class PropagationOptions:
    """What every protocol shares (set from ``model.init_args.volume_scoring``, whose values are checked there
    first: these checks, named by this class, stop only a caller that builds one itself).

    Args:
        margin: pixels (at the slice's resolution) a previous mask's box grows by each side.
        min_pixels: a prediction with fewer pixels is empty.
        mask_prompt: give the previous slice's low-resolution logits as a mask prompt with its box.
        largest_component: keep only each object's largest 26-connected component.
    """

    margin: float = 0.6
    min_pixels: int = 1
    mask_prompt: bool = False
    largest_component: bool = False

    def __post_init__(self) -> None:
        check_options("PropagationOptions", (
            ("margin", self.margin, is_finite(self.margin) and self.margin >= 0, "a finite number >= 0 (pixels)"),
            ("min_pixels", self.min_pixels, is_integer(self.min_pixels) and self.min_pixels >= 0, "an integer >= 0"),
            ("mask_prompt", self.mask_prompt, isinstance(self.mask_prompt, bool), "true or false"),
            ("largest_component", self.largest_component, isinstance(self.largest_component, bool), "true or false"),
        ))  # fmt: skip


def next_box(mask: np.ndarray, margin: float, limit: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The box that prompts the next slice: ``mask``'s tight box grown by ``margin`` each side, no wider or
    taller than ``limit`` (the object's first box; shrunk about its centre), inside an image of ``size``.

    The limit keeps margins from compounding: a model that fills its box would otherwise widen the box by
    the margin on every slice.
    """
    box = mask_to_box(mask) + np.array([-margin, -margin, margin, margin], np.float32)
    for lo, hi in ((0, 2), (1, 3)):
        most = float(limit[hi] - limit[lo])
        if box[hi] - box[lo] > most:
            centre = (box[lo] + box[hi]) / 2
            box[lo], box[hi] = centre - most / 2, centre + most / 2
    box[[0, 2]] = np.clip(box[[0, 2]], 0, size[1])
    box[[1, 3]] = np.clip(box[[1, 3]], 0, size[0])
    return box.astype(np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def slice_range(mask: np.ndarray) -> tuple[int, int]:
    """The first and last slice of a ``(S, H, W)`` object."""
    present = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    return int(present[0]), int(present[-1])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a ``(S, H, W)`` bool volume."""
    if not mask.any():
        return mask
    parts = connected_components(mask)
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    return parts == int(sizes.argmax())


@dataclass
class _Track:
    """One object going one way: where it is and what prompts its next slice."""

    index: int
    slice: int
    direction: int
    previous: np.ndarray
    logits: torch.Tensor | None


class BoxPropagation:
    """What ``box3d`` and ``box2d`` share: every object and direction advances one slice per model call
    (a call carries up to two prompts per object; each object's result is the same as alone).

    Args:
        options: what every protocol shares.
        stop: ``box2d``: the rule the returned masks are cut by.
        follow: ``box2d``: how far to follow (looser than or equal to ``stop``); slices past ``stop`` stay
            in each :class:`Followed`'s ``steps`` and ``full`` mask so that another rule can be read from them.
    """

    def __init__(
        self, options: PropagationOptions, stop: StopRule | None = None, follow: StopRule | None = None
    ) -> None:
        self.options = options
        self.stop = stop or StopRule()
        self.follow = follow or self.stop

    def __call__(self, predict: SlicePredictor, shape: tuple[int, int, int], objects: Sequence[ObjectPrompt]) -> list[
        Followed
    ]:  # fmt: skip
        followed = [Followed(np.zeros(shape, bool)) for _ in objects]
        if not objects:
            return followed
        size = (shape[1], shape[2])
        firsts = self._predict(predict, [o.slice for o in objects], [o.prompt for o in objects], [None] * len(objects))
        limits, starts, tracks, areas = [], [], [], []
        for i, (obj, first) in enumerate(zip(objects, firsts, strict=True)):
            present = first.mask.sum() >= self.options.min_pixels
            given = np.asarray(obj.prompt, np.float32)
            limits.append(given if given.ndim == 1 else self._points_limit(first.mask, size))
            starts.append(given if given.ndim == 1 else limits[-1])
            followed[i].steps.append(Step(obj.slice, 0, first.score, 1.0))
            areas.append(max(float(first.mask.sum()), 1.0))
            if present:
                followed[i].mask[obj.slice] = first.mask
            if present or self.keeps_empty(obj):
                tracks += [_Track(i, obj.slice + d, d, first.mask, first.logits) for d in (1, -1)]
        while tracks := [t for t in tracks if 0 <= t.slice < shape[0] and self.inside(objects[t.index], t.slice)]:
            boxes = [
                next_box(t.previous, self.options.margin, limits[t.index], size)
                if t.previous.sum() >= self.options.min_pixels
                else starts[t.index]  # the previous slice came out empty (box3d): the object's box again
                for t in tracks
            ]
            masks = [t.logits if self.options.mask_prompt else None for t in tracks]
            outs = self._predict(predict, [t.slice for t in tracks], boxes, masks)
            going = []
            for t, out in zip(tracks, outs, strict=True):
                step = Step(
                    t.slice, t.direction, out.score, mask_iou(out.mask, t.previous), out.mask.sum() / areas[t.index]
                )
                followed[t.index].steps.append(step)
                present = out.mask.sum() >= self.options.min_pixels
                if present:
                    followed[t.index].mask[t.slice] = out.mask
                if self.goes_on(objects[t.index], present, step):
                    going.append(_Track(t.index, t.slice + t.direction, t.direction, out.mask, out.logits))
            tracks = going
        for f in followed:
            self.finish(f)
            if self.options.largest_component:
                f.mask = largest_component(f.mask)
        return followed

    def _predict(
        self, predict: SlicePredictor, indices: list[int], prompts: list[np.ndarray], masks: list[torch.Tensor | None]
    ) -> list[SliceOutput]:
        """One call per kind of prompt (boxes, points): the predictor takes one kind at a time."""
        out: list[SliceOutput | None] = [None] * len(prompts)
        for ndim in sorted({np.asarray(p).ndim for p in prompts}):
            picked = [i for i, p in enumerate(prompts) if np.asarray(p).ndim == ndim]
            given = [masks[i] for i in picked]
            answers = predict([indices[i] for i in picked], [prompts[i] for i in picked],
                              given if any(m is not None for m in given) else None)  # fmt: skip
            for i, answer in zip(picked, answers, strict=True):
                out[i] = answer
        return out  # type: ignore[return-value]

    def _points_limit(self, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A point-prompted object's box limit: its first mask's box grown by the margin (the whole slice
        when the first mask is empty)."""
        if mask.sum() < self.options.min_pixels:
            return np.array([0, 0, size[1], size[0]], np.float32)
        return next_box(mask, self.options.margin, np.array([0, 0, size[1], size[0]], np.float32), size)

    # --- what differs between the protocols ---------------------------------------------------------
    def inside(self, obj: ObjectPrompt, k: int) -> bool:
        """Whether slice ``k`` may be predicted for ``obj``."""
        return True

    def keeps_empty(self, obj: ObjectPrompt) -> bool:
        """Whether an empty prediction on the prompted slice still propagates."""
        return False

    def goes_on(self, obj: ObjectPrompt, present: bool, step: Step) -> bool:
        """Whether the object goes on past this slice."""
        return present

    def finish(self, followed: Followed) -> None:
        """Anything done to an object's prediction once it is followed."""


class Box3D(BoxPropagation):
    """``box3d``: the slice range known; every slice of it is predicted, none outside it."""

    def inside(self, obj: ObjectPrompt, k: int) -> bool:
        if obj.slices is None:
            raise ValueError("box3d needs each object's slice range (ObjectPrompt.slices)")
        return obj.slices[0] <= k <= obj.slices[1]

    def keeps_empty(self, obj: ObjectPrompt) -> bool:
        return True

    def goes_on(self, obj: ObjectPrompt, present: bool, step: Step) -> bool:
        return True  # an empty slice inside the range: the next one gets the object's box again


class Box2D(BoxPropagation):
    """``box2d``: the range unknown; an object goes on while its slices pass ``follow`` (the loosest rule
    that may be chosen), and its prediction is cut at the first slice that fails ``stop``."""

    def goes_on(self, obj: ObjectPrompt, present: bool, step: Step) -> bool:
        return present and self.follow.keeps(step)

    def finish(self, followed: Followed) -> None:
        followed.full = followed.mask
        followed.mask = followed.truncated(self.stop)


def loosest(rules: Sequence[StopRule]) -> StopRule:
    """The rule that keeps every slice any of ``rules`` keeps."""
    return StopRule(*(min(getattr(r, key) for r in rules) for key in ("min_score", "min_overlap", "min_area")))


def stop_counts(followed: Followed, target: np.ndarray) -> dict[StopRule, tuple[float, float, float]]:
    """What ``followed`` adds to its class's row under each :data:`STOP_GRID` rule: (voxels inside ``target``,
    predicted voxels, slices predicted outside ``target``'s slice range). Counted per slice once, then summed per
    rule (no mask is copied)."""
    full = followed.followed
    first, last = slice_range(target) if target.any() else (0, -1)
    counted = {s.slice: (float(np.logical_and(full[s.slice], target[s.slice]).sum()), float(full[s.slice].sum()),
                         float(full[s.slice].any() and not first <= s.slice <= last))
               for s in followed.steps}  # fmt: skip
    out = {}
    for rule in STOP_GRID:
        kept = [counted[step.slice] for step in followed.kept(rule)]
        out[rule] = (sum(c[0] for c in kept), sum(c[1] for c in kept), sum(c[2] for c in kept))
    return out


def choose_stop(
    rows: Sequence[dict[StopRule, tuple[float, ...]]], targets: Sequence[float], tolerance: float = STOP_TOLERANCE
) -> StopRule:
    """The :data:`STOP_GRID` rule chosen on validation (case, class) rows: among the rules whose mean Dice is
    within ``tolerance`` of the best, the one with the fewest slices predicted outside the objects' ranges on
    average; then the higher Dice; then the earlier rule of the grid (the looser one).

    Dice alone cannot tell apart rules that differ by a few small masks past an object's end (each costs little
    Dice), so a Dice-only choice lets a model run slices past its objects that a rule as good by Dice would stop.

    Args:
        rows: per (case, class), each rule's (intersection, predicted voxels[, slices outside the range]) summed
            over the class's objects (:func:`stop_counts`); without the third value, Dice alone decides.
        targets: per row, the class's ground-truth voxels.
        tolerance: mean Dice within which rules count as equally good.
    """
    scored = []
    for order, rule in enumerate(STOP_GRID):
        dice = [2 * row[rule][0] / (row[rule][1] + t) if row[rule][1] + t else 1.0
                for row, t in zip(rows, targets, strict=True)]  # fmt: skip
        outside = [row[rule][2] if len(row[rule]) > 2 else 0.0 for row in rows]
        scored.append((float(np.mean(dice)) if dice else 0.0, float(np.mean(outside)) if outside else 0.0, order))
    best = max(dice for dice, _, _ in scored)
    near = [entry for entry in scored if entry[0] >= best - tolerance - 1e-12]
    _, _, order = min(near, key=lambda entry: (entry[1], -round(entry[0], 12), entry[2]))
    return STOP_GRID[order]


#: ``volume_scoring.prompt`` -> its protocol.
PROTOCOLS: dict[str, type[BoxPropagation]] = {"box3d": Box3D, "box2d": Box2D}
