"""Dice and IoU per instance, at the image's original resolution, overall and per class.

torchmetrics scores each instance (``dice_score`` / ``mean_iou`` with one instance per sample) and
syncs the sums across processes. An instance whose ground truth and prediction are both empty
scores 1 (correct): torchmetrics returns NaN (Dice) or -1 (IoU) there, so no NaN can reach a log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.functional.segmentation import dice_score, mean_iou


def instance_scores(preds: torch.Tensor, target: torch.Tensor, kind: Literal["dice", "iou"]) -> torch.Tensor:
    """Dice or IoU of each instance: ``[N, H, W]`` bool masks -> ``[N]`` scores (both empty: 1).

    Raises:
        TypeError: for float masks, which torchmetrics would silently miscount.
    """
    if preds.dtype != torch.bool or target.dtype != torch.bool:
        raise TypeError("instance scores take bool masks: threshold predictions first")
    if preds.shape[0] == 0:
        return torch.zeros(0, device=preds.device)
    # One instance per sample, one "class" in one-hot layout: [N, 1, H, W].
    p, t = preds[:, None].long(), target[:, None].long()
    if kind == "dice":
        score = dice_score(p, t, num_classes=1, include_background=True, average="none", input_format="one-hot")
    else:
        score = mean_iou(p, t, num_classes=1, include_background=True, per_class=True, input_format="one-hot")
    both_empty = ~(preds.flatten(1).any(1) | target.flatten(1).any(1))
    return torch.where(both_empty, 1.0, score[:, 0].float())


class InstanceOverlap(Metric):
    """Mean per-instance Dice or IoU of binary masks, overall and for each class.

    ``compute`` returns ``{"<kind>": overall}`` plus ``{"<kind>/<class>": score}`` for each class
    that had instances, so a ``MetricCollection`` prefix gives ``val_dice``, ``val_dice/<class>``.

    Args:
        kind: ``"dice"`` (``2TP / (2TP + FP + FN)``) or ``"iou"`` (``TP / (TP + FP + FN)``).
        class_names: class index ``i`` is reported as ``class_names[i]``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, kind: Literal["dice", "iou"], class_names: Sequence[str]) -> None:
        super().__init__()
        self.kind = kind
        self.class_names = list(class_names)
        n = max(1, len(self.class_names))
        self.add_state("score_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, classes: torch.Tensor) -> None:
        """Add instances.

        Args:
            preds: ``[N, H, W]`` bool predicted masks (threshold logits before calling).
            target: ``[N, H, W]`` bool ground truth.
            classes: ``[N]`` class indices.
        """
        if preds.shape[0] == 0:
            return
        score = instance_scores(preds, target, self.kind).double()
        classes = classes.clamp(min=0).to(self.score_sum.device)
        self.score_sum.index_add_(0, classes, score)
        self.count.index_add_(0, classes, torch.ones_like(score))

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.count.sum()
        out = {self.kind: (self.score_sum.sum() / total if total > 0 else total).float()}
        if len(self.class_names) > 1:
            for i, name in enumerate(self.class_names):
                if self.count[i] > 0:
                    out[f"{self.kind}/{name}"] = (self.score_sum[i] / self.count[i]).float()
        return out


def segmentation_metrics(class_names: Sequence[str]) -> MetricCollection:
    """The one collection of metrics; clone it with ``prefix="val_"`` or ``"test_"``."""
    return MetricCollection(
        {"dice": InstanceOverlap("dice", class_names), "iou": InstanceOverlap("iou", class_names)},
        compute_groups=False,
    )


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
