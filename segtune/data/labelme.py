"""LabelMe folders: images with a LabelMe ``.json`` beside each; shape labels are the classes.

LabelMe writes one json per image (``{"shapes": [{"label", "points", "shape_type", "group_id"}],
"imagePath", "imageHeight", "imageWidth", "imageData"}``). Polygons, rectangles and circles become
instance masks; shapes sharing a label and a ``group_id`` are one instance (LabelMe's way of
drawing one object in several parts). The image is read from its file; ``imageData`` (the image
embedded as base64, present or ``null``) is never decoded.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from segtune.data.coco import read_json
from segtune.data.images import image_files
from segtune.data.records import ImageRecord, RecordSet

log = logging.getLogger(__name__)

#: Shape types that enclose an area; others (points, lines, line strips) cannot give a mask.
AREA_SHAPES = ("polygon", "rectangle", "circle")


@dataclass
class LabelMeFile:
    """The parts of one LabelMe json that segtune uses (``imageData`` is dropped when read).

    Args:
        json_path: the json file.
        image_path: the ``imagePath`` it names (may be empty).
        height: ``imageHeight``, checked against the image file; None when absent.
        width: ``imageWidth``, as ``height``.
        has_image_data: whether the json embeds the image.
        shapes: the json's ``shapes``.
    """

    json_path: Path
    image_path: str
    height: int | None
    width: int | None
    has_image_data: bool
    shapes: list[dict] = field(default_factory=list)


def is_labelme(data: dict) -> bool:
    """Whether a parsed json looks like a LabelMe annotation file."""
    return isinstance(data.get("shapes"), list) and ("imagePath" in data or "imageHeight" in data)


def read_labelme(json_path: Path) -> LabelMeFile | None:
    """One LabelMe json, or None when the json is something else.

    Raises:
        ValueError: naming the file when it is not valid json.
    """
    data = read_json(json_path)
    if not is_labelme(data):
        return None
    height, width = data.get("imageHeight"), data.get("imageWidth")
    return LabelMeFile(
        json_path=json_path,
        image_path=str(data.get("imagePath") or ""),
        height=int(height) if height else None,
        width=int(width) if width else None,
        has_image_data=bool(data.get("imageData")),
        shapes=[s for s in data["shapes"] if isinstance(s, dict)],
    )


def labelme_files(folder: Path) -> list[LabelMeFile]:
    """The LabelMe jsons of ``folder``, sorted by name; other json files are ignored."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    found = [read_labelme(p) for p in sorted(folder.glob("*.json"))]
    return [f for f in found if f is not None]


def labelme_class_names(files: list[LabelMeFile]) -> list[str]:
    """The labels of every area shape, sorted by name (class index ``i`` is the ``i``-th)."""
    return sorted(
        {str(s.get("label")) for f in files for s in f.shapes if s.get("shape_type", "polygon") in AREA_SHAPES}
    )


def shape_polygon(shape: dict) -> list[float] | None:
    """A LabelMe shape as one flat COCO polygon ``[x0, y0, x1, y1, ...]``, or None when it encloses no area."""
    kind = shape.get("shape_type") or "polygon"
    try:
        points = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        return None
    if kind == "polygon" and len(points) >= 3:
        return [c for p in points for c in p]
    if kind == "rectangle" and len(points) == 2:
        (x0, y0), (x1, y1) = points
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    if kind == "circle" and len(points) == 2:  # centre and a point on the circle
        (cx, cy), (px, py) = points
        r = math.hypot(px - cx, py - cy)
        if r == 0:
            return None
        angles = [2 * math.pi * k / 32 for k in range(32)]
        return [c for a in angles for c in (cx + r * math.cos(a), cy + r * math.sin(a))]
    return None


def _image_of(file: LabelMeFile, stems: dict[str, Path]) -> Path:
    """The image a json annotates: its ``imagePath`` beside it, else the image of the json's stem."""
    if file.image_path:
        named = file.json_path.parent / file.image_path.replace("\\", "/")
        if named.is_file():
            return named
    by_stem = stems.get(file.json_path.stem.lower())
    if by_stem is not None:
        return by_stem
    why = " (segtune reads the image file, not the json's imageData)" if file.has_image_data else ""
    raise FileNotFoundError(
        f"{file.json_path}: its image {file.image_path or file.json_path.stem + '.*'} is not beside it{why}"
    )


def labelme_records(folder: Path, files: list[LabelMeFile], class_names: list[str]) -> RecordSet:
    """Records of a LabelMe folder: every image, with the instances its json draws.

    Images without a json are kept with no instance (the DataModule counts and skips them).
    Shapes that enclose no area (points, lines) and shapes whose label is not in ``class_names``
    are counted in the log.

    Raises:
        FileNotFoundError: naming the json whose image is missing.
    """
    index = {n: i for i, n in enumerate(class_names)}
    images = image_files(folder)
    stems = {p.stem.lower(): p for p in images}
    annotated: dict[Path, tuple[LabelMeFile, list[dict]]] = {}
    no_area: Counter[str] = Counter()
    dropped = 0
    for file in files:
        groups: dict[tuple, dict] = {}
        for k, shape in enumerate(file.shapes):
            label = str(shape.get("label"))
            polygon = shape_polygon(shape)
            if polygon is None:
                no_area[str(shape.get("shape_type") or "polygon")] += 1
                continue
            if label not in index:
                dropped += 1
                continue
            group = shape.get("group_id")
            key = (label, group) if group is not None else (label, None, k)
            ann = groups.setdefault(key, {"id": len(groups), "segmentation": [], "class_index": index[label]})
            ann["segmentation"].append(polygon)
        annotated[_image_of(file, stems)] = (file, list(groups.values()))
    if no_area:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(no_area.items()))
        log.warning("%s: %d LabelMe shapes enclose no area and are skipped (%s)", folder, sum(no_area.values()), kinds)
    records = []
    for i, path in enumerate(sorted(set(images) | set(annotated))):
        file, anns = annotated.get(path, (None, []))
        height, width = (file.height, file.width) if file is not None and file.height and file.width else (None, None)
        records.append(ImageRecord(i, path, height, width, anns))
    return RecordSet(records, [i + 1 for i in range(len(class_names))], dropped)
