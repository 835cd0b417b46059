"""LoRA (peft) on the image encoder, with the mask decoder trained in full."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from segtune.methods.base import SegmentationModule
from segtune.models.adapters import add_lora


class LoRA(SegmentationModule):
    """Low-rank adapters on the model's attention projections.

    Args:
        model: preset name, local folder or hub id.
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale is ``alpha / r``).
        dropout: dropout on the LoRA input.
        target_modules: regex of the layers to adapt; ``None`` takes the model's preset
            (image-encoder attention).
        modules_to_save: submodules trained in full beside the adapters, by name (``neck`` matches
            ``vision_encoder.neck``); ``[]`` trains the adapters alone.
        lr: peak learning rate.
        **kwargs: see :class:`~segtune.methods.base.SegmentationModule`.
    """

    trainable_only_checkpoint = True

    def __init__(
        self,
        model: str = "sam-tiny",
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: str | None = None,
        modules_to_save: list[str] = ["mask_decoder"],  # noqa: B006  (jsonargparse shows the default)
        lr: float = 1e-4,
        **kwargs,
    ) -> None:
        super().__init__(model=model, lr=lr, **kwargs)
        self.lora = dict(r=r, alpha=alpha, dropout=dropout)
        self.target_modules = target_modules
        self.modules_to_save = list(modules_to_save)

    def adapt(self, model: PreTrainedModel, lora_targets: str) -> nn.Module:
        return add_lora(
            model,
            self.target_modules or lora_targets,
            modules_to_save=self.modules_to_save or None,
            **self.lora,
        )
