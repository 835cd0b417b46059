"""SamLoss: padding prompts never count; the best of several masks trains."""

from __future__ import annotations

import torch

from segtune.loss import SamLoss


def test_padding_prompts_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    logits, iou, target = torch.randn(1, 2, 1, 8, 8), torch.rand(1, 2, 1), (torch.rand(1, 2, 8, 8) > 0.5).float()
    loss = SamLoss()
    only_first = loss(logits[:, :1], iou[:, :1], target[:, :1], torch.tensor([[True]]))["loss"]
    garbage = logits.clone()
    garbage[:, 1] = 1e4
    padded = loss(garbage, iou, target, torch.tensor([[True, False]]))["loss"]
    assert torch.allclose(only_first, padded)


def test_best_of_multimask_is_trained() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1
    good = (target * 20 - 10)[:, :, None]  # confident and right
    bad = -good
    logits = torch.cat([bad, good, bad], dim=2).requires_grad_()
    out = SamLoss()(logits, torch.ones(1, 1, 3), target, torch.ones(1, 1, dtype=torch.bool))
    out["loss"].backward()
    grads = logits.grad.abs().flatten(3).sum(-1)[0, 0]
    assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0


def test_all_padding_gives_zero_not_nan() -> None:
    out = SamLoss()(
        torch.randn(1, 2, 1, 4, 4), torch.rand(1, 2, 1), torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, dtype=torch.bool)
    )
    assert out["loss"].item() == 0.0
