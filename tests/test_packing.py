"""Padding prompts never reach the mask decoder, and the real prompts' outputs do not change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segtune.methods import FullFinetune
from segtune.models.packing import PackedPrompts

# per image: 1, 3 and 2 real prompts of 3 slots
VALID = torch.tensor([[True, False, False], [True, True, True], [True, True, False]])


def _batch(prompt: str) -> dict:
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(3, 3, 256, 256), "prompt_valid": VALID, "image_ids": [0, 1, 2]}
    if prompt == "boxes":
        corner = torch.rand(3, 3, 2) * 150
        batch["input_boxes"] = torch.cat([corner, corner + 40 + torch.rand(3, 3, 2) * 60], dim=-1)
    else:
        batch["input_points"] = torch.rand(3, 3, 2, 2) * 255
        batch["input_labels"] = torch.tensor([1, 0]).expand(3, 3, 2).clone()
    for key in ("input_boxes", "input_points"):
        if key in batch:
            batch[key][~VALID] = 0  # padding, as the collate writes it
    return batch


def _decoded_prompts(module: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """How many (image, prompt) pairs each mask-decoder call decodes."""
    seen: list[int] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeddings = kwargs.get("image_embeddings", args[0] if args else None)
        prompts = kwargs.get("sparse_prompt_embeddings", args[2] if len(args) > 2 else None)
        seen.append(int(embeddings.shape[0]) * int(prompts.shape[1]))

    decoder = module.model.mask_decoder
    return seen, decoder.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("model", ["sam-tiny", "samhq-tiny", "sam2-tiny"])
@pytest.mark.parametrize("prompt", ["boxes", "points"])
def test_real_prompts_decode_alone_with_the_same_masks(model: str, prompt: str) -> None:
    module = FullFinetune(model)
    module.configure_model()
    module.eval()
    batch = _batch(prompt)
    seen, handle = _decoded_prompts(module)
    try:
        with torch.no_grad():
            whole = module(batch)  # from the pixels: every slot decoded
            packed = module.forward_encoded(batch, module.encode(batch))
    finally:
        handle.remove()
    assert seen == [9, 6]  # 3 images x 3 slots, then the 6 real prompts
    assert packed.pred_masks.shape == whole.pred_masks.shape and packed.iou_scores.shape == whole.iou_scores.shape
    torch.testing.assert_close(packed.pred_masks[VALID], whole.pred_masks[VALID], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed.iou_scores[VALID], whole.iou_scores[VALID], atol=1e-5, rtol=1e-4)
    assert not packed.pred_masks[~VALID].any()  # padding: zeros, never read


def test_gradients_reach_the_decoder_through_the_unpacked_masks() -> None:
    module = FullFinetune("sam-tiny", train_parts=["mask_decoder"])
    module.configure_model()
    batch = _batch("boxes")
    out = module.forward_encoded(batch, module.encode(batch))
    out.pred_masks[VALID].sum().backward()
    grads = [p.grad for p in module.model.mask_decoder.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_nothing_is_packed_without_padding_or_without_prompts() -> None:
    assert PackedPrompts.of(torch.ones(2, 3, dtype=torch.bool)) is None
    assert PackedPrompts.of(torch.zeros(2, 3, dtype=torch.bool)) is None
    assert PackedPrompts.of(None) is None
    packed = PackedPrompts.of(VALID)
    assert packed is not None and packed.images.tolist() == [0, 1, 1, 1, 2, 2]
    assert packed.slots.tolist() == [0, 0, 1, 2, 0, 1]
