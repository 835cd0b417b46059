"""Training with corrective clicks: the training step's prompts after a random number of simulated click rounds
(``data.init_args.prompts.clicks``, :class:`segtune.data.prompts.ClickTraining`).

micro-sam and SAM-Med2D train SAM as it is used: a first prompt, then clicks where its mask is wrong, with
the previous mask logits fed back. Each step here draws a round ``r`` uniformly from 0 to ``rounds``. The
image is encoded once (from the embedding cache when the method has one); rounds 1 to ``r - 1`` run the
prompt encoder and mask decoder without gradient, each placing one click per prompt on the model's own
mask (:func:`segtune.clicks.next_click`) against its training target; round ``r`` runs with gradient, and
only its output carries the loss (round 0 is the plain step: the first prompt alone). So a step costs the
plain step plus ``r`` decoder passes, ``r - 1`` of them without gradient.

Clicks are placed in the low-resolution mask frame the loss is computed in (the model's ``pred_masks``
against ``low_res_masks``, inside the image's part of it), and given to the model at that pixel's centre
in the model's input frame. Each prompt runs as its own one-prompt image with its mask input (SAM's mask
prompt is one per image). The mask-prompt embedding (``prompt_encoder.mask_embed``) stays as pretrained:
:func:`segtune.models.adapters.freeze_unreached` keeps it frozen, and the decoder learns to read it. No
Lightning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from segtune.clicks import next_click
from segtune.data.prompts import ClickTraining
from segtune.postprocess import best_masks
from segtune.preprocessing import low_res_shape


def click_training_step(
    module: Any, batch: dict[str, Any], options: ClickTraining, generator: torch.Generator | None = None
) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """The model's output on one training batch after a random number of click rounds, with its targets.

    Args:
        module: the :class:`~segtune.methods.base.SegmentationModule` (``encode``, ``forward_encoded``,
            ``preprocessing``, ``sanitise``).
        batch: the training batch (``low_res_masks``, ``prompt_valid``, its prompts).
        options: the rounds, click rule and mask input.
        generator: draws the round and seeds the clicks (default: torch's global generator, which the run's
            seed sets).

    Returns:
        The output to take the loss on (``pred_masks`` ``[B', N', M, s, s]``, ``iou_scores``), its targets
        ``[B', N', s, s]``, its ``[B', N']`` valid mask and the round drawn. Round 0 gives the batch's own
        layout; a later round one prompt per row (``[P, 1, ...]``).
    """
    rounds = int(torch.randint(0, options.rounds + 1, (1,), generator=generator))
    encoded = module.encode(batch)
    if rounds == 0:
        return module.forward_encoded(batch, encoded), batch["low_res_masks"], batch["prompt_valid"], 0
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
    images, slots = batch["prompt_valid"].nonzero(as_tuple=True)
    targets = batch["low_res_masks"][images, slots] > 0.5
    pre = module.preprocessing
    scale = pre.image_size / pre.mask_size
    points = [[] for _ in range(len(images))]
    labels = [[] for _ in range(len(images))]
    mask_input = options.mask_input and "input_masks" in module.sanitise.allowed
    rows = [level[images] for level in encoded]
    with torch.no_grad():
        logits, _ = best_masks(*_output(module.forward_encoded(batch, [e.detach() for e in encoded])))
        logits = logits[images, slots]
    for r in range(1, rounds + 1):
        for k in range(len(images)):
            i = int(images[k])
            h, w = low_res_shape(pre, (int(batch["reshaped_sizes"][i, 0]), int(batch["reshaped_sizes"][i, 1])))
            pred = (logits[k, :h, :w] > 0).cpu().numpy()
            click = next_click(pred, targets[k, :h, :w].cpu().numpy(), rng, options.rule)
            # a perfect mask still gets a prompt this round: a "not a point" that adds nothing
            x, y, label = (0.0, 0.0, -10) if click is None else ((click.x + 0.5) * scale, (click.y + 0.5) * scale,
                                                                  int(click.positive))  # fmt: skip
            points[k].append([x, y])
            labels[k].append(label)
        sub = _click_batch(batch, images, slots, points, labels)
        if mask_input:
            sub["input_masks"] = logits[:, None].detach()
        if r < rounds:
            with torch.no_grad():
                chosen, _ = best_masks(*_output(module.forward_encoded(sub, [e.detach() for e in rows])))
            logits = chosen[:, 0]
    out = module.forward_encoded(sub, rows)  # the drawn round: the one with gradient and the loss
    valid = torch.ones(len(images), 1, dtype=torch.bool, device=batch["prompt_valid"].device)
    return out, batch["low_res_masks"][images, slots][:, None], valid, rounds


def _output(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return out.pred_masks, out.iou_scores


def _click_batch(
    batch: dict[str, Any], images: torch.Tensor, slots: torch.Tensor, points: list[list[list[float]]],
    labels: list[list[int]],
) -> dict[str, Any]:  # fmt: skip
    """One-prompt images: each prompt's first prompt and its clicks so far (model frame)."""
    device = batch["prompt_valid"].device
    clicked = torch.tensor(points, dtype=torch.float32, device=device)
    clicked_labels = torch.tensor(labels, dtype=torch.long, device=device)
    sub: dict[str, Any] = {"prompt_valid": torch.ones(len(images), 1, dtype=torch.bool, device=device)}
    if "input_boxes" in batch:
        sub["input_boxes"] = batch["input_boxes"][images, slots][:, None]
    if "input_points" in batch:  # the first prompt's points first, the clicks after them
        clicked = torch.cat([batch["input_points"][images, slots].float(), clicked], dim=1)
        clicked_labels = torch.cat([batch["input_labels"][images, slots].long(), clicked_labels], dim=1)
    sub["input_points"], sub["input_labels"] = clicked[:, None], clicked_labels[:, None]
    return sub
