"""A Decathlon or nnU-Net ``dataset.json``, read field by field and checked against its folders.

Decathlon writes ``labels`` as ``{"0": "background", "1": "Anterior"}`` and lists its pairs under
``training`` (``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``) and its test images
under ``test``; nnU-Net v2 writes ``labels`` as ``{"background": 0, "Anterior": 1}`` and counts its cases
in ``numTraining`` without listing them. Every field is optional here; a field that is present and
malformed stops with one line naming the file and the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from segtune.data.coco import read_json
from segtune.data.volumes import case_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetJson:
    """What a ``dataset.json`` says.

    Args:
        path: the file.
        labels: label value -> class name (background left out); None when the file has no ``labels``.
        training: the ``(image, label)`` paths of ``training``, as written (relative to the dataset folder);
            None when it lists none.
        num_training: ``numTraining``; None when absent.
    """

    path: Path
    labels: dict[int, str] | None
    training: list[tuple[str, str]] | None
    num_training: int | None


def _field_error(path: Path, field: str, what: str) -> ValueError:
    return ValueError(f"{path}: field {field!r} {what}")


def _labels(raw: object, path: Path) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise _field_error(path, "labels", f"is {raw!r}; it maps label values to class names")
    pairs = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)):  # nnU-Net v2 regions are lists
            raise _field_error(path, "labels", f"gives {key!r}: {value!r}; each class is one label value")
        value_first = isinstance(value, int)  # nnU-Net v2: name -> value; Decathlon: "value" -> name
        number, name = (value, key) if value_first else (key, value)
        try:
            number = int(number)
        except ValueError:
            raise _field_error(path, "labels", f"gives {key!r}: {value!r}; a label value is a whole number") from None
        if number < 0:
            raise _field_error(path, "labels", f"gives {key!r}: {value!r}; label values are 0 or more")
        if number in pairs:
            raise _field_error(path, "labels", f"names label value {number} twice ({pairs[number]!r}, {name!r})")
        pairs[number] = str(name)
    return {v: name for v, name in sorted(pairs.items()) if v != 0}


def _training(raw: object, path: Path) -> list[tuple[str, str]]:
    if not isinstance(raw, list):
        raise _field_error(path, "training", f"is a {type(raw).__name__}; it lists {{image, label}} pairs")
    pairs = []
    for i, entry in enumerate(raw):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("image", "label"))):
            raise _field_error(path, "training", f"entry {i}: {entry!r} is not {{'image': path, 'label': path}}")
        pairs.append((entry["image"], entry["label"]))
    return pairs


def read_dataset_json(path: Path) -> DatasetJson | None:
    """Read ``path`` (None when it does not exist).

    Raises:
        ValueError: one line naming the file: not a json object, or a field (``labels``, ``training``,
            ``numTraining``) that is present and malformed.
    """
    if not path.is_file():
        return None
    data = read_json(path)
    count = data.get("numTraining")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise _field_error(path, "numTraining", f"is {count!r}; it counts the training cases")
    return DatasetJson(
        path,
        _labels(data["labels"], path) if "labels" in data else None,
        _training(data["training"], path) if data.get("training") is not None else None,
        count,
    )


def missing_listed(info: DatasetJson, root: Path, found: set[str]) -> list[Path]:
    """The images of the ``training`` pairs that are missing whole (image and label): a subset of the listed
    set, as a user who copies some cases keeps it. Half a pair is an image or a label without its partner in
    the folders, which pairing the folders reports (:func:`segtune.data.volumes.pair_cases`).

    Args:
        info: the read file.
        root: the dataset folder the paths are relative to.
        found: the lower-case case names of the images found (nnU-Net's channel suffix stripped: the list
            names ``case.nii.gz`` where the folder holds ``case_0000.nii.gz``).
    """
    return [
        root / image
        for image, label in info.training or []
        if case_name(Path(image)).lower() not in found and not (root / label).is_file()
    ]
