"""PEFT LoRA on a SAM-family model (no Lightning here)."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn


def add_lora(
    model: nn.Module,
    target_modules: str | list[str],
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters.

    Args:
        model: the base model; its weights are frozen.
        target_modules: a regex matched in full against module names, or a list of name suffixes.
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale is ``alpha / r``).
        dropout: dropout on the LoRA input.
        modules_to_save: submodules trained in full beside the adapters (e.g. ``["mask_decoder"]``).
    """
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, modules_to_save=modules_to_save
    )
    return get_peft_model(model, config)
