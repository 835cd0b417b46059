"""Reading COCO instance annotations (Roboflow exports) through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from segtune.data.images import FolderIndex, check_name
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
    ids: dict[Any, str] = {}
    for img in dataset["images"]:  # two images of one id would each get both images' annotations
        other = ids.setdefault(img.get("id"), img.get("file_name"))
        if other != img.get("file_name"):
            raise ValueError(
                f"{json_path}: images {other} and {img.get('file_name')} have the same id {img.get('id')}; "
                "image ids must be unique (annotations find their image by id)"
            )
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
    records, dropped, outside, unknown = [], 0, [], {}
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    unselected: set[str] = set()
    for img in coco.dataset["images"]:
        height, width = int(img["height"]), int(img["width"])
        anns = []
        for a in coco.imgToAnns.get(img["id"], []):
            if a["category_id"] not in id_to_index:
                unknown.setdefault(a["category_id"], []).append(a.get("id"))
            elif id_to_index[a["category_id"]] is None:
                dropped += 1
                unselected.add(str(names[a["category_id"]]))
            elif not _inside(a["segmentation"], height, width):
                outside.append(a.get("id"))
            else:
                anns.append({**a, "class_index": id_to_index[a["category_id"]]})
        path = files.resolve(img["file_name"])
        check_name(path)
        records.append(ImageRecord(img["id"], path, height, width, anns))
    files.report_case_fixes()
    if unknown:
        skipped = [i for ann_ids in unknown.values() for i in ann_ids]
        log.warning(
            "%s: %d annotations have a category_id that is not in the json's categories and are skipped: "
            "category ids %s (annotation ids %s); the categories are %s",
            json_path, len(skipped), sorted(unknown, key=str)[:10], skipped[:10],
            names,
        )  # fmt: skip
    if dropped:
        log.info(
            "%s: %d annotations of categories %s ignored: not among the classes %s (data.init_args.categories)",
            json_path, dropped, sorted(unselected), class_names,
        )  # fmt: skip
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


def _rle_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``)."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            c = ord(counts[position]) - 48
            value |= (c & 0x1F) << 5 * shift
            more = bool(c & 0x20)
            position += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << 5 * shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _rle_problem(rle: dict) -> str | None:
    """Why an RLE cannot be decoded as it says, or None: run lengths must sum to height x width
    (pycocotools decodes other sums from uninitialised memory: a different mask on every read)."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
        runs = _rle_counts(counts) if isinstance(counts, str) else [int(v) for v in counts]
    except (TypeError, ValueError, IndexError):
        return "RLE counts/size that are not numbers (or a COCO RLE string)"
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        return f"RLE counts sum to {sum(runs)}, not height x width = {height * width}"
    return None


def annotation_problem(ann: dict) -> str | None:
    """Why an annotation cannot give a mask, or None when it can.

    Polygons with fewer than 3 points are dropped from an instance; an instance left with no
    polygon (or an empty ``segmentation``) cannot be decoded.
    """
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE without counts/size"
        return _rle_problem(seg)
    if not seg:
        return "empty segmentation"
    odd = [len(p) for p in seg if len(p) % 2]
    if odd:  # x, y pairs shifted by one: the polygon would train as another shape
        return f"a polygon has an odd number of coordinates ({odd[0]}): x, y pairs expected"
    polys = [p for p in seg if len(p) >= 6]
    if not polys:
        return "no polygon with 3 or more points"
    ann["segmentation"] = polys
    return None
