"""Checkpoints users ask for, each with its model class, preprocessing and LoRA targets.

Tiny presets are built from a small random config (no download) for tests and the quickstart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig, Sam2Config, Sam3TrackerConfig, SamConfig, SamHQConfig

from segtune.preprocessing import Preprocessing

# Image-encoder attention (Sam, SamHQ, Sam2 fuse q/k/v in `qkv`; Sam3Tracker has separate projections)
# and the two-way transformer of the mask decoder (`out_proj` in Sam/SamHQ, `o_proj` in Sam2/Sam3).
SAM_ENCODER_TARGETS = r".*vision_encoder\..*\.qkv"
SAM3_ENCODER_TARGETS = r".*vision_encoder\..*\.(q_proj|k_proj|v_proj)"
# EdgeTAM's image encoder is RepViT, a convnet from timm with no attention projections: LoRA goes on
# the 1x1 convs of its FPN neck (peft adapts Conv2d); a regex can reach the backbone's convs too.
EDGETAM_TARGETS = r".*vision_encoder\.neck\.convs\.\d+"
DECODER_TARGETS = r".*mask_decoder\.transformer\..*\.(q_proj|k_proj|v_proj|out_proj|o_proj)"


@dataclass(frozen=True)
class ModelPreset:
    """A named checkpoint.

    Args:
        name: what a config writes as ``model.init_args.model``.
        model_class: the transformers class name the checkpoint loads as.
        hub_id: Hugging Face hub id, or None for presets built from ``config``.
        preprocessing: input geometry and normalisation.
        lora_targets: regex (``re.fullmatch`` on module names) of the layers LoRA adapts.
        config: builds the config of a tiny random model (no weights to download).
    """

    name: str
    model_class: str
    hub_id: str | None
    preprocessing: Preprocessing
    lora_targets: str = SAM_ENCODER_TARGETS
    config: Callable[[], PretrainedConfig] | None = None


_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32)
# Sam's vision config defaults to initializer_range=1e-10, which makes a random model ignore the image.
_SAM_VISION = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=256, patch_size=16, output_channels=32,
    global_attn_indexes=[1], mlp_dim=128, num_pos_feats=16, window_size=4, initializer_range=0.02,
)  # fmt: skip


def _sam_tiny() -> SamConfig:
    return SamConfig(
        vision_config=_SAM_VISION,
        prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16, image_embedding_size=16),
        mask_decoder_config=_DECODER,
    )


def _samhq_tiny() -> SamHQConfig:
    return SamHQConfig(
        vision_config=_SAM_VISION,
        prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16),
        mask_decoder_config=dict(_DECODER, vit_dim=64),
    )


def _sam2_tiny() -> Sam2Config:
    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[256, 256],
        blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[8, 4, 4, 4],
        global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4],
    )  # fmt: skip
    return Sam2Config(
        vision_config=dict(
            backbone_config=backbone,
            backbone_channel_list=[128, 64, 32, 16],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
            fpn_hidden_size=32,
        ),  # fmt: skip
        prompt_encoder_config=dict(hidden_size=32, image_size=256, patch_size=16),
        mask_decoder_config=_DECODER,
    )


def _sam3tracker_tiny() -> Sam3TrackerConfig:
    backbone = dict(
        model_type="sam3_vit_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=224, patch_size=14, window_size=8, global_attn_indexes=[1], pretrain_image_size=224,
    )  # fmt: skip
    return Sam3TrackerConfig(
        vision_config=dict(
            backbone_config=backbone, fpn_hidden_size=32, backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]]
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=224, patch_size=14),
        mask_decoder_config=_DECODER,
    )


_SAM = Preprocessing(1024, "longest", "imagenet", 256)
_MEDSAM = Preprocessing(1024, "longest", "unit", 256)
_SAM2 = Preprocessing(1024, "square", "imagenet", 256)
_SAM3 = Preprocessing(1008, "square", "imagenet", 288)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("sam-tiny", "SamModel", None, Preprocessing(256, "longest", "imagenet", 64), config=_sam_tiny),
        ModelPreset(
            "samhq-tiny", "SamHQModel", None, Preprocessing(256, "longest", "imagenet", 64), config=_samhq_tiny
        ),
        ModelPreset("sam2-tiny", "Sam2Model", None, Preprocessing(256, "square", "imagenet", 64), config=_sam2_tiny),
        ModelPreset(
            "sam3tracker-tiny",
            "Sam3TrackerModel",
            None,
            Preprocessing(224, "square", "imagenet", 64),
            SAM3_ENCODER_TARGETS,
            _sam3tracker_tiny,
        ),  # fmt: skip
        ModelPreset("sam-vit-base", "SamModel", "facebook/sam-vit-base", _SAM),
        ModelPreset("sam-vit-large", "SamModel", "facebook/sam-vit-large", _SAM),
        ModelPreset("sam-vit-huge", "SamModel", "facebook/sam-vit-huge", _SAM),
        ModelPreset("medsam", "SamModel", "wanglab/medsam-vit-base", _MEDSAM),
        ModelPreset("slimsam-77", "SamModel", "nielsr/slimsam-77-uniform", _SAM),
        ModelPreset("samhq-vit-base", "SamHQModel", "syscv-community/sam-hq-vit-base", _SAM),
        ModelPreset("samhq-vit-large", "SamHQModel", "syscv-community/sam-hq-vit-large", _SAM),
        ModelPreset("samhq-vit-huge", "SamHQModel", "syscv-community/sam-hq-vit-huge", _SAM),
        *[
            ModelPreset(f"sam2{v}-hiera-{size}", "Sam2Model", f"facebook/sam2{v}-hiera-{size}", _SAM2)
            for v in ("", ".1")
            for size in ("tiny", "small", "base-plus", "large")
        ],
        ModelPreset("sam3tracker", "Sam3TrackerModel", "facebook/sam3", _SAM3, SAM3_ENCODER_TARGETS),
        ModelPreset("edgetam", "EdgeTamModel", "yonigozlan/EdgeTAM-hf", _SAM2, EDGETAM_TARGETS),
    ]
}
