"""One object's prompt on one slice with a box and points together, and the slice predictor of one object's
propagation that gives them.

A :class:`~segtune.propagation.SlicePredictor` takes an ``[4]`` box or ``[P, 3]`` points per prompt; a user
correcting a mask gives both for one object (a box, then positive and negative clicks where the mask is
wrong), as the 2D objects json of :mod:`segtune.data.boxes` does. :class:`SlicePrompt` is that prompt, and
:func:`segtune.volume_scoring.slice_predictor` takes it beside the bare arrays.

The protocols of :mod:`segtune.propagation` prompt each slice with a box. :class:`ObjectPredictor` stands
between a protocol following one object and the slice predictor: on every slice that holds points for the
object it adds them to the protocol's box, on the slice propagation starts from it can give another box and
the previous low-resolution logits as the mask prompt, and it keeps the box and logits each slice was last
predicted with (what the next click round on that slice starts from: :mod:`segtune.volume_clicks`). numpy
and torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from segtune.propagation import SliceOutput, SlicePredictor


@dataclass(frozen=True)
class SlicePrompt:
    """One object's prompt on one slice: a box, points, or both (one mask from them together).

    Args:
        box: ``[4]`` xyxy box in the slice's pixels, or ``None``.
        points: ``[P, 3]`` points ``(x, y, label)`` (label 1 positive, 0 negative) in the slice's pixels, or
            ``None``.
    """

    box: np.ndarray | None = None
    points: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.box is None and self.points is None:
            raise ValueError("a slice prompt needs a box, points or both")
        if self.box is not None and np.shape(self.box) != (4,):
            raise ValueError(f"a slice prompt's box is [x0, y0, x1, y1], got shape {np.shape(self.box)}")
        if self.points is not None and (np.ndim(self.points) != 2 or np.shape(self.points)[1] != 3):
            raise ValueError(f"a slice prompt's points are [P, 3] (x, y, label), got shape {np.shape(self.points)}")

    @classmethod
    def of(cls, prompt: np.ndarray | SlicePrompt) -> SlicePrompt:
        """``prompt`` as a :class:`SlicePrompt`: an ``[4]`` array is a box, an ``[P, 3]`` array points."""
        if isinstance(prompt, SlicePrompt):
            return prompt
        given = np.asarray(prompt, np.float32)
        return cls(box=given) if given.ndim == 1 else cls(points=given)

    @property
    def kind(self) -> tuple[bool, bool]:
        """(has a box, has points): prompts of one model call are of one kind (one batch holds one kind)."""
        return self.box is not None, self.points is not None


def predict_by_kind(
    predict: SlicePredictor,
    indices: Sequence[int],
    prompts: Sequence[np.ndarray | SlicePrompt],
    masks: Sequence[torch.Tensor | None] | None = None,
) -> list[SliceOutput]:
    """``predict`` called once per kind of prompt among ``prompts`` (box, points, box with points), the
    answers back in the prompts' order; ``masks`` (one per prompt, ``None`` for none) go with their prompts."""
    given = [SlicePrompt.of(p) for p in prompts]
    out: list[SliceOutput | None] = [None] * len(given)
    for kind in sorted({p.kind for p in given}):
        picked = [i for i, p in enumerate(given) if p.kind == kind]
        chosen = [masks[i] for i in picked] if masks is not None else []
        answers = predict([indices[i] for i in picked], [given[i] for i in picked],  # type: ignore[misc]
                          chosen if any(m is not None for m in chosen) else None)  # fmt: skip
        for i, answer in zip(picked, answers, strict=True):
            out[i] = answer
    return out  # type: ignore[return-value]


class ObjectPredictor:
    """The slice predictor of one object's propagation: its points join the protocol's box on their slices,
    the start slice may get its own box and mask prompt, and each slice's box and logits are kept.

    Args:
        predict: the volume's slice predictor.
        points: ``{slice: [P, 3] points}``: every prompt on such a slice is that box with those points.
        start: the slice propagation starts from (the protocol predicts it first, once), or ``None``.
        start_box: the box of the start slice instead of the one the protocol gives (``None``: the protocol's).
        start_mask: low-resolution logits given as the start slice's mask prompt (``None``: none).
    """

    def __init__(
        self,
        predict: SlicePredictor,
        points: Mapping[int, np.ndarray] | None = None,
        start: int | None = None,
        start_box: np.ndarray | None = None,
        start_mask: torch.Tensor | None = None,
    ) -> None:
        self.predict = predict
        self.points = dict(points or {})
        self.start, self.start_box, self.start_mask = start, start_box, start_mask
        #: the box each slice was last prompted with, and the logits of its answer
        self.boxes: dict[int, np.ndarray] = {}
        self.logits: dict[int, torch.Tensor | None] = {}

    def __call__(
        self,
        indices: Sequence[int],
        prompts: Sequence[np.ndarray | SlicePrompt],
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> list[SliceOutput]:
        given: list[SlicePrompt] = []
        inputs = list(masks) if masks is not None else [None] * len(prompts)
        for i, (k, prompt) in enumerate(zip(indices, prompts, strict=True)):
            asked = SlicePrompt.of(prompt)
            box, points = asked.box, asked.points
            if int(k) == self.start:
                box = self.start_box if self.start_box is not None else box
                inputs[i] = self.start_mask if self.start_mask is not None else inputs[i]
            if int(k) in self.points:  # the slice's own points after any the protocol gives
                extra = np.asarray(self.points[int(k)], np.float32).reshape(-1, 3)
                points = extra if points is None else np.concatenate([points, extra])
            given.append(SlicePrompt(box, points))
        out = predict_by_kind(self.predict, indices, given, inputs)
        for k, prompt, answer in zip(indices, given, out, strict=True):
            if prompt.box is not None:
                self.boxes[int(k)] = np.asarray(prompt.box, np.float32)
            self.logits[int(k)] = answer.logits
        return out
