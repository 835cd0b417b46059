"""Prompt boxes for ``segtune predict`` on a folder of images: a boxes json (not COCO)."""

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
