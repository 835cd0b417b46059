"""Full fine-tune ("baseline"): train chosen parts of the model, no adapters."""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers import PreTrainedModel

from segtune.methods.base import SegmentationModule

Part = Literal["vision_encoder", "prompt_encoder", "mask_decoder"]


class FullFinetune(SegmentationModule):
    """Fine-tune the model's weights directly.

    Args:
        model: preset name, local folder or hub id.
        train_parts: which parts train; the others are frozen.
        lr: peak learning rate (full fine-tunes want a small one).
        gradient_clip_val: gradient-norm clipping, on by default for full fine-tunes.
        **kwargs: see :class:`~segtune.methods.base.SegmentationModule`.
    """

    def __init__(
        self,
        model: str = "sam-tiny",
        train_parts: list[Part] = ["vision_encoder", "prompt_encoder", "mask_decoder"],  # noqa: B006
        lr: float = 1e-5,
        gradient_clip_val: float | None = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(model=model, lr=lr, gradient_clip_val=gradient_clip_val, **kwargs)
        self.train_parts = list(train_parts)

    def adapt(self, model: PreTrainedModel, lora_targets: str) -> nn.Module:
        for name, child in model.named_children():
            child.requires_grad_(name in self.train_parts)
        return model
