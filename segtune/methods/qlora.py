"""QLoRA: LoRA on a base loaded in 4-bit NF4 (bitsandbytes); only its defaults differ from LoRA."""

from __future__ import annotations

from typing import Literal

from segtune.methods.lora import LoRA


class QLoRA(LoRA):
    """:class:`~segtune.methods.lora.LoRA` with ``quantization="nf4"``, a higher learning rate and
    gradient checkpointing on, as the QLoRA recipe has them.

    Args:
        model: preset name, local folder or hub id.
        quantization: ``"nf4"`` (``"none"`` makes this plain LoRA).
        lr: peak learning rate.
        gradient_checkpointing: recompute activations to save memory.
        **kwargs: see :class:`~segtune.methods.lora.LoRA` and
            :class:`~segtune.methods.base.SegmentationModule`.
    """

    def __init__(
        self,
        model: str = "sam-tiny",
        quantization: Literal["none", "nf4"] = "nf4",
        lr: float = 2e-4,
        gradient_checkpointing: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(
            model=model, quantization=quantization, lr=lr, gradient_checkpointing=gradient_checkpointing, **kwargs
        )
