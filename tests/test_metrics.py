"""Instance Dice/IoU on hand-made cases: scored once per instance, averaged by the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from segtune.metrics import InstanceMean, segmentation_metrics
from segtune.postprocess import filled_boxes, overlap, score_instances


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
        ([], [], 1.0, 1.0),  # both empty counts as correct with empty_target="one"
        ([(1, 1)], [], 0.0, 0.0),  # empty ground truth, false positive
        ([(0, 0), (0, 1)], [(0, 1), (0, 2)], 0.5, 1 / 3),  # half overlap
    ],
    ids=["perfect", "disjoint", "both-empty", "false-positive", "partial"],
)
def test_single_instance_cases(pred, target, dice: float, iou: float) -> None:
    p, t = _masks((pred, target))
    assert overlap(p, t, "dice", "one").item() == pytest.approx(dice)
    assert overlap(p, t, "iou", "one").item() == pytest.approx(iou)
    excluded = overlap(p, t, "dice", "exclude").item()  # the default: both empty -> NaN, left out of means
    assert math.isnan(excluded) if (pred, target) == ([], []) else excluded == pytest.approx(dice)


def _scores(preds: torch.Tensor, target: torch.Tensor, empty_target: str = "one") -> dict[str, torch.Tensor]:
    # boxes covering the whole 4x4 image: the box floor is the Dice of a full mask
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * len(preds))
    return score_instances(preds, target, boxes, empty_target).as_dict()


def test_mean_over_instances_and_per_class_names() -> None:
    metrics = segmentation_metrics(["star", "cross"], "val_")
    p, t = _masks(([(0, 0)], [(0, 0)]), ([(0, 0)], [(3, 3)]), ([], []))
    metrics.update(_scores(p, t), torch.tensor([0, 1, 1]))
    out = metrics.compute()
    assert out["val_dice"].item() == pytest.approx(2 / 3)  # per-instance mean, not pooled pixels
    assert out["val_dice/star"].item() == pytest.approx(1.0)
    assert out["val_dice/cross"].item() == pytest.approx(0.5)
    # box floor: a full 4x4 box against one pixel is 2/17; against an empty target 0
    assert out["val_box_dice"].item() == pytest.approx((2 / 17 + 2 / 17 + 0) / 3)
    names = {"dice", "iou", "box_dice", "box_iou"}
    assert set(out) == {f"val_{n}{c}" for n in names for c in ("", "/star", "/cross")}


def test_no_nan_and_absent_classes_not_reported() -> None:
    metric = InstanceMean("dice", ["a", "b"])
    out = metric.compute()  # nothing seen
    assert not any(math.isnan(v.item()) for v in out.values())
    p, t = _masks(([], []))
    metric.update(_scores(p, t), torch.tensor([0]))
    out = metric.compute()
    assert "dice/b" not in out and out["dice"].item() == 1.0


def test_excluded_empty_pairs_leave_the_means_and_the_report() -> None:
    from segtune.postprocess import InstanceScores
    from segtune.reports import instance_rows, summarise

    p, t = _masks(([(0, 0)], [(0, 0)]), ([(1, 1)], [(3, 3)]), ([], []))
    classes = torch.tensor([0, 0, 1])
    metrics = segmentation_metrics(["a", "b"], "test_")
    metrics.update(_scores(p, t, "exclude"), classes)
    out = metrics.compute()
    assert out["test_dice"].item() == pytest.approx(0.5)  # (1 + 0) / 2: the empty pair is not a third 1.0
    assert "test_dice/b" not in out and not any(math.isnan(v.item()) for v in out.values())
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3)
    scores = score_instances(p, t, boxes, "exclude")
    assert isinstance(scores, InstanceScores)
    rows = instance_rows(0, "x.png", scores, classes, torch.ones(3), ["a", "b"])
    assert rows[2]["dice"] is None  # json null, not NaN
    report = summarise(rows)
    assert report["overall"]["dice"] == pytest.approx(out["test_dice"].item())  # the report's mean is the metric's
    assert report["per_class"]["b"]["dice"] is None


def test_float_masks_are_refused() -> None:
    with pytest.raises(TypeError, match="threshold"):
        overlap(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), "iou")


def test_filled_boxes_cover_exclusive_far_edges() -> None:
    masks = filled_boxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (5, 5))
    assert masks.shape == (1, 5, 5)
    assert masks[0].nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]


def test_counted_scores_match_torchmetrics_on_random_masks() -> None:
    # overlap counts bool pixels itself (torchmetrics copies every mask to int64 first): same numbers
    from torchmetrics.functional.segmentation import dice_score, mean_iou

    g = torch.Generator().manual_seed(0)
    preds = torch.rand(6, 37, 53, generator=g) > torch.linspace(0.05, 0.95, 6)[:, None, None]
    target = torch.rand(6, 37, 53, generator=g) > 0.5
    p, t = preds[:, None].long(), target[:, None].long()
    dice = dice_score(p, t, num_classes=1, include_background=True, average="none", input_format="one-hot")[:, 0]
    iou = mean_iou(p, t, num_classes=1, include_background=True, per_class=True, input_format="one-hot")[:, 0]
    assert torch.allclose(overlap(preds, target, "dice"), dice.float(), atol=1e-6)
    assert torch.allclose(overlap(preds, target, "iou"), iou.float(), atol=1e-6)
