"""PEFT LoRA on a SAM-family model, adapter files and merged export (no Lightning here)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from segtune.preprocessing import Preprocessing

# Parameters of the SAM family that segtune's training never reaches. They never get a gradient, so
# AdamW never changes them; left trainable, DDP waits for their gradients and stops at the second step
# ("parameters that were not used in producing the loss"). tests/test_methods.py checks every family.
# - any family: the mask-prompt embedding (segtune gives no mask prompts) and SAM2's object-score head
#   (its output feeds neither the loss nor the predictions);
# - Sam3Tracker: its image path adds `no_memory_embedding` to the neck's fourth, lowest-resolution level,
#   which the mask decoder never takes (it reads as many levels as `backbone_feature_sizes` lists: three).
UNREACHED = r"prompt_encoder\.(.*\.)?mask_embed\..*|(.*\.)?pred_obj_score_head\..*"
UNREACHED_BY_TYPE = {"sam3_tracker": r"no_memory_embedding|vision_encoder\.neck\.fpn_layers\.3\..*"}


def freeze_unreached(model: nn.Module) -> list[str]:
    """Freeze the trainable parameters segtune's training cannot reach (see ``UNREACHED``).

    Numerically a no-op on one device (those parameters get no gradient either way); under DDP it is
    what lets every process's gradients be reduced without ``find_unused_parameters``.

    Args:
        model: a SAM-family model, bare or wrapped by peft.

    Returns:
        The names of the parameters it froze.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    pattern = re.compile(r"(.*\.)?(" + "|".join(filter(None, [UNREACHED, UNREACHED_BY_TYPE.get(model_type)])) + ")")
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and pattern.fullmatch(name):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


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
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` property: a FutureWarning
        # on every run that the user cannot act on (transformers 5 names it is_activation_checkpointing).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def processor_class(model_type: str) -> str:
    """The image processor class transformers' ``AutoImageProcessor`` maps a model type to."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    if isinstance(names, str):
        return names
    # the default backend's class (SamImageProcessor falls back to its PIL twin without torchvision)
    return names.get("torchvision") or names.get("pil") or "SamImageProcessor"


def write_preprocessing(folder: str | Path, pre: Preprocessing, model_type: str = "sam") -> None:
    """Write an HF ``preprocessor_config.json`` describing segtune's preprocessing (loading reads it back).

    The HF file names the processor class that ``AutoImageProcessor`` uses for ``model_type``
    (``Sam3ImageProcessor`` for Sam3Tracker, ``Sam2ImageProcessor`` for SAM2 and EdgeTAM), with
    the mean, std and sizes segtune trained with.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    square = pre.resize == "square"
    hf = {
        "image_processor_type": processor_class(model_type),
        "do_resize": True,
        "size": {"height": pre.image_size, "width": pre.image_size} if square else {"longest_edge": pre.image_size},
        "mask_size": {"height": pre.mask_size, "width": pre.mask_size} if square else {"longest_edge": pre.mask_size},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.image_mean),
        "image_std": list(pre.image_std),
        "do_convert_rgb": True,
    }
    if not square:
        hf.update(do_pad=True, pad_size={"height": pre.image_size, "width": pre.image_size})
    if (pre.resample, pre.rescale) != ("bilinear", "fixed"):
        # What no HF processor does (LiteMedSAM's INTER_AREA resize, per-image min-max): segtune's
        # own keys, read back by segtune.models.loading.apply_processor_config; HF ignores them.
        hf["segtune"] = {"resample": pre.resample, "rescale": pre.rescale}
    (folder / "preprocessor_config.json").write_text(json.dumps(hf, indent=2))


def save_pretrained(model: PreTrainedModel | PeftModel, pre: Preprocessing, folder: str | Path) -> Path:
    """Write a model folder with its preprocessing, as safetensors.

    A ``PeftModel`` writes its adapter (``adapter_config.json`` + ``adapter_model.safetensors``); a
    plain model writes a folder that ``<Class>.from_pretrained`` loads without segtune.
    """
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    write_preprocessing(folder, pre, getattr(getattr(model, "config", None), "model_type", "sam"))
    return folder


def load_adapter(base: PreTrainedModel, folder: str | Path) -> PeftModel:
    """Put a saved adapter (safetensors only) on ``base``."""
    if not (Path(folder) / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder}: no adapter_model.safetensors (segtune loads adapters from safetensors only)"
        )
    return PeftModel.from_pretrained(base, folder)
