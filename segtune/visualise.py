"""Pictures of masks on images: overlays for predict outputs and the validation image grid."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# Distinct, colour-blind-friendly colours (Okabe-Ito), RGB.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """An ``[H, W, 3]`` image as the intensity policy returns it (uint8, or float in [0, 1]) -> uint8."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay(
    image: np.ndarray,
    masks: np.ndarray,
    labels: Sequence[str] = (),
    colours: Sequence[int] | None = None,
    alpha: float = 0.35,
) -> np.ndarray:
    """Draw instance masks on an image: a translucent fill, the contour, and a label per instance.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        masks: ``[N, H, W]`` bool.
        labels: text written at each instance's top-left (e.g. ``"polyp 0.93"``); may be empty.
        colours: palette index of each instance (default: its position).
        alpha: opacity of the fill.

    Returns:
        A new ``[H, W, 3]`` uint8 RGB image.
    """
    out = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        colour = PALETTE[(colours[i] if colours is not None else i) % len(PALETTE)]
        region = out[mask]
        out[mask] = (region * (1 - alpha) + np.array(colour) * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness)
        if i < len(labels) and labels[i]:
            ys, xs = np.nonzero(mask)
            origin = (int(xs.min()), max(12, int(ys.min()) - 3))
            scale = 0.4 * thickness
            cv2.putText(out, labels[i], origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
            cv2.putText(out, labels[i], origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return out


def instance_index_mask(masks: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """``[N, H, W]`` bool -> ``[H, W]`` with instance ``i`` stored as ``i + 1`` (0 background).

    Where instances overlap, the higher-scoring one wins. uint8 up to 255 instances, else uint16.
    """
    height, width = masks.shape[1:]
    out = np.zeros((height, width), np.uint8 if len(masks) < 256 else np.uint16)
    order = np.argsort(scores) if scores is not None else np.arange(len(masks))
    for i in order:  # ascending score: the best is painted last
        out[masks[i]] = i + 1
    return out


def grid(rows: Sequence[Sequence[np.ndarray]], height: int = 256) -> np.ndarray:
    """Tile panels (uint8 RGB, any size) into rows, each panel resized to ``height`` keeping its aspect."""
    resized = [
        [
            cv2.resize(p, (max(1, round(p.shape[1] * height / p.shape[0])), height), interpolation=cv2.INTER_AREA)
            for p in row
        ]
        for row in rows
    ]
    lines = [np.concatenate(row, axis=1) for row in resized]
    width = max(line.shape[1] for line in lines)
    return np.concatenate([np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0))) for line in lines], axis=0)
