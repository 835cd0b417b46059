"""LoRA (peft) on the image encoder, with the mask decoder trained in full; optionally on a 4-bit base."""

from __future__ import annotations

from typing import Literal

import torch
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel

from segtune.methods.base import SegmentationModule
from segtune.models.adapters import add_lora
from segtune.models.loading import load_model
from segtune.preprocessing import Preprocessing

# Kept in full precision when the base is quantised: small, and what the method trains (decoder)
# or needs exact (prompt geometry).
UNQUANTISED = ["mask_decoder", "prompt_encoder"]


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
        quantization: ``"nf4"`` loads the base in 4-bit NF4 through bitsandbytes (QLoRA; runs on
            CPU too); the mask decoder and prompt encoder stay unquantised.
        compute_dtype: dtype of the 4-bit layers' matmuls (with ``quantization``).
        double_quant: also quantise the quantisation constants, ~0.4 bit per weight (with ``quantization``).
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
        quantization: Literal["none", "nf4"] = "none",
        compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        double_quant: bool = True,
        lr: float = 1e-4,
        **kwargs,
    ) -> None:
        super().__init__(model=model, lr=lr, **kwargs)
        self.lora = dict(r=r, alpha=alpha, dropout=dropout)
        self.target_modules = target_modules
        self.modules_to_save = list(modules_to_save)
        self.quantization = None
        if quantization == "nf4":
            self.quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                llm_int8_skip_modules=UNQUANTISED,
            )

    def load(self) -> tuple[PreTrainedModel, Preprocessing, str]:
        return load_model(self.model_name, quantization_config=self.quantization)

    def adapt(self, model: PreTrainedModel, lora_targets: str) -> nn.Module:
        if self.quantization is not None:
            # Checkpointing is enabled by the base class; here only the k-bit preparation.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            for module in model.modules():
                if getattr(module, "support_avx512bf16_for_cpu", False):
                    # bitsandbytes repacks 4-bit weights for CPU inference on the first eval-mode
                    # pass, and its packed path then fails in training (in-place bias add on a leaf
                    # tensor). Validation runs between training epochs, so keep the trainable layout.
                    module.support_avx512bf16_for_cpu = False
        return add_lora(
            model,
            self.target_modules or lora_targets,
            modules_to_save=self.modules_to_save or None,
            **self.lora,
        )
