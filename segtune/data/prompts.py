"""Prompts made from ground-truth masks: boxes with jitter, positive and negative points."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from segtune.clicks import CLICK_RULES, ClickRule


@dataclass(frozen=True)
class ClickTraining:
    """Training with corrective clicks (micro-sam's and SAM-Med2D's recipe; :mod:`segtune.click_training`).

    Each training step draws a round ``r`` uniformly from 0 to ``rounds``; the model's own predictions,
    without gradient, get ``r`` simulated clicks one round after another (each round the first prompt,
    every click so far and, with ``mask_input``, the previous mask logits); the loss is taken on round
    ``r``'s prompts alone (round 0: the first prompt, as without clicks).

    Args:
        rounds: the most click rounds a step simulates (0: off, as before).
        rule: where a click goes (:data:`segtune.clicks.ClickRule`): ``"random"`` error pixel (micro-sam,
            SAM-Med2D) or ``"center"`` of the largest error region.
        mask_input: feed the previous round's mask logits back as the mask prompt.
    """

    rounds: int = 0
    rule: ClickRule = "random"
    mask_input: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"data.init_args.prompts.clicks.rounds must be an integer >= 0, got {self.rounds!r}")
        if self.rule not in CLICK_RULES:
            raise ValueError(
                f"data.init_args.prompts.clicks.rule must be one of {', '.join(CLICK_RULES)}, got {self.rule!r}"
            )


@dataclass(frozen=True)
class PromptConfig:
    """What prompt each instance gets.

    Args:
        kind: ``"box"``, ``"points"``, or ``"box+points"``.
        box_jitter: largest shift of each box side during training (0 disables). Validation and
            test boxes are never jittered.
        jitter_unit: ``"fraction"``: ``box_jitter`` is a fraction of the box's width or height;
            ``"pixels"``: it is in pixels of the original image (MedSAM used up to 20 px).
        positive_points: points sampled inside the mask.
        negative_points: points sampled outside the mask, inside the box grown by 10 %.
        max_instances: prompts per image in a training step (instances are sampled); validation and
            test use every instance.
        clicks: training with corrective click rounds (:class:`ClickTraining`; ``rounds: 0``: off).
    """

    kind: Literal["box", "points", "box+points"] = "box"
    box_jitter: float = 0.05
    jitter_unit: Literal["fraction", "pixels"] = "fraction"
    positive_points: int = 1
    negative_points: int = 0
    max_instances: int = 8
    clicks: ClickTraining = ClickTraining()

    def __post_init__(self) -> None:
        # each of these would train without a word: no prompt at all, or no jitter where some was asked for
        checks = (
            ("max_instances", self.max_instances >= 1, ">= 1 (0 gives no prompt: the loss would be 0 every step)"),
            ("box_jitter", self.box_jitter >= 0 and math.isfinite(self.box_jitter), ">= 0 (0 disables it)"),
            ("positive_points", self.positive_points >= 0, ">= 0"),
            ("negative_points", self.negative_points >= 0, ">= 0"),
        )
        for key, ok, need in checks:
            if not ok:
                raise ValueError(f"data.init_args.prompts.{key} must be {need}, got {getattr(self, key)}")
        if self.uses_points and self.positive_points + self.negative_points == 0:
            raise ValueError(
                f"data.init_args.prompts: kind {self.kind!r} with positive_points and negative_points 0 gives "
                "no point: set positive_points: 1 or more"
            )

    @property
    def uses_boxes(self) -> bool:
        return self.kind in ("box", "box+points")

    @property
    def uses_points(self) -> bool:
        return self.kind in ("points", "box+points")


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight ``xyxy`` box of a ``[H, W]`` mask; the far edges are exclusive (pixel ``x1 - 1`` is inside)."""
    # any() along each axis reads the mask once, several times faster than np.nonzero
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def jitter_box(
    box: np.ndarray,
    amount: float,
    size: tuple[int, int],
    rng: np.random.Generator,
    unit: Literal["fraction", "pixels"] = "fraction",
) -> np.ndarray:
    """Move each side of ``box`` by up to ``amount`` (a fraction of the box size, or pixels), inside the image."""
    if amount <= 0:
        return box
    w, h = box[2] - box[0], box[3] - box[1]
    scale = np.array([w, h, w, h]) if unit == "fraction" else np.ones(4)
    noise = rng.uniform(-amount, amount, size=4) * scale
    out = box + noise
    out[[0, 2]] = np.clip(out[[0, 2]], 0, size[1])
    out[[1, 3]] = np.clip(out[[1, 3]], 0, size[0])
    if out[2] - out[0] < 1 or out[3] - out[1] < 1:
        return box
    return out.astype(np.float32)


def sample_points(
    mask: np.ndarray, box: np.ndarray, positive: int, negative: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``positive`` points inside ``mask`` and ``negative`` outside it near the box.

    Args:
        mask: ``[H, W]`` bool instance mask.
        box: the mask's tight box (:func:`mask_to_box`); positives are searched inside it only.
        positive: points inside the mask.
        negative: points outside the mask, inside the box grown by 10 %.
        rng: the sample's generator.

    Returns:
        ``[P, 2]`` xy points (pixel centres) and ``[P]`` labels (1 inside, 0 outside).
    """
    bx0, by0, bx1, by1 = (int(v) for v in box)  # the tight box: every mask pixel lies inside it
    ys, xs = np.nonzero(mask[by0:by1, bx0:bx1])
    pick = rng.integers(0, len(xs), size=positive)
    points = [np.stack([xs[pick] + bx0, ys[pick] + by0], axis=1)]
    labels = [np.ones(positive, dtype=np.int64)]
    if negative:
        h, w = mask.shape
        bw, bh = box[2] - box[0], box[3] - box[1]
        x0, x1 = int(max(0, box[0] - 0.1 * bw)), int(min(w, box[2] + 0.1 * bw))
        y0, y1 = int(max(0, box[1] - 0.1 * bh)), int(min(h, box[3] + 0.1 * bh))
        ny, nx = np.nonzero(~mask[y0:y1, x0:x1])
        if len(nx) == 0:  # the mask fills its surroundings: fall back to anywhere outside it
            ny, nx = np.nonzero(~mask)
            y0 = x0 = 0
        pick = rng.integers(0, len(nx), size=negative) if len(nx) else np.zeros(negative, dtype=int)
        neg = np.stack([nx[pick] + x0, ny[pick] + y0], axis=1) if len(nx) else np.zeros((negative, 2))
        points.append(neg)
        labels.append(np.zeros(negative, dtype=np.int64))
    return np.concatenate(points).astype(np.float32) + 0.5, np.concatenate(labels)
