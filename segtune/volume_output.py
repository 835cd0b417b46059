"""How predicted volumes are written: a label volume with its source's geometry, and a PNG montage.

The label volume takes the source file's format (NIfTI in, NIfTI out; ``.mhd`` becomes ``.mha`` and
MedSAM2 ``.npz`` becomes ``.nii.gz``) and its spacing, origin and direction, so a viewer overlays it on
the scan without shifting it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segtune.data.intensity import gray_to_rgb
from segtune.data.volumes import VOLUME_SUFFIXES, write_volume
from segtune.visualise import overlay, to_uint8_rgb
from segtune.volume_scoring import VolumePrediction

#: Source endings whose predictions are written in another format (one file each).
_OUTPUT_SUFFIX = {".mhd": ".mha", ".nhdr": ".nrrd", ".npz": ".nii.gz"}


def output_name(source: Path, case: str) -> str:
    """The file name of ``case``'s predicted label volume, in the source's format."""
    suffix = next((s for s in VOLUME_SUFFIXES if source.name.lower().endswith(s)), ".nii.gz")
    return f"{case}{_OUTPUT_SUFFIX.get(suffix, suffix)}"


def montage(prediction: VolumePrediction, class_names: list[str], slices: int = 6, height: int = 192) -> np.ndarray:
    """``slices`` evenly spaced slices with predicted foreground (any slices when there is none), each with
    the predicted labels' contours and its slice index, side by side: ``[height, W, 3]`` uint8 RGB."""
    volume, label = prediction.volume, prediction.slice_label
    present = np.flatnonzero(label.reshape(len(label), -1).any(axis=1))
    pool = present if len(present) else np.arange(len(label))
    picked = pool[np.unique(np.linspace(0, len(pool) - 1, min(slices, len(pool))).round().astype(int))]
    values = [int(v) for v in np.unique(label) if v]
    panels = []
    for k in picked:
        image = to_uint8_rgb(gray_to_rgb(volume.image[k]))
        masks = np.stack([label[k] == v for v in values]) if values else np.zeros((0, *image.shape[:2]), bool)
        scale = max(1.0, height / image.shape[0])
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        resized = [cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0 for m in masks]
        masks = np.stack(resized) if resized else np.zeros((0, size[1], size[0]), bool)
        names = [class_names[v - 1] if 0 < v <= len(class_names) else str(v) for v in values]
        drawn = overlay(image, masks, [], colours=[v - 1 for v in values])
        cv2.putText(
            drawn, f"{volume.axis_name}={k}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA
        )
        if names and k == picked[0]:
            cv2.putText(
                drawn, ", ".join(names), (4, drawn.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1
            )
        panels.append(cv2.resize(drawn, (round(drawn.shape[1] * height / drawn.shape[0]), height)))
    return np.concatenate(panels, axis=1)


def write_prediction(prediction: VolumePrediction, folder: Path, class_names: list[str]) -> Path:
    """Write ``<folder>/volumes/<case>.<format>`` with the source's geometry and ``<folder>/montages/<case>.png``."""
    case = prediction.volume.case
    path = write_volume(
        prediction.label, prediction.volume.geometry, folder / "volumes" / output_name(case.image, case.name)
    )
    picture = montage(prediction, class_names)
    (folder / "montages").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "montages" / f"{case.name}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    return path
