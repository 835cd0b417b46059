"""SAM's training loss: focal (or BCE) + Dice on the masks, MSE on the IoU head."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class SamLoss(nn.Module):
    """``mask_weight * focal + dice_weight * dice + iou_weight * mse(iou_pred, iou)``, per prompt.

    With several masks per prompt (``multimask_output``), each prompt trains only its best mask
    (lowest loss), as in SAM. Padding prompts never count.

    Args:
        mask_loss: ``"focal"`` (SAM) or ``"bce"``.
        mask_weight: weight of the focal or BCE term (SAM: 20).
        dice_weight: weight of the soft Dice term (SAM: 1).
        iou_weight: weight of the IoU-head regression (SAM: 1).
        focal_alpha: focal loss balance of positive pixels.
        focal_gamma: focal loss focusing exponent.
    """

    def __init__(
        self,
        mask_loss: Literal["focal", "bce"] = "focal",
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.mask_loss = mask_loss
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.iou_weight = iou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Compute the loss.

        Args:
            logits: ``[B, N, M, h, w]`` mask logits (``M`` masks per prompt).
            iou_pred: ``[B, N, M]`` predicted IoU.
            target: ``[B, N, h, w]`` binary targets.
            valid: ``[B, N]`` bool, False on padding prompts.

        Returns:
            ``loss`` (the weighted sum) and its unweighted parts ``mask``, ``dice`` and ``iou``.
        """
        logits = logits[valid].float()  # [P, M, h, w]
        iou_pred = iou_pred[valid].float()  # [P, M]
        target = target[valid].float()[:, None].expand_as(logits)
        if logits.numel() == 0:
            zero = logits.sum()
            return {"loss": zero, "mask": zero, "dice": zero, "iou": zero}
        if self.mask_loss == "focal":
            mask = _focal(logits, target, self.focal_alpha, self.focal_gamma)
        else:
            mask = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(-1)
        prob = logits.sigmoid().flatten(2)
        flat_t = target.flatten(2)
        dice = 1 - (2 * (prob * flat_t).sum(-1) + 1) / (prob.sum(-1) + flat_t.sum(-1) + 1)
        with torch.no_grad():
            hard = (logits > 0).flatten(2).float()
            inter = (hard * flat_t).sum(-1)
            union = hard.sum(-1) + flat_t.sum(-1) - inter
            true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        iou = (iou_pred - true_iou) ** 2
        total = self.mask_weight * mask + self.dice_weight * dice + self.iou_weight * iou  # [P, M]
        best = total.argmin(dim=1, keepdim=True)

        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, best).mean()

        return {"loss": pick(total), "mask": pick(mask), "dice": pick(dice), "iou": pick(iou)}


def _focal(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-mask mean sigmoid focal loss (Lin et al.), ``[P, M, h, w] -> [P, M]``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)
