"""Corrective click rounds on an evaluation batch: the model is scored as people use it, a first prompt
and then clicks where the mask is wrong.

Each instance starts from its first prompt (its box, or its point prompts) and the mask the model gave
for it. Each round places one click on that instance's current mask (:func:`segtune.clicks.next_click`,
at the image's original resolution) and calls the model again with the first prompt, every click so
far and the previous round's low-resolution mask logits as the mask input (SAM's ``input_masks``; the
logits of the mask evaluation keeps, as SAM's own predictor feeds them back). The image encoder runs
once per image: the rounds re-run only the prompt encoder and the mask decoder, from
:meth:`~segtune.methods.base.SegmentationModule.encode`'s output.

SAM's mask input is one dense input per image, not per prompt, so each instance's round runs as its own
one-prompt image (on the same encoder output), as the volumes' mask prompts do. An instance whose mask
equals its ground truth gets no click and keeps its mask; its curve stays flat from there. No Lightning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segtune.clicks import CLICK_RULES, ClickRule, next_click
from segtune.postprocess import EmptyTarget, ImagePrediction, best_masks, overlap, predictions
from segtune.preprocessing import scale_coords

log = logging.getLogger(__name__)

#: One-prompt images decoded per model call in a round: bounds the repeated encoder output
#: (SAM ViT: 4 MiB an image) for images with many instances.
ROUND_BATCH = 16
_TOLD: set[str] = set()  # models already said to take no mask input (said once per run)


@dataclass(frozen=True)
class ClickScoring:
    """How ``model.init_args.clicks`` rounds are simulated.

    Args:
        rule: where the next click goes: ``"center"``: the centre of the largest connected error region
            (RITM's and the CVPR 2025 interactive challenge's evaluation); ``"random"``: a random error pixel.
        mask_input: feed the previous round's mask logits back as the mask prompt (SAM's interactive
            loop); ``false``: the first prompt and the clicks alone.
        seed: seeds each instance's tie-breaking (and ``"random"``'s draws) with its image id and index,
            so the same instance gets the same clicks in any batch and on the untuned model.
    """

    rule: ClickRule = "center"
    mask_input: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in CLICK_RULES:
            raise ValueError(
                f"model.init_args.click_scoring.rule must be one of {', '.join(CLICK_RULES)}, got {self.rule!r}"
            )
        if not isinstance(self.mask_input, bool):
            raise ValueError(f"model.init_args.click_scoring.mask_input must be true or false, got {self.mask_input!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"model.init_args.click_scoring.seed must be an integer >= 0, got {self.seed!r}")


@dataclass
class ClickCurves:
    """The scores of one image's instances after the first prompt (column 0) and after each click.

    Args:
        dice: ``[N, R + 1]`` Dice (NaN where ``empty_target: exclude`` leaves an instance out).
        iou: ``[N, R + 1]`` IoU.
        clicks: for each instance, the clicks it got: ``(x, y, positive)`` in the original image's pixels.
    """

    dice: torch.Tensor
    iou: torch.Tensor
    clicks: list[list[tuple[float, float, bool]]]


def click_curves(
    module: Any,
    batch: dict[str, Any],
    encoded: list[torch.Tensor],
    first_out: Any,
    first: list[ImagePrediction],
    rounds: int,
    options: ClickScoring,
    empty_target: EmptyTarget = "exclude",
) -> list[ClickCurves]:
    """Run ``rounds`` click rounds on every real prompt of an evaluation batch.

    Args:
        module: the :class:`~segtune.methods.base.SegmentationModule` (its ``forward_encoded``,
            ``preprocessing``, ``sanitise``), or a stand-in with the same.
        batch: the evaluation batch (with ground truth ``masks``).
        encoded: the module's :meth:`encode` output for ``batch``.
        first_out: the model's output for the batch's own prompts (``pred_masks``, ``iou_scores``).
        first: :func:`~segtune.postprocess.predictions` of ``first_out``.
        rounds: clicks per instance.
        options: the click rule, mask input and seed.
        empty_target: as the evaluation scores instances (:data:`~segtune.postprocess.EmptyTarget`).

    Returns:
        One :class:`ClickCurves` per image.
    """
    logits, _ = best_masks(first_out.pred_masks, first_out.iou_scores)
    # every real prompt as (image, slot): padding prompts come last in each image
    where = [(i, j) for i, p in enumerate(first) for j in range(len(p.masks))]
    targets = [batch["masks"][i][j] for i, j in where]
    masks = [first[i].masks[j] for i, j in where]
    previous = [logits[i, j] for i, j in where]
    clicks: list[list[tuple[float, float, bool]]] = [[] for _ in where]
    rngs = [np.random.default_rng([options.seed, int(batch["image_ids"][i]), j]) for i, j in where]
    dice = torch.full((len(where), rounds + 1), float("nan"))
    iou = torch.full_like(dice, float("nan"))

    def score(k: int, column: int) -> None:
        pred, target = masks[k][None].cpu(), targets[k][None].cpu()
        dice[k, column] = overlap(pred, target, "dice", empty_target)[0]
        iou[k, column] = overlap(pred, target, "iou", empty_target)[0]

    for k in range(len(where)):
        score(k, 0)
    mask_input = options.mask_input and "input_masks" in module.sanitise.allowed
    if options.mask_input and not mask_input and module.sanitise.model_name not in _TOLD:
        _TOLD.add(module.sanitise.model_name)
        log.info("%s.forward takes no input_masks: click rounds give it the first prompt and the clicks alone",
                 module.sanitise.model_name)  # fmt: skip
    active = list(range(len(where)))
    for r in range(1, rounds + 1):
        still = []
        for k in active:
            click = next_click(masks[k].cpu().numpy(), targets[k].cpu().numpy(), rngs[k], options.rule)
            if click is not None:  # a perfect mask gets no click: it stays as it is
                clicks[k].append((*click.xy(), click.positive))
                still.append(k)
        active = still
        changed = set(active)
        for start in range(0, len(active), ROUND_BATCH):
            chunk = active[start : start + ROUND_BATCH]
            sub = _round_batch(batch, [where[k] for k in chunk], [clicks[k] for k in chunk])
            if mask_input:
                sub["input_masks"] = torch.stack([previous[k] for k in chunk])[:, None]
            images = torch.tensor([where[k][0] for k in chunk], device=encoded[0].device)
            out = module.forward_encoded(sub, [level[images] for level in encoded])
            chosen, _ = best_masks(out.pred_masks, out.iou_scores)
            for row, (k, predicted) in enumerate(zip(chunk, predictions(out, sub, module.preprocessing), strict=True)):
                masks[k], previous[k] = predicted.masks[0], chosen[row, 0]
        for k in range(len(where)):
            if k in changed:
                score(k, r)
            else:  # no click, the same mask: the same scores
                dice[k, r], iou[k, r] = dice[k, r - 1], iou[k, r - 1]
    out_curves, k = [], 0
    for p in first:
        n = len(p.masks)
        out_curves.append(ClickCurves(dice[k : k + n], iou[k : k + n], clicks[k : k + n]))
        k += n
    return out_curves


def _round_batch(
    batch: dict[str, Any], where: list[tuple[int, int]], clicks: list[list[tuple[float, float, bool]]]
) -> dict[str, Any]:
    """A batch of one-prompt images: each instance's first prompt and its clicks (model frame)."""
    images = [i for i, _ in where]
    rows, slots = torch.tensor(images), torch.tensor([j for _, j in where])
    device = batch["reshaped_sizes"].device
    sub: dict[str, Any] = {
        "prompt_valid": torch.ones(len(where), 1, dtype=torch.bool, device=device),
        "reshaped_sizes": batch["reshaped_sizes"][rows],
        "original_sizes": batch["original_sizes"][rows],
    }
    if "input_boxes" in batch:
        sub["input_boxes"] = batch["input_boxes"][rows, slots][:, None]
    points, labels = [], []
    for (i, _), given in zip(where, clicks, strict=True):
        original = (int(batch["original_sizes"][i, 0]), int(batch["original_sizes"][i, 1]))
        resized = (int(batch["reshaped_sizes"][i, 0]), int(batch["reshaped_sizes"][i, 1]))
        xy = torch.tensor([[x, y] for x, y, _ in given], dtype=torch.float32)
        points.append(scale_coords(xy, original, resized))
        labels.append(torch.tensor([int(positive) for _, _, positive in given], dtype=torch.long))
    clicked = torch.stack(points).to(device)
    clicked_labels = torch.stack(labels).to(device)
    if "input_points" in batch:  # the first prompt's points come first, the clicks after them
        clicked = torch.cat([batch["input_points"][rows, slots].float(), clicked], dim=1)
        clicked_labels = torch.cat([batch["input_labels"][rows, slots].long(), clicked_labels], dim=1)
    sub["input_points"], sub["input_labels"] = clicked[:, None], clicked_labels[:, None]
    return sub
