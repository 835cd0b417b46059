"""Load a SAM-family model from a preset name, a hub id or a local folder."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForMaskGeneration, PretrainedConfig, PreTrainedModel

from segtune.models.convert import NATIVE_SUFFIXES, ConversionError, load_native, native_preprocessing
from segtune.models.presets import (
    MOBILESAM_TARGETS,
    PRESETS,
    SAM3_ENCODER_TARGETS,
    SAM_ENCODER_TARGETS,
    ModelPreset,
)
from segtune.preprocessing import UNIT_MEAN, UNIT_STD, Preprocessing, family_preprocessing

log = logging.getLogger(__name__)


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a preset, a local folder nor a reachable hub id."""


def apply_processor_config(base: Preprocessing, processor: dict[str, Any] | None, source: str = "") -> Preprocessing:
    """``base`` with what a checkpoint's ``preprocessor_config.json`` says: size and resize policy,
    mask size, mean and std (``do_normalize: false`` stops at [0, 1]).

    Raises:
        ValueError: naming the file when it asks for an input segtune cannot reproduce (a
            non-square target size, a rescale other than 1/255).
    """
    if not processor:
        return base
    where = f"{source}/preprocessor_config.json" if source else "preprocessor_config.json"
    changes: dict[str, Any] = {}
    size = processor.get("size") or {}
    if "longest_edge" in size:
        changes.update(image_size=int(size["longest_edge"]), resize="longest")
    elif "height" in size and "width" in size:
        if int(size["height"]) != int(size["width"]):
            raise ValueError(f"{where}: size {size} is not square; SAM-family models take a square input")
        changes.update(image_size=int(size["height"]), resize="square")
    mask = processor.get("mask_size") or {}
    if "longest_edge" in mask or "height" in mask:
        changes["mask_size"] = int(mask.get("longest_edge") or mask["height"])
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    if abs(rescale - 1 / 255) > 1e-9:
        raise ValueError(f"{where}: rescale {rescale} is not supported (segtune scales 8-bit images by 1/255)")
    own = processor.get("segtune") or {}  # segtune's keys for recipes HF has no name for
    for key, allowed in (("resample", ("bilinear", "area")), ("rescale", ("fixed", "minmax"))):
        if key in own:
            if own[key] not in allowed:
                raise ValueError(f"{where}: segtune.{key} is {own[key]!r}, expected one of {', '.join(allowed)}")
            changes[key] = own[key]
    if processor.get("do_normalize", True) is False:
        changes.update(image_mean=UNIT_MEAN, image_std=UNIT_STD)
    else:
        for key in ("image_mean", "image_std"):
            value = processor.get(key)
            if value is not None:
                changes[key] = tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    return replace(base, **changes)


def preprocessing_of(config: PretrainedConfig, processor: dict[str, Any] | None = None) -> Preprocessing:
    """A model's input: its ``preprocessor_config.json`` when it has one, else its family's processor."""
    return apply_processor_config(family_preprocessing(config), processor)


def lora_targets_of(model_type: str) -> str:
    """Default LoRA target regex for a model type: image-encoder attention (and MLP for TinyViT)."""
    if model_type == "mobilesam":
        return MOBILESAM_TARGETS
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
            and weights, a native checkpoint file (``.pth``/``.pt``: SAM, SAM2, MobileSAM,
            LiteMedSAM; converted in memory, nothing written), or a hub id (read from the HF cache
            when offline).
        **from_pretrained: passed to ``from_pretrained`` (``quantization_config``, ``dtype``).

    Returns:
        The model, its preprocessing and its default LoRA target regex.

    Raises:
        ModelNotFoundError: with one line saying how to get the model.
    """
    preset = PRESETS.get(name)
    if preset is not None and preset.config is not None:
        return _reloaded(build_random(preset), from_pretrained), preset.preprocessing, preset.lora_targets
    source = _source(preset) if preset else name
    if is_native_file(source):
        try:
            model, _, _ = load_native(source, preprocessing=preset.preprocessing if preset else None)
        except ConversionError as e:
            raise ModelNotFoundError(str(e)) from None
        targets = preset.lora_targets if preset is not None else lora_targets_of(model.config.model_type)
        return _reloaded(model, from_pretrained), preprocessing_for(name), targets
    try:
        model = AutoModelForMaskGeneration.from_pretrained(source, **from_pretrained)
    except (OSError, ValueError) as e:  # ValueError: a folder without a usable config.json
        raise ModelNotFoundError(_not_found_message(name, source, e)) from None
    targets = preset.lora_targets if preset is not None else lora_targets_of(model.config.model_type)
    return model, preprocessing_for(name), targets


def _reloaded(model: PreTrainedModel, from_pretrained: dict[str, Any]) -> PreTrainedModel:
    """``model`` as ``from_pretrained(**from_pretrained)`` would load it: bitsandbytes quantises
    while loading weights, so a model built in memory goes through a saved copy."""
    if not any(v is not None for v in from_pretrained.values()):
        return model
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return AutoModelForMaskGeneration.from_pretrained(folder, **from_pretrained)


def is_native_file(source: str | Path) -> bool:
    """Whether ``source`` names a native checkpoint file (``.pth``/``.pt``) rather than a folder or hub id."""
    path = Path(source).expanduser()
    return path.suffix in NATIVE_SUFFIXES and path.is_file()


def _source(preset: ModelPreset) -> str:
    """Where a preset's weights load from: its hub id, its converted folder, or the native file an
    installed package ships (converted in memory).

    Raises:
        ModelNotFoundError: for a folder preset not converted yet, with the command that converts it.
    """
    if preset.folder is None:
        return preset.hub_id
    if (Path(preset.folder) / "config.json").is_file():
        return preset.folder
    packaged = preset.packaged_file()
    if packaged is not None:
        return str(packaged)
    raise ModelNotFoundError(f"model {preset.name!r}: no converted folder at {preset.folder}: {preset.convert_hint()}")


def processor_config(source: str, cache_only: bool = False) -> dict[str, Any] | None:
    """A checkpoint's ``preprocessor_config.json`` (a local folder, the HF cache, then the hub), or None.

    Args:
        source: a folder or hub id.
        cache_only: never ask the network (presets: their weights come from the cache too).
    """
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():
        return _read_processor(path)
    if Path(source).expanduser().exists():  # a local folder without one
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "preprocessor_config.json")
    except ValueError:  # not a valid hub id (HFValidationError)
        return None
    if isinstance(cached, str):
        return _read_processor(Path(cached))
    if cache_only:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return _read_processor(Path(hf_hub_download(source, "preprocessor_config.json")))
    except Exception:  # no processor file, no network: the family's processor values apply
        return None


def _read_processor(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid json ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a json object")
    return data


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
    if preset is not None and preset.folder is not None:
        source = _source(preset)
        if is_native_file(source):
            return native_preprocessing(source, preset.preprocessing)
        return apply_processor_config(preset.preprocessing, processor_config(source), source)
    if preset is None and is_native_file(name):
        try:
            return native_preprocessing(name)
        except ConversionError as e:
            raise ModelNotFoundError(str(e)) from None
    if preset is not None:
        if preset.hub_id is None:
            return preset.preprocessing
        return apply_processor_config(preset.preprocessing, processor_config(preset.hub_id, True), preset.hub_id)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(_not_found_message(name, name, e)) from None
    return apply_processor_config(family_preprocessing(config), processor_config(name), name)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass, where the model class supports it (a warning
    for classes transformers does not checkpoint, e.g. ``Sam2Model``)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning("%s does not support activation checkpointing; training without it", type(model).__name__)
        return
    # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
