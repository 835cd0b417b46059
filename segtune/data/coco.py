"""Reading COCO instance annotations (Roboflow exports) through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from segtune.data.images import FolderIndex
from segtune.data.records import ImageRecord, RecordSet

log = logging.getLogger(__name__)

ANNOTATION_FILE = "_annotations.coco.json"


def read_json(json_path: Path) -> dict:
    """Parse a json file whose top level is an object.

    Raises:
        FileNotFoundError, ValueError: with a one-line message naming the file.
    """
    try:
        with open(json_path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{json_path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: invalid json ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: expected a json object at the top level, got {type(data).__name__}")
    return data


def load_coco(json_path: Path, dataset: dict | None = None) -> COCO:
    """Parse a COCO json (or take its already parsed ``dataset``); annotations that cannot give a
    mask are logged and skipped.

    Raises:
        FileNotFoundError, ValueError: with a one-line message naming the file.
    """
    dataset = read_json(json_path) if dataset is None else dataset
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


def coco_records(coco: COCO, json_path: Path, image_dir: Path, class_names: list[str]) -> RecordSet:
    """Records for every image of ``coco``, with the annotations whose category is in ``class_names``.

    Image file names resolve inside ``image_dir``, case-insensitively with a warning when they
    must (``x.JPG`` in the json, ``x.jpg`` on disk). An annotation lying wholly outside its image
    is logged and skipped; one partly outside is clipped to the image by the rasterisation.

    Returns:
        The records (images with no annotation included, with an empty list), the json's category id
        of each class (the lowest id of that name, so prediction files line up with the ground
        truth in COCO tools) and the number of annotations dropped because their category is not
        selected.

    Raises:
        FileNotFoundError: naming the image a json entry points at when it is not there.
    """
    name_to_index = {n: i for i, n in enumerate(class_names)}
    id_to_index = {c["id"]: name_to_index.get(c["name"]) for c in coco.dataset["categories"]}
    files = FolderIndex(image_dir)
    records, dropped, outside = [], 0, []
    for img in coco.dataset["images"]:
        height, width = int(img["height"]), int(img["width"])
        anns = []
        for a in coco.imgToAnns.get(img["id"], []):
            if id_to_index.get(a["category_id"]) is None:
                dropped += 1
            elif not _inside(a["segmentation"], height, width):
                outside.append(a.get("id"))
            else:
                anns.append({**a, "class_index": id_to_index[a["category_id"]]})
        records.append(ImageRecord(img["id"], files.resolve(img["file_name"]), height, width, anns))
    files.report_case_fixes()
    if outside:
        log.warning(
            "%s: %d annotations lie outside their image (or their RLE has another size) and are skipped: ids %s",
            json_path, len(outside), outside[:10],
        )  # fmt: skip
    ids = {}
    for c in sorted(coco.dataset["categories"], key=lambda c: c["id"]):
        ids.setdefault(c["name"], c["id"])
    category_ids = [ids.get(name, i + 1) for i, name in enumerate(class_names)]
    return RecordSet(records, category_ids, dropped)


def _inside(segmentation: list | dict, height: int, width: int) -> bool:
    """Whether any part of a polygon lies in the image, or an RLE has the image's size."""
    if isinstance(segmentation, dict):
        return [int(v) for v in segmentation["size"]] == [height, width]
    xs = np.concatenate([np.asarray(p[0::2], dtype=float) for p in segmentation])
    ys = np.concatenate([np.asarray(p[1::2], dtype=float) for p in segmentation])
    return bool(xs.max() > 0 and ys.max() > 0 and xs.min() < width and ys.min() < height)


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
