"""Load a SAM-family model from a preset name, a hub id or a local folder."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForMaskGeneration, PretrainedConfig, PreTrainedModel

from segtune.preprocessing import Preprocessing
from segtune.models.presets import PRESETS, SAM3_ENCODER_TARGETS, SAM_ENCODER_TARGETS, ModelPreset

log = logging.getLogger(__name__)

# SAM and SAM-HQ keep the aspect ratio; the SAM2 family stretches to a square.
_SQUARE_INPUT = {"sam2", "sam2_video", "sam3_tracker", "sam3_video", "edgetam", "edgetam_video"}


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a preset, a local folder nor a reachable hub id."""


def preprocessing_of(config: PretrainedConfig, processor_config: dict[str, Any] | None = None) -> Preprocessing:
    """Derive the input geometry from a model config and, when present, its ``preprocessor_config.json``."""
    prompt = config.prompt_encoder_config
    normalize = "unit" if processor_config and processor_config.get("do_normalize") is False else "imagenet"
    return Preprocessing(
        image_size=int(prompt.image_size),
        resize="square" if config.model_type in _SQUARE_INPUT else "longest",
        normalize=normalize,
        mask_size=4 * int(prompt.image_size) // int(prompt.patch_size),
    )


def lora_targets_of(model_type: str) -> str:
    """Default LoRA target regex for a model type: image-encoder attention."""
    return SAM3_ENCODER_TARGETS if model_type.startswith("sam3") else SAM_ENCODER_TARGETS


def build_random(preset: ModelPreset) -> PreTrainedModel:
    """Build a preset's random model from its config; always the same weights (so adapters reload)."""
    assert preset.config is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForMaskGeneration.from_config(preset.config())
        if preset.initialise is not None:
            preset.initialise(model)
        return model


def load_model(name: str, **from_pretrained: Any) -> tuple[PreTrainedModel, Preprocessing, str]:
    """Load a model by preset name, local folder or hub id.

    Args:
        name: a key of :data:`~segtune.models.presets.PRESETS`, a folder holding ``config.json``
            and weights, or a hub id (read from the HF cache when offline).
        **from_pretrained: passed to ``from_pretrained`` (``quantization_config``, ``dtype``).

    Returns:
        The model, its preprocessing and its default LoRA target regex.

    Raises:
        ModelNotFoundError: with one line saying how to get the model.
    """
    preset = PRESETS.get(name)
    if preset is not None and preset.config is not None:
        model = build_random(preset)
        if from_pretrained.get("quantization_config") is not None:
            # bitsandbytes quantises while loading weights: go through a saved copy.
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                model = AutoModelForMaskGeneration.from_pretrained(folder, **from_pretrained)
        return model, preset.preprocessing, preset.lora_targets
    source = preset.hub_id if preset else name
    try:
        model = AutoModelForMaskGeneration.from_pretrained(source, **from_pretrained)
    except (OSError, ValueError) as e:  # ValueError: a folder without a usable config.json
        raise ModelNotFoundError(_not_found_message(name, source, e)) from None
    if preset is not None:
        return model, preset.preprocessing, preset.lora_targets
    return model, preprocessing_of(model.config, _processor_config(source)), lora_targets_of(model.config.model_type)


def _processor_config(source: str) -> dict[str, Any] | None:
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "preprocessor_config.json")).read_text())
    except Exception:  # no processor file, no network: ImageNet normalisation is the SAM default
        return None


def _not_found_message(name: str, source: str, error: Exception) -> str:
    if Path(name).expanduser().exists():
        return f"{name}: not a Hugging Face model folder ({str(error).splitlines()[0]})"
    fetch = (
        f"`segtune models --download {name}`"
        if name in PRESETS
        else f"`hf download {source}` (or `segtune models` for the presets)"
    )
    return (
        f"model {name!r} not found: it is not a local folder and {source!r} is not in the Hugging Face cache "
        f"and could not be downloaded. Run {fetch} where a network exists, or set model to a folder saved "
        "with save_pretrained (HF_HUB_OFFLINE=1 reads only the cache)."
    )


def preprocessing_for(name: str) -> Preprocessing:
    """A model's preprocessing from its preset or saved config, without loading weights."""
    preset = PRESETS.get(name)
    if preset is not None:
        return preset.preprocessing
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(_not_found_message(name, name, e)) from None
    return preprocessing_of(config, _processor_config(name))


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass, where the model class supports it (a warning
    for classes transformers does not checkpoint, e.g. ``Sam2Model``)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning("%s does not support activation checkpointing; training without it", type(model).__name__)
        return
    # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
