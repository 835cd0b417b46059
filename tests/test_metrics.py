"""Instance Dice/IoU on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from segtune.metrics import InstanceOverlap, filled_boxes, segmentation_metrics


def _masks(*pairs: tuple[list[tuple[int, int]], list[tuple[int, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Build [N, 4, 4] pred/target masks from lists of set pixels."""
    preds = torch.zeros(len(pairs), 4, 4, dtype=torch.bool)
    target = torch.zeros_like(preds)
    for i, (p, t) in enumerate(pairs):
        for y, x in p:
            preds[i, y, x] = True
        for y, x in t:
            target[i, y, x] = True
    return preds, target


@pytest.mark.parametrize(
    ("pred", "target", "dice", "iou"),
    [
        ([(0, 0), (0, 1)], [(0, 0), (0, 1)], 1.0, 1.0),  # perfect
        ([(0, 0)], [(3, 3)], 0.0, 0.0),  # disjoint
        ([], [], 1.0, 1.0),  # both empty counts as correct
        ([(1, 1)], [], 0.0, 0.0),  # empty ground truth, false positive
        ([(0, 0), (0, 1)], [(0, 1), (0, 2)], 0.5, 1 / 3),  # half overlap
    ],
    ids=["perfect", "disjoint", "both-empty", "false-positive", "partial"],
)
def test_single_instance_cases(pred, target, dice: float, iou: float) -> None:
    metrics = segmentation_metrics(["a"])
    p, t = _masks((pred, target))
    metrics.update(p, t, torch.tensor([0]))
    out = metrics.compute()
    assert out["dice"].item() == pytest.approx(dice)
    assert out["iou"].item() == pytest.approx(iou)


def test_mean_over_instances_and_per_class_names() -> None:
    metrics = segmentation_metrics(["star", "cross"]).clone(prefix="val_")
    p, t = _masks(([(0, 0)], [(0, 0)]), ([(0, 0)], [(3, 3)]), ([], []))
    metrics.update(p, t, torch.tensor([0, 1, 1]))
    out = metrics.compute()
    assert out["val_dice"].item() == pytest.approx(2 / 3)  # per-instance mean, not pooled pixels
    assert out["val_dice/star"].item() == pytest.approx(1.0)
    assert out["val_dice/cross"].item() == pytest.approx(0.5)
    assert set(out) == {"val_dice", "val_dice/star", "val_dice/cross", "val_iou", "val_iou/star", "val_iou/cross"}


def test_no_nan_and_absent_classes_not_reported() -> None:
    metric = InstanceOverlap("dice", ["a", "b"])
    out = metric.compute()  # nothing seen
    assert not any(math.isnan(v.item()) for v in out.values())
    p, t = _masks(([], []))
    metric.update(p, t, torch.tensor([0]))
    out = metric.compute()
    assert "dice/b" not in out and out["dice"].item() == 1.0


def test_float_masks_are_refused() -> None:
    metric = InstanceOverlap("iou", ["a"])
    with pytest.raises(TypeError, match="threshold"):
        metric.update(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), torch.tensor([0]))


def test_filled_boxes_cover_exclusive_far_edges() -> None:
    masks = filled_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (5, 5))
    assert masks.shape == (1, 5, 5)
    assert masks[0].nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]
