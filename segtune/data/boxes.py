"""Prompts for ``segtune predict`` on a folder of images: a boxes json, a points json, or an objects json
(a box with positive and negative points for one object, as a user refining a mask gives them); not COCO."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from segtune.data.coco import read_json
from segtune.data.images import image_files
from segtune.data.records import ImageRecord, RecordSet

log = logging.getLogger(__name__)


def _entries(json_path: Path, image_dir: Path, data: dict) -> list[tuple[Path, object]]:
    """Each image of ``image_dir`` with its json entry (by file name or stem, any case; None when absent).

    Keys that name no image are logged; when no key names one, nothing would be prompted.

    Raises:
        ValueError: naming the json and the folder when none of its keys names an image there.
    """
    by_key = {k.lower(): v for k, v in data.items()}
    paths = image_files(image_dir)
    used: set[str] = set()
    pairs = []
    for path in paths:
        key = path.name.lower() if path.name.lower() in by_key else path.stem.lower()
        if key in by_key:
            used.add(key)
        pairs.append((path, by_key.get(key)))
    unknown = [k for k in data if k.lower() not in used]
    if unknown and not used:
        raise ValueError(
            f"{json_path}: none of its {len(data)} entries names an image in {image_dir} (e.g. {unknown[0]!r}; "
            f"the folder has {', '.join(p.name for p in paths[:3]) or 'no image'}): keys are file names or stems"
        )
    if unknown:
        log.warning(
            "%s: %d entries name no image in %s and are ignored (e.g. %s)",
            json_path, len(unknown), image_dir, ", ".join(map(repr, unknown[:3])),
        )  # fmt: skip
    return pairs


def _image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header when Pillow reads it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # a format only OpenCV reads: decode it (read_image names the file if it cannot)
        from segtune.data.images import read_image

        return read_image(path).shape[:2]


def _check_coordinates(json_path: Path, path: Path, item: object, xs: list[float], ys: list[float], what: str) -> None:
    """Refuse prompt coordinates that are not finite, negative, or that place a prompt outside the image.

    Raises:
        ValueError: naming the file, the entry and the image's size.
    """
    values = [*xs, *ys]
    problem = None
    if not all(math.isfinite(v) for v in values):
        problem = "has a coordinate that is not a finite number"
    elif min(values) < 0:
        problem = "has a negative coordinate"
    else:
        height, width = _image_size(path)
        if min(xs) >= width or min(ys) >= height:
            problem = f"lies outside the {width}x{height} image"
    if problem:
        raise ValueError(f"{json_path}: entry {path.stem!r}: {item!r} {problem}; {what} are in the image's pixels")


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
    records, unprompted = [], 0
    for i, (path, entry) in enumerate(_entries(json_path, image_dir, data)):
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
            _check_coordinates(json_path, path, item, box[0::2], box[1::2], "boxes [x0, y0, x1, y1]")
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
    entries = _entries(json_path, image_dir, data)
    paths = [path for path, _ in entries]
    objects_per_image: list[list[list[list[float]]]] = []
    for path, entry in entries:
        entry = entry or []
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
            for row in rows:
                _check_coordinates(json_path, path, row, [row[0]], [row[1]], "points [x, y, label]")
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


#: The keys of one object of an objects json.
OBJECT_KEYS = ("box", "points", "label")


def is_objects_json(data: dict) -> bool:
    """Whether a prompts json holds objects (``{"box": ..., "points": ...}`` dicts) rather than bare boxes or points."""
    for entry in data.values():
        if isinstance(entry, list) and entry:
            return isinstance(entry[0], dict)
    return False


def _parse_box(json_path: Path, path: Path, item: object) -> list[float]:
    try:
        box = [float(v) for v in item]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f'{json_path}: entry {path.stem!r}: "box" {item!r} is not an [x0, y0, x1, y1] box')
    _check_coordinates(json_path, path, item, box[0::2], box[1::2], "boxes [x0, y0, x1, y1]")
    return box


def _parse_points(json_path: Path, path: Path, points: object) -> list[list[float]]:
    try:
        rows = [[float(v) for v in p] for p in points]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        rows = []
    if not rows or any(len(r) != 3 or r[2] not in (0.0, 1.0) for r in rows):
        raise ValueError(
            f'{json_path}: entry {path.stem!r}: "points" {points!r} is not a list of [x, y, label] points '
            "(label 1 positive, 0 negative)"
        )
    for row in rows:
        _check_coordinates(json_path, path, row, [row[0]], [row[1]], "points [x, y, label]")
    return rows


def objects_records(json_path: Path, image_dir: Path, class_names: list[str], data: dict | None = None) -> RecordSet:
    """Predict records for every image in ``image_dir``, with one prompt per object from an objects json.

    The json maps a file name or stem to a list of objects, each
    ``{"box": [x0, y0, x1, y1], "points": [[x, y, label], ...], "label": "<class>"}``: the box and the
    positive (label 1) and negative (0) points prompt that one object together, as a user who draws a
    box and then clicks where the mask is wrong. ``points`` and ``label`` are optional; ``box`` is given
    for every object of the file or for none (then the points alone prompt). Objects with fewer points
    than the file's most are padded with SAM's "not a point" label (-10). A label that names a class
    gives that class; otherwise class 0. Images the json does not name get no prompt (logged).

    Raises:
        ValueError: in one line naming the file and the entry: an object that is not a dict, a misspelt key,
            a malformed or out-of-image box or point, an object with neither, or boxes on some objects only.
    """
    data = read_json(json_path) if data is None else data
    parsed: list[tuple[Path, list[tuple[list[float] | None, list[list[float]], int]]]] = []
    boxed: tuple[str, bool] | None = None  # the first object's (entry, has a box): the others must agree
    for path, entry in _entries(json_path, image_dir, data):
        entry = entry or []
        if not isinstance(entry, list):
            raise ValueError(f'{json_path}: entry {path.stem!r}: expected a list of objects {{"box", "points"}}')
        objects = []
        for item in entry:
            if not isinstance(item, dict):
                raise ValueError(
                    f"{json_path}: entry {path.stem!r}: {item!r} is not an object "
                    '{"box": [x0, y0, x1, y1], "points": [[x, y, label], ...]}'
                )
            unknown = sorted(set(item) - set(OBJECT_KEYS))
            if unknown:
                raise ValueError(
                    f"{json_path}: entry {path.stem!r}: unknown key {unknown[0]!r} in {item!r}; an object has "
                    f"{', '.join(OBJECT_KEYS)}"
                )
            if "box" not in item and "points" not in item:
                raise ValueError(f'{json_path}: entry {path.stem!r}: {item!r} has neither "box" nor "points"')
            box = _parse_box(json_path, path, item["box"]) if "box" in item else None
            points = _parse_points(json_path, path, item["points"]) if "points" in item else []
            if boxed is None:
                boxed = (path.stem, box is not None)
            elif boxed[1] != (box is not None):
                raise ValueError(
                    f'{json_path}: entry {path.stem!r}: {item!r} {"has no" if boxed[1] else "has a"} "box" where '
                    f"entry {boxed[0]!r}'s objects {'have' if boxed[1] else 'have none'}: give a box to every object "
                    "of the file or to none (one batch holds one kind of prompt)"
                )
            label = item.get("label")
            objects.append((box, points, class_names.index(label) if label in class_names else 0))
        parsed.append((path, objects))
    longest = max((len(points) for _, objects in parsed for _, points, _ in objects), default=0)
    records, unprompted = [], 0
    for i, (path, objects) in enumerate(parsed):
        boxes = None
        if boxed is None or boxed[1]:
            boxes = np.asarray([box for box, _, _ in objects], np.float32).reshape(-1, 4)
        points = None
        if longest:
            points = np.zeros((len(objects), longest, 3), np.float32)
            points[:, :, 2] = -10  # SAM's "not a point": padding adds nothing to the prompt encoder
            for j, (_, rows, _) in enumerate(objects):
                if rows:
                    points[j, : len(rows)] = rows
        unprompted += not objects
        classes = [c for _, _, c in objects]
        records.append(ImageRecord(i, path, boxes=boxes, box_classes=classes, points=points))
    if unprompted:
        log.warning("%s: %d images in %s have no object and get no prompt", json_path, unprompted, image_dir)
    return RecordSet(records, [i + 1 for i in range(len(class_names))])
