"""``layout: auto``: which layout a dataset folder holds, decided from its contents.

Checked in this order, each in ``root`` and in its split folders: volumes (Decathlon / nnU-Net
``imagesTr/``, image and label folders of volume files, MedSAM2 npz; see
:func:`segtune.data.volumes.find_volume_layout`), a Roboflow export
(``<split>/_annotations.coco.json``), image and mask folders (``images/`` + ``masks/``), a COCO
json with an image folder, LabelMe jsons beside their images. A ``root`` that is itself one split
folder of a dataset whose other splits sit beside it is refused with the parent to point at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from segtune.data.coco import ANNOTATION_FILE, read_json
from segtune.data.images import image_files
from segtune.data.labelme import is_labelme
from segtune.data.volumes import find_volume_layout

#: Folder names that mean "a split" when ``root`` itself is called so.
SPLIT_NAMES = ("train", "training", "valid", "val", "validation", "test", "testing")


@dataclass(frozen=True)
class Layout:
    """A recognised layout.

    Args:
        name: the layout (as ``data.init_args.layout`` names it).
        found: what was found, for the log.
        annotation_file: coco: the json to read when it is not the configured ``annotation_file``.
        image_dir: coco: the image folder when it is not the configured ``image_dir`` (``"."``: ``root``).
    """

    name: Literal["roboflow", "coco", "masks", "labelme", "volumes"]
    found: str
    annotation_file: str | None = None
    image_dir: str | None = None


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and bool(image_files(folder))


def _is_labelme_folder(folder: Path) -> bool:
    """Whether ``folder``'s first json file (by name) is a LabelMe annotation."""
    first = next(iter(sorted(folder.glob("*.json"))), None) if folder.is_dir() else None
    if first is None:
        return False
    try:
        return is_labelme(read_json(first))
    except ValueError:
        return False


def _is_coco(path: Path) -> bool:
    try:
        data = read_json(path)
    except ValueError:
        return False
    return all(k in data for k in ("images", "annotations", "categories"))


def detect_layout(
    root: Path, splits: Sequence[str], image_dir: str = "images", mask_dir: str = "masks",
    annotation_file: str = "annotations.json",
) -> Layout:  # fmt: skip
    """The layout of the dataset folder ``root``.

    Args:
        root: the dataset folder.
        splits: the configured split names (train, validation, test, predict).
        image_dir: the configured image folder name (masks and coco layouts).
        mask_dir: the configured mask folder name.
        annotation_file: the configured single COCO json.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: one line, when ``root`` is one split of a dataset (naming the parent) or when no
            layout fits (listing what was looked for).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root folder not found")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())

    def pair_folders(folder: Path) -> bool:
        return (folder / image_dir).is_dir() and (folder / mask_dir).is_dir()

    def roboflow_split(folder: Path) -> bool:
        return (folder / ANNOTATION_FILE).is_file()

    volumes = find_volume_layout(root, list(splits), image_dir, mask_dir)
    if volumes is not None:
        return Layout("volumes", f"{volumes.kind}: {volumes.found}")
    if roboflow_split(root):
        _refuse_split_folder(root, splits, roboflow_split)
        return Layout("coco", f"{ANNOTATION_FILE} beside the images (one split, split by file)", ANNOTATION_FILE, ".")
    if exports := [p.name for p in subfolders if roboflow_split(p)]:
        return Layout("roboflow", f"{ANNOTATION_FILE} in {_folders(exports)}")
    if pair_folders(root):
        _refuse_split_folder(root, splits, pair_folders)
        return Layout("masks", f"{image_dir}/ and {mask_dir}/ (split by file)")
    if per_split := [p.name for p in subfolders if pair_folders(p)]:
        return Layout("masks", f"{image_dir}/ and {mask_dir}/ in {_folders(per_split)}")
    coco = _coco_layout(root, splits, image_dir, annotation_file)
    if coco is not None:
        return coco
    if _is_labelme_folder(root):
        _refuse_split_folder(root, splits, _is_labelme_folder)
        return Layout("labelme", "LabelMe jsons beside the images (split by file)")
    if labelme := [p.name for p in subfolders if _is_labelme_folder(p)]:
        return Layout("labelme", f"LabelMe jsons in {_folders(labelme)}")
    train = splits[0]
    images = image_files(root)
    contents = ", ".join(
        ([f"{len(images)} image files"] if images else [])
        + [f"{p.name}/" for p in subfolders[:6]]
        + [p.name for p in sorted(root.glob("*.json"))[:3]]
    )
    raise ValueError(
        f"{root}: no dataset layout recognised (it holds {contents or 'no image, folder or json'}); looked for "
        f"{train}/{ANNOTATION_FILE} (roboflow), {image_dir}/ and {mask_dir}/ here or in {train}/ (masks), "
        f"{train}.json or {annotation_file} or one COCO json with {image_dir}/ (coco), LabelMe .json files beside "
        "images here or in split folders (labelme), imagesTr/ or folders of .nii.gz/.nrrd/.mha/.npz volumes (volumes); "
        "set data.init_args.layout and the folder names"
    )


def _folders(names: list[str]) -> str:
    return ", ".join(f"{n}/" for n in names)


def _coco_layout(root: Path, splits: Sequence[str], image_dir: str, annotation_file: str) -> Layout | None:
    """A COCO json with an image folder: ``<split>.json``, ``annotation_file`` or the only COCO json in ``root``."""
    jsons = [f"{s}.json" for s in dict.fromkeys(splits) if (root / f"{s}.json").is_file()]
    chosen: str | None = None
    if not jsons and (root / annotation_file).is_file():
        jsons = [annotation_file]
    elif not jsons:
        candidates = sorted(root.glob("*.json"))
        if len(candidates) == 1 and _is_coco(candidates[0]):
            jsons = [chosen := candidates[0].name]
    if not jsons:
        return None
    images = None if (root / image_dir).is_dir() else "." if _has_images(root) else None
    where = f"{image_dir}/" if images is None else "images beside it"
    return Layout("coco", f"{', '.join(jsons)} with {where}", chosen, images)


def _refuse_split_folder(root: Path, splits: Sequence[str], same_kind: Callable[[Path], bool]) -> None:
    """Raise when ``root`` is named like a split and a sibling split folder holds the same layout."""
    names = {n.lower() for n in (*splits, *SPLIT_NAMES)}
    if root.name.lower() not in names:
        return
    siblings = sorted(
        p.name for p in root.parent.iterdir() if p != root and p.is_dir() and p.name.lower() in names and same_kind(p)
    )
    if siblings:
        raise ValueError(
            f"{root}: this is one split folder of a dataset ({root.parent} also holds {', '.join(siblings)}); "
            f"point data.init_args.root at {root.parent}"
        )
