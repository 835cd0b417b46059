"""Prompts for ``segtune predict`` on a folder of images: a boxes json or a points json (not COCO)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from segtune.data.coco import read_json
from segtune.data.images import image_files
from segtune.data.records import ImageRecord, RecordSet

log = logging.getLogger(__name__)


def boxes_records(json_path: Path, image_dir: Path, class_names: list[str], data: dict | None = None) -> RecordSet:
    """Predict records for every image in ``image_dir``, with prompt boxes from a boxes json.

    The json maps a file name or stem to ``[[x0, y0, x1, y1], ...]`` or to Kvasir's
    ``{"bbox": [{"xmin": .., "ymin": .., "xmax": .., "ymax": .., "label": ..}, ...]}``. A label
    that names a class gives that class; otherwise class 0. Images the json does not name get no
    prompt (logged). ``data`` is the parsed json when the caller has already read it.

    Raises:
        ValueError: naming the file and the entry when a box is malformed.
    """
    data = read_json(json_path) if data is None else data
    by_key = {k.lower(): v for k, v in data.items()}
    records, unprompted = [], 0
    for i, path in enumerate(image_files(image_dir)):
        entry = by_key.get(path.name.lower(), by_key.get(path.stem.lower()))
        boxes, classes = [], []
        items = entry.get("bbox", []) if isinstance(entry, dict) else entry or []
        for item in items:
            try:
                box = [item[k] for k in ("xmin", "ymin", "xmax", "ymax")] if isinstance(item, dict) else item
                box = [float(v) for v in box]
            except (KeyError, TypeError, ValueError):
                box = []
            if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"{json_path}: entry {path.stem!r}: {item!r} is not an [x0, y0, x1, y1] box")
            boxes.append(box)
            label = item.get("label") if isinstance(item, dict) else None
            classes.append(class_names.index(label) if label in class_names else 0)
        unprompted += not boxes
        records.append(ImageRecord(i, path, boxes=np.asarray(boxes, np.float32).reshape(-1, 4), box_classes=classes))
    if unprompted:
        log.warning("%s: %d images in %s have no box and get no prompt", json_path, unprompted, image_dir)
    return RecordSet(records, [i + 1 for i in range(len(class_names))])


def is_points_json(data: dict) -> bool:
    """Whether a prompts json holds points (``[x, y, label]`` triples) rather than boxes (4 numbers)."""
    for entry in data.values():
        if isinstance(entry, list) and entry:
            first = entry[0]
            return isinstance(first, list) and (len(first) == 3 or (bool(first) and isinstance(first[0], list)))
    return False


def points_records(json_path: Path, image_dir: Path, data: dict | None = None) -> RecordSet:
    """Predict records for every image in ``image_dir``, with point prompts from a points json.

    The json maps a file name or stem to ``[[x, y, label], ...]``: the points of one object
    (label 1 positive, 0 negative), or to ``[[[x, y, label], ...], ...]``: one such list per
    object. Each object is one prompt; objects with fewer points than the file's longest list are
    padded with SAM's "not a point" label (-10), so every image's prompts batch together. Images the
    json does not name get no prompt (logged). Predicted masks get class 0.

    Raises:
        ValueError: naming the file and the entry when a point is malformed.
    """
    data = read_json(json_path) if data is None else data
    by_key = {k.lower(): v for k, v in data.items()}
    paths = image_files(image_dir)
    objects_per_image: list[list[list[list[float]]]] = []
    for path in paths:
        entry = by_key.get(path.name.lower(), by_key.get(path.stem.lower())) or []
        if not isinstance(entry, list):
            raise ValueError(f"{json_path}: entry {path.stem!r}: expected a list of [x, y, label] points")
        nested = bool(entry) and isinstance(entry[0], list) and bool(entry[0]) and isinstance(entry[0][0], list)
        objects = entry if nested else [entry]
        parsed = []
        for points in objects:
            if not points:
                continue
            try:
                rows = [[float(v) for v in p] for p in points]
            except (TypeError, ValueError):
                rows = []
            if not rows or any(len(r) != 3 or r[2] not in (0.0, 1.0) for r in rows):
                raise ValueError(
                    f"{json_path}: entry {path.stem!r}: {points!r} is not a list of [x, y, label] points (label 1 or 0)"
                )
            parsed.append(rows)
        objects_per_image.append(parsed)
    longest = max((len(o) for objects in objects_per_image for o in objects), default=1)
    records, unprompted = [], 0
    for i, (path, objects) in enumerate(zip(paths, objects_per_image, strict=True)):
        points = np.zeros((len(objects), longest, 3), np.float32)
        points[:, :, 2] = -10  # SAM's "not a point": padding adds nothing to the prompt encoder
        for j, rows in enumerate(objects):
            points[j, : len(rows)] = rows
        unprompted += not objects
        records.append(ImageRecord(i, path, points=points, box_classes=[0] * len(objects)))
    if unprompted:
        log.warning("%s: %d images in %s have no point and get no prompt", json_path, unprompted, image_dir)
    return RecordSet(records, [1])
