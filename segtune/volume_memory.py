"""How SAM2-family models propagate through a volume with their video memory (``propagation: memory``).

The alternative to box propagation (:mod:`segtune.propagation`) for Sam2,
Sam3Tracker and MedSAM2 (a Sam2 checkpoint): a volume's slices are the frames of a video, each
object's prompt (its box, or points) is added on its prompted slice, and transformers' video model
(``Sam2VideoModel`` / ``Sam3TrackerVideoModel``) follows it forward and then backward
(``propagate_in_video_iterator(..., reverse=True)``) from that slice, every slice conditioned on the
memories of the slices before it, as SAM2 tracks an object through a video. With its slice range
known (``box3d``) an object is followed over that range and nowhere else; without it, as in box
propagation, it ends in a direction at its first slice whose mask has fewer than ``min_pixels`` pixels,
and its result does not depend on the other objects (objects that share a prompted slice and prompt
kind share one session; each group starts from a reset session).

The video model is built from the fine-tuned image model: its config from the image model's
vision, prompt-encoder and mask-decoder configs, and every weight the two classes share (all of the
image model's) copied from the image model (LoRA merged first, as ``segtune export --merge`` does).
The memory modules (memory attention, memory encoder, object pointers) are not in an image model:
they come from ``<VideoModel>.from_pretrained`` of the same source when it has them (HF's SAM2 hub
checkpoints), or from the native checkpoint file the image model was converted from (Meta's
``sam2*_hiera_*.pt``, ``MedSAM2_*.pt``: renamed by :func:`segtune.models.convert.video_memory_state`;
``segtune convert`` keeps them, renamed, in the folder's ``video_memory.safetensors``), else they
are random and a warning says so. transformers runs video inference only under ``inference_mode``:
segtune does not train the memory modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from segtune.data.intensity import gray_to_rgb
from segtune.data.slices import PreparedVolume
from segtune.postprocess import logits_to_original
from segtune.preprocessing import Preprocessing, preprocess_image, scale_coords

log = logging.getLogger(__name__)

#: Image model type -> transformers' video config, model and inference-session class names.
VIDEO_CLASSES = {
    "sam2": ("Sam2VideoConfig", "Sam2VideoModel", "Sam2VideoInferenceSession"),
    "sam3_tracker": ("Sam3TrackerVideoConfig", "Sam3TrackerVideoModel", "Sam3TrackerVideoInferenceSession"),
}
#: Channels of SAM2's memories; transformers fixes them (the memory attention's ``kv_in_dim``).
MEMORY_CHANNELS = 64
#: Box corners as SAM2 labels its points (a box is two points labelled 2 and 3).
BOX_LABELS = (2, 3)


def image_model(model: nn.Module) -> nn.Module:
    """The HF image model inside a method's ``module.model`` (a PEFT wrapper's base model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_memory_support(model: nn.Module, name: str) -> None:
    """Stop with one line when ``model`` has no SAM2 video memory that fits it.

    Raises:
        ValueError: a model of another family (SAM, SAM-HQ, MobileSAM), or one narrower than SAM2's
            memories (transformers' video model needs a hidden size that is a multiple of 64 above 64).
    """
    config = image_model(model).config
    option = "model.init_args.volume_scoring.propagation memory"
    if config.model_type not in VIDEO_CLASSES:
        raise ValueError(
            f"{option} needs a SAM2-family model (Sam2, Sam3Tracker, MedSAM2), which has a video memory; {name!r} is a "
            f"{type(image_model(model)).__name__}: set propagation: box"
        )
    hidden = int(config.vision_config.fpn_hidden_size)
    if hidden <= MEMORY_CHANNELS or hidden % MEMORY_CHANNELS:
        raise ValueError(
            f"{option}: {name!r} is {hidden} channels wide, which SAM2's video memory does not fit "
            f"(transformers' {VIDEO_CLASSES[config.model_type][1]} needs a multiple of {MEMORY_CHANNELS} above "
            f"{MEMORY_CHANNELS}; SAM2 checkpoints have 256): use a wider model (the sam2-tiny-video preset) or "
            "propagation: box"
        )


def video_config(config: Any) -> Any:
    """A video config for the image model ``config``: its vision, prompt and decoder configs, and memory
    modules sized as SAM2's are for its 256 channels (scaled to the model's width, on its feature grid)."""
    config_class = getattr(transformers, VIDEO_CLASSES[config.model_type][0])
    vision = config.vision_config
    hidden = int(vision.fpn_hidden_size)
    return config_class(
        vision_config=vision.to_dict(),
        prompt_encoder_config=config.prompt_encoder_config.to_dict(),
        mask_decoder_config=config.mask_decoder_config.to_dict(),
        image_size=config.prompt_encoder_config.image_size,
        memory_attention_hidden_size=hidden,
        memory_encoder_hidden_size=hidden,
        mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden,
        memory_attention_feed_forward_hidden_size=8 * hidden,  # SAM2: 2048 at 256
        memory_fuser_intermediate_dim=4 * hidden,  # SAM2: 1024 at 256
        memory_attention_rope_feat_sizes=list(vision.backbone_feature_sizes[-1]),
        memory_encoder_output_channels=MEMORY_CHANNELS,
    )


def _weights_source(name: str) -> str | None:
    """Where model ``name``'s weights load from (a hub id, folder or native file), or None for presets
    built from a random config."""
    from segtune.models.loading import _source
    from segtune.models.presets import PRESETS

    preset = PRESETS.get(name)
    if preset is None:
        return name
    return None if preset.config is not None else _source(preset)


def memory_source(name: str) -> str | None:
    """Where ``<VideoModel>.from_pretrained`` could load the memory modules of model ``name`` from (a hub
    id or folder), or None for presets built from a random config and native checkpoint files (see
    :func:`memory_file`, which also finds the memory ``segtune convert`` keeps in its folders)."""
    from segtune.models.loading import is_native_file

    source = _weights_source(name)
    return None if source is None or is_native_file(source) else source


def memory_file(name: str) -> str | None:
    """The file holding model ``name``'s SAM2 memory modules besides its image weights: the native
    checkpoint it is read from (a ``.pt``/``.pth`` named directly, or a preset's packaged file), or the
    ``video_memory.safetensors`` that ``segtune convert`` writes into a SAM2 folder; None otherwise."""
    from segtune.models.convert import VIDEO_MEMORY_FILE
    from segtune.models.loading import is_native_file

    source = _weights_source(name)
    if source is None:
        return None
    if is_native_file(source):
        return source
    kept = Path(source) / VIDEO_MEMORY_FILE
    return str(kept) if kept.is_file() else None


def native_memory(video: nn.Module, memory: dict[str, torch.Tensor], image_keys: set[str]) -> list[str]:
    """Load a native checkpoint's renamed ``memory`` tensors into ``video``, all or none.

    Returns:
        What keeps it from loading (empty when loaded): the video model's memory tensors the file does
        not fill, tensors of the file it has no place for, and shape mismatches.
    """
    own = video.state_dict()
    wanted = set(own) - image_keys
    problems = [f"missing {k}" for k in sorted(wanted - set(memory))]
    problems += [f"no place for {k}" for k in sorted(set(memory) - wanted)]
    problems += [
        f"{k}: shape {tuple(memory[k].shape)}, the model's {tuple(own[k].shape)}"
        for k in sorted(wanted & set(memory))
        if memory[k].shape != own[k].shape
    ]
    if not problems:
        with torch.no_grad():
            for key, value in memory.items():
                own[key].copy_(value.to(own[key].dtype))
    return problems


def build_video_model(model: nn.Module, name: str) -> tuple[nn.Module, bool]:
    """The video model for ``model`` (not yet holding its image weights) and whether its memory modules
    were loaded from a checkpoint (False: random, with a warning)."""
    config = image_model(model).config
    video_class = getattr(transformers, VIDEO_CLASSES[config.model_type][1])
    source = memory_source(name)
    kept = memory_file(name) if config.model_type == "sam2" else None
    why = ""
    if kept is not None:
        video, why = _from_memory_file(model, name, kept)
        if video is not None:
            return video, True
    if source is not None:
        try:
            video, info = video_class.from_pretrained(source, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:  # no such checkpoint, or another shape
            log.info("%s: no %s loads from %s (%s)", name, video_class.__name__, source, str(e).splitlines()[0])
        else:
            memory = [k for k in info["missing_keys"] if not _image_key(k, model)]
            if not memory:
                return video, True
            log.info("%s: %s of %s has no memory modules (e.g. %s)", name, video_class.__name__, source, memory[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random memory in every run
        video = video_class(video_config(config))
    log.warning(
        "%s: SAM2's memory modules (memory attention, memory encoder, object pointers) are untrained random "
        "weights: %s holds only the image model's. Memory propagation follows the prompt with an untrained "
        "memory; load a SAM2 video checkpoint for trained ones, or set volume_scoring.propagation: box%s",
        name, kept or ("this preset" if source is None else source), why,
    )  # fmt: skip
    return video, False


def _from_memory_file(model: nn.Module, name: str, path: str) -> tuple[nn.Module | None, str]:
    """The video model holding the memory modules of the native SAM2 file ``path`` (or of a converted
    folder's ``video_memory.safetensors``), or None and why not (for the warning)."""
    from segtune.models.convert import ConversionError, read_checkpoint, video_memory_state

    try:
        # a converted folder's file holds the memory renamed already
        memory = load_file(path) if path.endswith(".safetensors") else video_memory_state(read_checkpoint(path))
    except (ConversionError, OSError, SafetensorError) as e:
        return None, f" ({path}: {e})"
    config = video_config(image_model(model).config)
    # SAM 2.0 files have neither of these (2.1 added them); the memory bank's length is in the file
    config.enable_occlusion_spatial_embedding = "occlusion_spatial_embedding_parameter" in memory
    config.enable_temporal_pos_encoding_for_object_pointers = (
        "temporal_positional_encoding_projection_layer.weight" in memory
    )
    if "memory_temporal_positional_encoding" in memory:
        config.num_maskmem = int(memory["memory_temporal_positional_encoding"].shape[0])
    video_class = getattr(transformers, VIDEO_CLASSES["sam2"][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        video = video_class(config)
    problems = native_memory(video, memory, set(image_model(model).state_dict()))
    if problems:
        return None, f" ({path} does not fit it: {len(problems)} problems: {'; '.join(problems[:5])})"
    log.info("%s: SAM2's memory modules (%d tensors) loaded from %s", name, len(memory), path)
    return video, ""


def _image_key(key: str, model: nn.Module) -> bool:
    return key in image_model(model).state_dict()


def image_weights(module: Any) -> dict[str, torch.Tensor]:
    """The effective weights of ``module.model`` under the plain HF model's names: LoRA (and QLoRA,
    from a full-precision base) merged as ``segtune export --merge`` merges them."""
    from peft import PeftModel

    if isinstance(module.model, PeftModel):
        from segtune.export import _merged

        return _merged(module).state_dict()
    return module.model.state_dict()


def _fingerprint(model: nn.Module) -> tuple[float, float]:
    """A cheap summary of every weight: it changes when training or a checkpoint changes a weight."""
    with torch.no_grad():
        total = absolute = 0.0
        for p in model.parameters():
            values = p.detach().double()
            total += float(values.sum())
            absolute += float(values.abs().sum())
    return total, absolute


@dataclass
class _Video:
    """The video model a module's scoring uses, and the image weights it last copied."""

    model: nn.Module
    fingerprint: tuple[float, float]


def video_model(module: Any) -> nn.Module:
    """The video model of ``module`` holding its current image weights (built once, refreshed when a
    weight of the image model has changed since), in eval mode on the module's device."""
    check_memory_support(module.model, module.model_name)
    # Lightning evaluates under inference_mode: weights made there could never be updated outside it
    with torch.inference_mode(False), torch.no_grad():
        fingerprint = _fingerprint(module.model)
        held: _Video | None = getattr(module, "_video_model", None)
        if held is None:
            video, _ = build_video_model(module.model, module.model_name)
            held = _Video(video, (float("nan"), float("nan")))
            # held in a plain object, not as a submodule: the video model is in no checkpoint and no optimiser
            module._video_model = held
        if held.fingerprint != fingerprint:
            copy_image_weights(held.model, image_weights(module))
            held.fingerprint = fingerprint
        return held.model.to(module.device).eval()


def copy_image_weights(video: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy the image model's ``weights`` into ``video`` under the same names.

    Raises:
        ValueError: an image weight the video model has no place for (a model of another family).
    """
    own = video.state_dict()
    foreign = [k for k in weights if k not in own]
    if foreign:
        raise ValueError(f"{type(video).__name__} has no weight {foreign[0]} of the image model ({len(foreign)} such)")
    with torch.no_grad():
        for key, value in weights.items():
            own[key].copy_(value.to(own[key].dtype))


def _point_inputs(prompt: np.ndarray, size: tuple[int, int], reshaped: tuple[int, int]) -> dict[str, torch.Tensor]:
    """An ``[4]`` box or ``[P, 3]`` points (``x, y, label``) as the session's point inputs, in the model frame."""
    given = torch.from_numpy(np.asarray(prompt, np.float32))
    if given.ndim == 1:
        coords = scale_coords(given.reshape(2, 2), size, reshaped)
        labels = torch.tensor(BOX_LABELS, dtype=torch.int32)
    else:
        coords = scale_coords(given[:, :2].contiguous(), size, reshaped)
        labels = given[:, 2].to(torch.int32)
    return {"point_coords": coords[None, None], "point_labels": labels[None, None]}


def propagate_memory(
    module: Any, volume: PreparedVolume, starts: list[int], prompts: list[np.ndarray], min_pixels: int,
    ranges: list[tuple[int, int] | None] | None = None,
) -> list[np.ndarray]:  # fmt: skip
    """Each object's ``(S, H, W)`` bool prediction: prompted with ``prompts[i]`` on slice ``starts[i]`` and
    followed both ways by the model's video memory, inside its slice range ``ranges[i]`` when it is known
    (``box3d``: every slice of it, none outside), else until it vanishes (fewer than ``min_pixels`` pixels)."""
    ranges = list(ranges) if ranges is not None else [None] * len(starts)
    shape = tuple(volume.image.shape)
    outs = [np.zeros(shape, bool) for _ in starts]
    if not starts:
        return outs
    video = video_model(module)
    pre: Preprocessing = module.preprocessing
    size = shape[1:]
    encoded = [preprocess_image(gray_to_rgb(volume.image[k]), pre) for k in range(shape[0])]
    reshaped = encoded[0][1]
    session_class = getattr(transformers, VIDEO_CLASSES[image_model(module.model).config.model_type][2])
    session = session_class(
        video=torch.stack([pixels for pixels, _ in encoded]), video_height=size[0], video_width=size[1],
        inference_device=module.device, inference_state_device=module.device, video_storage_device="cpu",
        dtype=torch.float32,
    )  # fmt: skip
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (k, prompt) in enumerate(zip(starts, prompts, strict=True)):
        groups.setdefault((int(k), np.asarray(prompt).ndim), []).append(i)

    def masks(out: Any) -> list[np.ndarray]:
        logits = out.pred_masks[:, 0]
        return list(logits_to_original(logits, pre, reshaped, size).gt(0).cpu().numpy())

    for (start, _), members in groups.items():
        session.reset_tracking_data()
        for i in members:
            session.add_point_inputs(session.obj_id_to_idx(i), start, _point_inputs(prompts[i], size, reshaped))
        session.obj_with_new_inputs = list(members)
        first = video(inference_session=session, frame_idx=start)
        alive_at_start = set()
        for i, mask in zip(first.object_ids, masks(first), strict=True):
            if mask.sum() >= min_pixels:
                outs[i][start] = mask
            if mask.sum() >= min_pixels or ranges[i] is not None:  # a known range is followed to its ends
                alive_at_start.add(i)
        for reverse in (False, True):
            alive = set(alive_at_start)
            if not alive:
                break
            for out in video.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
                if out.frame_idx == start:  # the prompted slice's output, reused
                    continue
                for i, mask in zip(out.object_ids, masks(out), strict=True):
                    if i not in alive:
                        continue
                    known = ranges[i]
                    if known is not None and not known[0] <= out.frame_idx <= known[1]:
                        alive.discard(i)  # past its known range: nothing is predicted there
                    elif mask.sum() >= min_pixels:
                        outs[i][out.frame_idx] = mask
                    elif known is None:  # vanished: this object stops in this direction
                        alive.discard(i)
                if not alive:
                    break
    return outs
