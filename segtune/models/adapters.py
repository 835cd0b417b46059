"""PEFT LoRA on a SAM-family model, adapter files and merged export (no Lightning here)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from segtune.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

PREPROCESSING_FILE = "segtune_preprocessing.json"


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
    if isinstance(target_modules, str) and not any(re.fullmatch(target_modules, n) for n, _ in model.named_modules()):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA target_modules {target_modules!r} matches no layer of {type(model).__name__} "
            f"(a regex matched in full against module names; its Linear layers are named {', '.join(linear)})"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, modules_to_save=modules_to_save
    )
    return get_peft_model(model, config)


def write_preprocessing(folder: str | Path, pre: Preprocessing) -> None:
    """Write segtune's preprocessing and an HF ``preprocessor_config.json`` describing it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PREPROCESSING_FILE).write_text(json.dumps(asdict(pre), indent=2))
    square = pre.resize == "square"
    hf = {
        "image_processor_type": "Sam2ImageProcessorFast" if square else "SamImageProcessor",
        "do_resize": True,
        "size": {"height": pre.image_size, "width": pre.image_size} if square else {"longest_edge": pre.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": pre.normalize == "imagenet",
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_pad": not square,
        "pad_size": {"height": pre.image_size, "width": pre.image_size},
        "mask_size": {"height": pre.mask_size, "width": pre.mask_size},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(hf, indent=2))


def save_pretrained(model: PreTrainedModel | PeftModel, pre: Preprocessing, folder: str | Path) -> Path:
    """Write a model folder with its preprocessing, as safetensors.

    A ``PeftModel`` writes its adapter (``adapter_config.json`` + ``adapter_model.safetensors``); a
    plain model writes a folder that ``<Class>.from_pretrained`` loads without segtune.
    """
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    write_preprocessing(folder, pre)
    return folder


def load_adapter(base: PreTrainedModel, folder: str | Path) -> PeftModel:
    """Put a saved adapter (safetensors only) on ``base``."""
    if not (Path(folder) / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder}: no adapter_model.safetensors (segtune loads adapters from safetensors only)"
        )
    return PeftModel.from_pretrained(base, folder)
