"""The model's input: how a model family wants its image, and the geometry into its frame.

SAM and SAM-HQ resize the longest side to the model's input size and pad bottom-right; SAM2 and
Sam3Tracker resize to the square input size. The low-resolution masks that every SAM-family model
predicts are 4x the image-embedding grid (256 px for SAM at 1024). These functions map images and
prompts into the model's frame and predictions back to the image's original resolution, so
metrics never see the 256 px grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch
from PIL import Image

# transformers.image_utils' IMAGENET_DEFAULT_* (SAM, SAM-HQ, SAM2, EdgeTAM processors) and
# IMAGENET_STANDARD_* (Sam3Tracker's processor); MedSAM's recipe stops at [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDARD_MEAN = (0.5, 0.5, 0.5)
STANDARD_STD = (0.5, 0.5, 0.5)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)
# SAM and SAM-HQ keep the aspect ratio; the SAM2 family stretches to a square.
_SQUARE_INPUT = {"sam2", "sam2_video", "sam3_tracker", "sam3_video", "edgetam", "edgetam_video"}


@dataclass(frozen=True)
class Preprocessing:
    """How a model family wants its input image.

    Args:
        image_size: side of the square model input in pixels.
        resize: ``"longest"`` keeps the aspect ratio and pads bottom-right (SAM, SAM-HQ, MedSAM);
            ``"square"`` stretches to ``image_size`` x ``image_size`` (SAM2, Sam3Tracker, EdgeTAM).
        mask_size: side of the low-resolution mask the model predicts (4x its image-embedding grid:
            256 for SAM at 1024 px).
        image_mean: per-channel mean subtracted after scaling to [0, 1] (RGB).
        image_std: per-channel standard deviation divided by after that; mean 0 and std 1 stop at
            [0, 1] (MedSAM).
        resample: the resize filter: ``"bilinear"`` (PIL's, as the HF processors) or ``"area"``
            (OpenCV's ``INTER_AREA``, as LiteMedSAM's own inference code).
        rescale: how the resized image reaches [0, 1]: ``"fixed"`` divides 8-bit images by 255
            (float images arrive in [0, 1] from the intensity policy); ``"minmax"`` then scales
            each resized image from its own minimum to its maximum, over all channels together
            (LiteMedSAM's recipe), before the mean and std.

    A checkpoint's ``preprocessor_config.json`` sets these when it has one
    (:func:`segtune.models.loading.preprocessing_of`); presets are the fallback.
    """

    image_size: int = 1024
    resize: Literal["longest", "square"] = "longest"
    mask_size: int = 256
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    resample: Literal["bilinear", "area"] = "bilinear"
    rescale: Literal["fixed", "minmax"] = "fixed"

    def __post_init__(self) -> None:
        # jsonargparse and json give lists: keep tuples so instances compare and hash alike
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"preprocessing: image_mean and image_std need 3 values each, std > 0 "
                f"(got {self.image_mean}, {self.image_std})"
            )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Shape ``(h, w)`` of the image inside the model input, before padding."""
        if self.resize == "square":
            return self.image_size, self.image_size
        # Same rounding as transformers' SamImageProcessor._get_preprocess_shape.
        scale = self.image_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)


def family_preprocessing(config: Any) -> Preprocessing:
    """The input a model family's HF processor gives, from the model config alone (the fallback
    when a checkpoint has no ``preprocessor_config.json``).

    Args:
        config: a SAM-family ``PretrainedConfig`` (its ``model_type`` and ``prompt_encoder_config``).
    """
    prompt = config.prompt_encoder_config
    standard = config.model_type.startswith("sam3")  # Sam3ImageProcessor: IMAGENET_STANDARD_*
    return Preprocessing(
        image_size=int(prompt.image_size),
        resize="square" if config.model_type in _SQUARE_INPUT else "longest",
        mask_size=4 * int(prompt.image_size) // int(prompt.patch_size),
        image_mean=STANDARD_MEAN if standard else IMAGENET_MEAN,
        image_std=STANDARD_STD if standard else IMAGENET_STD,
    )


def preprocess_image(image: np.ndarray, pre: Preprocessing) -> tuple[torch.Tensor, tuple[int, int]]:
    """Turn an ``[H, W, 3]`` image into the model's ``[3, S, S]`` float input.

    :func:`normalise_image` of :func:`resize_image`; a dataset that keeps resized images calls the two
    apart.

    Args:
        image: uint8 (as the HF processors take it), or float32 already scaled to [0, 1] by the
            intensity policy (16-bit and float data, never squeezed through 8 bits).
        pre: the model's preprocessing.

    Returns:
        The pixel values and the ``(h, w)`` size of the resized image before padding.
    """
    resized = resize_image(image, pre)
    return normalise_image(resized, pre), (int(resized.shape[0]), int(resized.shape[1]))


def resize_image(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Resize an ``[H, W, 3]`` image to :meth:`Preprocessing.resized_shape`, keeping its dtype (uint8
    stays uint8, so :func:`normalise_image` knows its scale).

    Args:
        image: uint8, or float32 in [0, 1] (see :func:`preprocess_image`).
        pre: the model's preprocessing.
    """
    height, width = image.shape[:2]
    new_h, new_w = pre.resized_shape(height, width)
    if pre.resample == "area":
        # LiteMedSAM's resize (cv2.INTER_AREA on the 8-bit or float image), channels kept
        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    if image.dtype == np.uint8:
        # PIL bilinear is what SamImageProcessorPil uses, so the pixels match the HF processor.
        return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    # The same PIL filter on each channel in float ("F") mode: no 8-bit rounding.
    channels = [Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32)) for c in range(3)]
    return np.stack([np.asarray(c.resize((new_w, new_h), Image.BILINEAR)) for c in channels], axis=2)


def normalise_image(resized: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """The model's ``[3, S, S]`` float input from an image :func:`resize_image` gave: rescaled,
    normalised and padded bottom-right with zeros.

    Args:
        resized: ``[h, w, 3]`` uint8 (scaled by 1/255) or float (taken as [0, 1]).
        pre: the model's preprocessing.
    """
    new_h, new_w = resized.shape[:2]
    scale = 1.0 / 255.0 if resized.dtype == np.uint8 else 1.0
    offset = 0.0
    if pre.rescale == "minmax":
        # (x - min) / max(max - min, 1e-8), as LiteMedSAM: folded into the multiply-add below
        low, high = float(resized.min()), float(resized.max())
        scale, offset = 1.0 / max(high - low, 1e-8), low
    # ((x - offset) * scale - mean) / std as one multiply-add per channel, in place in the padded
    # output: on a 1024 px input this is several times faster than separate torch ops.
    gains = [scale / s for s in pre.image_std]
    offsets = [(offset * scale + m) / s for m, s in zip(pre.image_mean, pre.image_std, strict=True)]
    out = np.zeros((3, pre.image_size, pre.image_size), dtype=np.float32)
    for c in range(3):
        view = out[c, :new_h, :new_w]
        view[...] = resized[:, :, c]
        view *= np.float32(gains[c])
        if offsets[c]:
            view -= np.float32(offsets[c])
    return torch.from_numpy(out)


def scale_coords(coords: torch.Tensor, original: tuple[int, int], resized: tuple[int, int]) -> torch.Tensor:
    """Scale ``[..., 2k]`` xy coordinates (boxes ``xyxy`` or points ``xy``) from the image to the model frame."""
    scale = torch.tensor([resized[1] / original[1], resized[0] / original[0]], dtype=torch.float32)
    shape = coords.shape
    return (coords.reshape(-1, 2).float() * scale).reshape(shape)


def low_res_shape(pre: Preprocessing, resized: tuple[int, int]) -> tuple[int, int]:
    """Shape ``(h, w)`` the resized image covers in the model's low-resolution mask frame."""
    factor = pre.mask_size / pre.image_size
    return max(1, round(resized[0] * factor)), max(1, round(resized[1] * factor))


def masks_to_low_res(masks: torch.Tensor, pre: Preprocessing, resized: tuple[int, int]) -> torch.Tensor:
    """Ground truth ``[N, H, W]`` at the original size -> ``[N, s, s]`` float targets in the model's mask frame.

    Each mask is area-averaged straight to the region the image covers in the ``s x s`` frame
    (the rest is padding, 0) and thresholded at 0.5: the same target as resizing to the model input
    first and pooling by 4, without building ``N`` full-resolution frames.
    """
    out = torch.zeros(masks.shape[0], pre.mask_size, pre.mask_size)
    if masks.numel() == 0:
        return out
    low_h, low_w = low_res_shape(pre, resized)
    source = masks.numpy() if masks.dtype == torch.uint8 else masks.to(torch.uint8).numpy()
    area = cv2.INTER_AREA if low_h <= source.shape[1] and low_w <= source.shape[2] else cv2.INTER_LINEAR
    for i, mask in enumerate(source):
        small = cv2.resize(mask.astype(np.float32), (low_w, low_h), interpolation=area)
        out[i, :low_h, :low_w] = torch.from_numpy(small > 0.5)
    return out
