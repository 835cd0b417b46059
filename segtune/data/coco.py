"""Reading COCO instance annotations (Roboflow exports) through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

log = logging.getLogger(__name__)

ANNOTATION_FILE = "_annotations.coco.json"


@dataclass
class ImageRecord:
    """One image and its instance annotations, as read from the json."""

    image_id: int
    path: Path
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)


def load_coco(json_path: Path) -> COCO:
    """Parse a COCO json; annotations that cannot give a mask are logged and skipped.

    Raises:
        FileNotFoundError, ValueError: with a one-line message naming the file.
    """
    try:
        with open(json_path) as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{json_path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: invalid json ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise ValueError(f"{json_path}: not a COCO instances file (missing {', '.join(missing)})")
    kept = []
    for ann in dataset["annotations"]:
        problem = annotation_problem(ann)
        if problem:
            log.warning("%s: annotation %s skipped: %s", json_path, ann.get("id"), problem)
        else:
            kept.append(ann)
    dataset["annotations"] = kept
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def class_names_of(coco: COCO) -> list[str]:
    """Category names to train on, without Roboflow's unused parent category.

    Roboflow exports add a category (id 0) named after the dataset whose name is the
    ``supercategory`` of every real category; no annotation uses it.
    """
    cats = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    supers = {c.get("supercategory") for c in cats}
    names: list[str] = []
    for c in cats:
        if c["name"] in supers and c["id"] not in used:
            continue
        if c["name"] not in names:  # Roboflow may repeat a name under two ids: one class
            names.append(c["name"])
    return names


def read_records(coco: COCO, image_dir: Path, class_names: list[str]) -> tuple[list[ImageRecord], int]:
    """Records for the images whose annotations fall in ``class_names``.

    Returns:
        The records (images with no annotation included, with an empty list) and the number of
        annotations dropped because their category is not selected.
    """
    id_to_name = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    keep = set(class_names)
    records, dropped = [], 0
    for img in coco.dataset["images"]:
        anns = []
        for a in coco.imgToAnns.get(img["id"], []):
            if id_to_name.get(a["category_id"]) in keep:
                anns.append(a)
            else:
                dropped += 1
        records.append(
            ImageRecord(img["id"], image_dir / img["file_name"], int(img["height"]), int(img["width"]), anns)
        )
    return records, dropped


def annotation_mask(coco: COCO, ann: dict) -> np.ndarray:
    """Decode one annotation (polygons, RLE or crowd RLE) to an ``[H, W]`` bool mask."""
    return coco.annToMask(ann).astype(bool)


def annotation_problem(ann: dict) -> str | None:
    """Why an annotation cannot give a mask, or None when it can.

    Polygons with fewer than 3 points are dropped from an instance; an instance left with no
    polygon (or an empty ``segmentation``) cannot be decoded.
    """
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return None if "counts" in seg and "size" in seg else "RLE without counts/size"
    if not seg:
        return "empty segmentation"
    polys = [p for p in seg if len(p) >= 6]
    if not polys:
        return "no polygon with 3 or more points"
    ann["segmentation"] = polys
    return None
