"""Intensity policy: any decoded image (8/16-bit, float, grayscale or colour) -> 3-channel model input.

SAM-family models take 3-channel images scaled to [0, 1]. HF processors clip 16-bit data to 8 bits
and reject floats above 1, so segtune maps intensities explicitly: 8-bit images pass through
unchanged by default (exactly what the HF processors see), every other dtype is scaled by the
policy, never clipped to 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

#: Named CT windows ``(low, high)`` in Hounsfield units for ``window: <name>``. ``soft_tissue`` is the
#: window MedSAM applies to CT (level 40, width 400); the others are the usual radiology settings.
WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-450.0, 1050.0),
    "brain": (0.0, 80.0),
}


@dataclass(frozen=True)
class IntensityPolicy:
    """How image intensities become the [0, 1] range the model input is built from.

    Statistics are taken over all channels together, so colour balance is kept.

    Args:
        mode: ``"auto"``: 8-bit images unchanged, any other dtype (16-bit, 32-bit, float) min-max
            scaled per image. ``"minmax"``: every image scaled from its own minimum to its maximum.
            ``"percentile"``: clipped to its own ``percentiles`` then scaled (robust to a few hot
            pixels). ``"window"``: clipped to the fixed ``window`` then scaled (CT Hounsfield units,
            a detector's known range); the same for every image.
        percentiles: lower and upper percentile for ``"percentile"``.
        window: ``(low, high)`` raw values for ``"window"``, or the name of one of :data:`WINDOWS`
            (``soft_tissue``: MedSAM's CT window, ``[-160, 240]``); required by that mode.

    Volumes (:func:`volume_to_model_range`) take the statistics over the whole volume, so every slice
    of a case shares one scale.
    """

    mode: Literal["auto", "minmax", "percentile", "window"] = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.window, str):
            if self.window not in WINDOWS:
                names = ", ".join(WINDOWS)
                raise ValueError(f"intensity window {self.window!r} is not one of {names}; or give [low, high]")
            object.__setattr__(self, "window", WINDOWS[self.window])
        if self.mode == "window" and (self.window is None or not self.window[1] > self.window[0]):
            raise ValueError(
                f"data.init_args.intensity: mode 'window' needs window: [low, high] with high > low, got {self.window}"
            )
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(
                f"data.init_args.intensity: percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )


def _three_channels(image: np.ndarray, path: Path | str) -> np.ndarray:
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 2:  # grayscale + alpha
        return image[:, :, 0]
    if channels == 3:
        return image
    if channels == 4:  # drop alpha: SAM has no use for transparency
        return image[:, :, :3]
    raise ValueError(f"{path}: image has {channels} channels; segtune reads 1 (grayscale), 3 (RGB) or 4 (RGBA)")


def to_model_range(image: np.ndarray, policy: IntensityPolicy, path: Path | str = "image") -> np.ndarray:
    """Map a decoded image to ``[H, W, 3]``: uint8 when it passes through, else float32 in [0, 1].

    Args:
        image: ``[H, W]`` or ``[H, W, C]`` in any numeric dtype.
        policy: the intensity policy.
        path: the file the image came from, for error messages.
    """
    image = _three_channels(image, path)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if policy.mode == "auto" and image.dtype == np.uint8:
        # cv2 expands grayscale to RGB several times faster than np.repeat.
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    out = _scaled(image, policy)
    return cv2.cvtColor(out, cv2.COLOR_GRAY2RGB) if out.ndim == 2 else out


def volume_to_model_range(volume: np.ndarray, policy: IntensityPolicy) -> np.ndarray:
    """Map a ``(D, H, W)`` volume to one channel: uint8 when it passes through, else float32 in [0, 1].

    The statistics (minimum and maximum, percentiles) are taken over the whole volume, so every slice
    of a case is on the same scale; a slice becomes the model's 3 channels with :func:`gray_to_rgb`.
    """
    if volume.dtype == np.bool_:
        volume = volume.astype(np.uint8) * 255
    if policy.mode == "auto" and volume.dtype == np.uint8:  # MedSAM2 npz: windowed to 0-255 already
        return volume
    return _scaled(volume, policy)


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """A ``[H, W]`` uint8 or float32 slice as ``[H, W, 3]`` (a new contiguous array)."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2RGB)


def _scaled(image: np.ndarray, policy: IntensityPolicy) -> np.ndarray:
    """``image`` scaled by the policy's statistics (over all of it) into float32 [0, 1]."""
    data = image.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():  # NaN/inf (masked-out float data) take the lowest finite value
        data = np.where(finite, data, data[finite].min() if finite.any() else 0).astype(np.float32)
    if policy.mode == "window":
        low, high = policy.window  # type: ignore[misc]
    elif policy.mode == "percentile":
        low, high = np.percentile(data, policy.percentiles)
    else:  # "minmax", and "auto" for anything that is not 8-bit
        low, high = float(data.min()), float(data.max())
    span = float(high) - float(low)
    if span <= 0:  # a constant image carries no contrast: black
        out = np.zeros(data.shape, np.float32)
    else:
        out = (data - np.float32(low)) * np.float32(1.0 / span)
        np.clip(out, 0.0, 1.0, out=out)
    return out
