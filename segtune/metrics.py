"""Dice and IoU metrics: means of per-instance scores, overall and per class, synced across processes.

The scores themselves are computed once per instance in :mod:`segtune.postprocess`; these metrics
only accumulate them, so the logged ``val_dice`` and the test report's numbers are the same
quantities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric, MetricCollection

#: The per-instance scores every evaluation logs (see :class:`segtune.postprocess.InstanceScores`).
SCORES = ("dice", "iou", "box_dice", "box_iou")


class InstanceMean(Metric):
    """Mean of one per-instance score, overall and for each class; NaN scores (instances excluded
    by ``empty_target: exclude``) are left out.

    ``compute`` returns ``{"<name>": overall}`` plus ``{"<name>/<class>": score}`` for each class
    that had instances, so a ``MetricCollection`` prefix gives ``val_dice``, ``val_dice/<class>``.

    Args:
        name: which score of :meth:`update`'s mapping this metric averages (``"dice"``, ``"iou"``,
            ``"box_dice"``, ``"box_iou"``).
        class_names: class index ``i`` is reported as ``class_names[i]``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, name: str, class_names: Sequence[str]) -> None:
        super().__init__()
        self.name = name
        self.class_names = list(class_names)
        n = max(1, len(self.class_names))
        self.add_state("score_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Mapping[str, torch.Tensor], classes: torch.Tensor) -> None:
        """Add instances.

        Args:
            scores: ``[N]`` per-instance scores by name (:meth:`InstanceScores.as_dict`).
            classes: ``[N]`` class indices.
        """
        score = scores[self.name]
        counted = ~torch.isnan(score)
        if not counted.any():
            return
        score = score[counted].to(self.score_sum.device, torch.float64)
        classes = classes[counted.to(classes.device)].clamp(min=0).to(self.score_sum.device)
        self.score_sum.index_add_(0, classes, score)
        self.count.index_add_(0, classes, torch.ones_like(score))

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.count.sum()
        out = {self.name: (self.score_sum.sum() / total if total > 0 else total).float()}
        if len(self.class_names) > 1:
            for i, name in enumerate(self.class_names):
                if self.count[i] > 0:
                    out[f"{self.name}/{name}"] = (self.score_sum[i] / self.count[i]).float()
        return out


class EmptyPredictions(Metric):
    """Counts, over an evaluation epoch, the instances with a non-empty ground truth and how many of
    them got a non-empty prediction (synced across processes), to notice a model that has collapsed
    to predicting background everywhere."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("targets", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("predicted", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add one image's ``[N, H, W]`` bool predicted masks and ground truth."""
        has_target = target.flatten(1).any(1).to(self.targets.device)
        self.targets += has_target.sum()
        self.predicted += (preds.flatten(1).any(1).to(self.targets.device) & has_target).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"targets": self.targets, "predicted": self.predicted}


def segmentation_metrics(class_names: Sequence[str], prefix: str, names: Sequence[str] = SCORES) -> MetricCollection:
    """The metrics of one evaluation stage: ``<prefix>dice``, ``<prefix>iou``, ``<prefix>box_dice``,
    ``<prefix>box_iou`` (or the given score ``names``: volumes score
    :data:`segtune.volume_scoring.VOLUME_SCORES`), each also per class."""
    return MetricCollection(
        {name: InstanceMean(name, class_names) for name in names}, prefix=prefix, compute_groups=False
    )
