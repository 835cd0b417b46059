"""Post-processing and scoring: model output -> masks at the original resolution -> per-instance scores.

The one place that chooses a mask among several per prompt, brings it back to the image's
original resolution and scores each instance (Dice, IoU and the filled-box floor). Metrics,
the test report, the validation pictures and the prediction writer all consume what this module
returns; nothing here knows about Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from segtune.preprocessing import Preprocessing


@dataclass
class ImagePrediction:
    """The predicted instances of one image, one per real (non-padding) prompt.

    Args:
        masks: ``[N, H, W]`` bool masks at the image's original resolution.
        scores: ``[N]`` the model's predicted IoU of each mask.
        classes: ``[N]`` class index of each mask when the batch's prompts do not give it
            (automatic mask generation: -1, no class); ``None``: the prompts' classes.
    """

    masks: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor | None = None


#: How an instance whose ground truth and prediction are both empty counts: ``"one"`` scores it 1.0
#: (a correct "nothing here"), ``"exclude"`` leaves it out of every mean (scored NaN; nnU-Net's
#: convention). A non-empty prediction on an empty ground truth scores 0 either way.
EmptyTarget = Literal["one", "exclude"]


@dataclass
class InstanceScores:
    """``[N]`` per-instance scores of one image, each computed once. An instance excluded by
    ``empty_target="exclude"`` scores NaN, which the metrics and reports leave out of their means.

    Args:
        dice: Dice of the predicted mask against the ground truth.
        iou: IoU of the predicted mask against the ground truth.
        box_dice: Dice of the filled box prompt (the floor a model must beat).
        box_iou: IoU of the filled box prompt.
        extra: more ``[N]`` scores by name: the click curve's (:func:`segtune.click_scores.curve_scores`)
            when the evaluation runs click rounds; empty otherwise.
    """

    dice: torch.Tensor
    iou: torch.Tensor
    box_dice: torch.Tensor
    box_iou: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The scores by metric name (``dice``, ``iou``, ``box_dice``, ``box_iou``, then :attr:`extra`'s)."""
        return {"dice": self.dice, "iou": self.iou, "box_dice": self.box_dice, "box_iou": self.box_iou, **self.extra}


def best_masks(pred_masks: torch.Tensor, iou_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the ``M`` masks per prompt, the one with the highest predicted IoU.

    Args:
        pred_masks: ``[B, N, M, h, w]`` low-resolution logits.
        iou_scores: ``[B, N, M]`` predicted IoU.

    Returns:
        ``[B, N, h, w]`` logits and ``[B, N]`` scores.
    """
    scores, best = iou_scores.max(dim=2)
    index = best[:, :, None, None, None].expand(-1, -1, 1, *pred_masks.shape[-2:])
    return pred_masks.gather(2, index)[:, :, 0], scores


def logits_to_original(
    logits: torch.Tensor, pre: Preprocessing, resized: tuple[int, int], original: tuple[int, int]
) -> torch.Tensor:
    """Low-resolution logits ``[N, s, s]`` -> logits ``[N, H, W]`` at the image's original resolution.

    Upsample to the model input, crop the padding away, then resize to the original image, as
    transformers' ``post_process_masks`` does.
    """
    x = F.interpolate(
        logits[:, None].float(), size=(pre.image_size, pre.image_size), mode="bilinear", align_corners=False
    )
    x = x[..., : resized[0], : resized[1]]
    x = F.interpolate(x, size=tuple(original), mode="bilinear", align_corners=False)
    return x[:, 0]


def predictions(out: Any, batch: dict[str, Any], pre: Preprocessing) -> list[ImagePrediction]:
    """The model's output for a batch as thresholded masks at each image's original resolution.

    Args:
        out: the model output (``pred_masks`` ``[B, N, M, h, w]`` and ``iou_scores`` ``[B, N, M]``).
        batch: the batch (``prompt_valid``, ``reshaped_sizes``, ``original_sizes``).
        pre: the model's preprocessing.

    Returns:
        One :class:`ImagePrediction` per image; its instances are the image's real prompts, in order.
    """
    logits, scores = best_masks(out.pred_masks, out.iou_scores)
    counts = batch["prompt_valid"].sum(dim=1).tolist()  # padding prompts always come last
    result = []
    for i, n in enumerate(counts):
        resized = (int(batch["reshaped_sizes"][i, 0]), int(batch["reshaped_sizes"][i, 1]))
        original = (int(batch["original_sizes"][i, 0]), int(batch["original_sizes"][i, 1]))
        masks = logits_to_original(logits[i, :n], pre, resized, original) > 0
        result.append(ImagePrediction(masks=masks, scores=scores[i, :n].float()))
    return result


def filled_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, 4]`` xyxy boxes -> ``[N, H, W]`` bool masks of the filled boxes (the box floor)."""
    h, w = size
    ys = torch.arange(h, device=boxes.device)[None, :, None]
    xs = torch.arange(w, device=boxes.device)[None, None, :]
    b = boxes.round().long()
    return (
        (xs >= b[:, 0, None, None])
        & (xs < b[:, 2, None, None])
        & (ys >= b[:, 1, None, None])
        & (ys < b[:, 3, None, None])
    )


def overlap(
    preds: torch.Tensor, target: torch.Tensor, kind: Literal["dice", "iou"], empty_target: EmptyTarget = "exclude"
) -> torch.Tensor:
    """Dice or IoU of each instance: ``[N, H, W]`` bool masks -> ``[N]`` scores.

    Counted on the bool masks directly (intersection and the two areas, one pass each): the same
    numbers as torchmetrics' ``dice_score`` / ``mean_iou`` on one-hot masks, which first copy every
    mask to int64 and cost several times more at full resolution (measured by
    ``benchmarks/epoch_speed.py``). An instance whose prediction and ground truth are both empty
    scores 1.0 (``empty_target="one"``) or NaN (``"exclude"``: left out of the means).

    Raises:
        TypeError: for float masks, which would be miscounted.
    """
    if preds.dtype != torch.bool or target.dtype != torch.bool:
        raise TypeError("instance scores take bool masks: threshold predictions first")
    if preds.shape[0] == 0:
        return torch.zeros(0, device=preds.device)
    inter = (preds & target).flatten(1).sum(1, dtype=torch.float64)
    areas = preds.flatten(1).sum(1, dtype=torch.float64) + target.flatten(1).sum(1, dtype=torch.float64)
    score = 2 * inter / areas if kind == "dice" else inter / (areas - inter)
    both_empty = areas == 0
    return torch.where(both_empty, 1.0 if empty_target == "one" else float("nan"), score).float()


def score_instances(
    preds: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor, empty_target: EmptyTarget = "exclude"
) -> InstanceScores:
    """Score one image's instances once: Dice, IoU, and the Dice and IoU of the filled box prompts.

    Args:
        preds: ``[N, H, W]`` bool predicted masks at the original resolution.
        target: ``[N, H, W]`` bool ground truth.
        boxes: ``[N, 4]`` xyxy box of each instance in the original image (the floor's boxes).
        empty_target: how an instance whose ground truth and prediction are both empty counts
            (:data:`EmptyTarget`).
    """
    floor = filled_boxes(boxes, tuple(target.shape[-2:]))
    return InstanceScores(
        dice=overlap(preds, target, "dice", empty_target),
        iou=overlap(preds, target, "iou", empty_target),
        box_dice=overlap(floor, target, "dice", empty_target),
        box_iou=overlap(floor, target, "iou", empty_target),
    )


def score_batch(
    preds: list[ImagePrediction], batch: dict[str, Any], empty_target: EmptyTarget = "exclude"
) -> list[InstanceScores]:
    """:func:`score_instances` for every image of an evaluation batch (which has ground truth)."""
    return [
        score_instances(p.masks, batch["masks"][i], batch["boxes"][i, : len(p.masks)], empty_target)
        for i, p in enumerate(preds)
    ]
