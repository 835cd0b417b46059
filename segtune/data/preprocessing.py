"""Image, box and mask geometry shared by the data pipeline and the evaluation.

SAM and SAM-HQ resize the longest side to the model's input size and pad bottom-right; SAM2 and
Sam3Tracker resize to the square input size. The low-resolution masks that every SAM-family model
predicts are 4x the image-embedding grid (256 px for SAM at 1024). These functions map images and
prompts into the model's frame and predictions back to the image's original resolution, so
metrics never see the 256 px grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a model family wants its input image.

    Args:
        image_size: side of the square model input in pixels.
        resize: ``"longest"`` keeps the aspect ratio and pads bottom-right (SAM, SAM-HQ, MedSAM);
            ``"square"`` stretches to ``image_size`` x ``image_size`` (SAM2, Sam3Tracker, EdgeTAM).
        normalize: ``"imagenet"`` applies ImageNet mean/std after scaling to [0, 1]; ``"unit"`` stops
            at [0, 1] (MedSAM).
        mask_size: side of the low-resolution mask the model predicts (4x its image-embedding grid:
            256 for SAM at 1024 px).
    """

    image_size: int = 1024
    resize: Literal["longest", "square"] = "longest"
    normalize: Literal["imagenet", "unit"] = "imagenet"
    mask_size: int = 256

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Shape ``(h, w)`` of the image inside the model input, before padding."""
        if self.resize == "square":
            return self.image_size, self.image_size
        # Same rounding as transformers' SamImageProcessor._get_preprocess_shape.
        scale = self.image_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_image(image: np.ndarray, pre: Preprocessing) -> tuple[torch.Tensor, tuple[int, int]]:
    """Turn an ``[H, W, 3]`` uint8 image into the model's ``[3, S, S]`` float input.

    Returns:
        The pixel values and the ``(h, w)`` size of the resized image before padding.
    """
    height, width = image.shape[:2]
    new_h, new_w = pre.resized_shape(height, width)
    # PIL bilinear is what SamImageProcessorPil uses, so the pixels match the HF processor.
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    pixels = torch.from_numpy(resized).permute(2, 0, 1) / 255.0
    if pre.normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        pixels = (pixels - mean) / std
    out = torch.zeros(3, pre.image_size, pre.image_size)
    out[:, :new_h, :new_w] = pixels
    return out, (new_h, new_w)


def scale_coords(coords: torch.Tensor, original: tuple[int, int], resized: tuple[int, int]) -> torch.Tensor:
    """Scale ``[..., 2k]`` xy coordinates (boxes ``xyxy`` or points ``xy``) from the image to the model frame."""
    scale = torch.tensor([resized[1] / original[1], resized[0] / original[0]], dtype=torch.float32)
    shape = coords.shape
    return (coords.reshape(-1, 2).float() * scale).reshape(shape)


def masks_to_low_res(masks: torch.Tensor, pre: Preprocessing, resized: tuple[int, int]) -> torch.Tensor:
    """Ground truth ``[N, H, W]`` at the original size -> ``[N, s, s]`` float targets in the model's mask frame."""
    if masks.numel() == 0:
        return torch.zeros(masks.shape[0], pre.mask_size, pre.mask_size)
    frame = torch.zeros(masks.shape[0], 1, pre.image_size, pre.image_size)
    frame[:, :, : resized[0], : resized[1]] = F.interpolate(
        masks[:, None].float(), size=resized, mode="bilinear", align_corners=False
    )
    low = F.interpolate(frame, size=(pre.mask_size, pre.mask_size), mode="area")
    return (low[:, 0] > 0.5).float()


def logits_to_original(
    logits: torch.Tensor, pre: Preprocessing, resized: tuple[int, int], original: tuple[int, int]
) -> torch.Tensor:
    """Low-resolution logits ``[N, s, s]`` -> logits ``[N, H, W]`` at the image's original resolution.

    Upsample to the model input, crop the padding away, then resize to the original image, as
    transformers' ``post_process_masks`` does.
    """
    x = F.interpolate(
        logits[:, None].float(), size=(pre.image_size, pre.image_size), mode="bilinear", align_corners=False
    )
    x = x[..., : resized[0], : resized[1]]
    x = F.interpolate(x, size=tuple(original), mode="bilinear", align_corners=False)
    return x[:, 0]
