"""Data as it is downloaded: mask names that differ from image names, `layout: auto`, LabelMe
folders, and a root that is one split of a dataset. Every file is written by the test (tiny images)."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtune.data import Preprocessing, SegmentationDataModule
from segtune.data.coco import ANNOTATION_FILE
from segtune.data.layouts import detect_layout
from segtune.data.masks import pair_images_and_masks

PRE = Preprocessing(64, "longest", 16)
H, W = 32, 48
SPLITS = ["train", "valid", "test"]


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _square(i: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[4 + i : 20 + i, 6 + i : 30 + i] = 1
    return mask


def _save_mask(mask01: np.ndarray, path: Path, kind: str) -> None:
    """A 0/1 mask saved as ``kind``: 0/255 grey (png, tif, gif) or a colour palette PNG (``palette``)."""
    if kind == "palette":
        im = Image.fromarray(mask01, mode="L").convert("P")
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 drawn red, as annotation tools export
        im.save(path)
        assert Image.open(path).mode == "P"
    elif path.suffix == ".gif":
        Image.fromarray(mask01 * 255).convert("P").save(path)
    else:
        Image.fromarray(mask01 * 255).save(path)


def _mask_folder(root: Path, image_name: str, mask_name: str, n: int = 3, kind: str = "grey") -> None:
    """``images/`` and ``masks/`` with ``n`` pairs; ``{i}`` in the names is the case number."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(_image(i)).save(root / "images" / image_name.format(i=i))
        _save_mask(_square(i), root / "masks" / mask_name.format(i=i), kind)


# --- pairing by name ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image_name", "mask_name", "pair_key", "kind"),
    [
        ("{i}_training.tif", "{i}_manual1.gif", r"^(\d+)_", "grey"),  # DRIVE: TIFF images, GIF masks
        ("ISIC_000000{i}.jpg", "ISIC_000000{i}_segmentation.png", None, "grey"),  # ISIC
        ("00{i}_HC.png", "00{i}_HC_Annotation.png", None, "palette"),  # HC18, any case of the ending
        ("case{i}.png", "case{i}_mask.tif", None, "grey"),
    ],
    ids=["drive-pair-key", "isic", "hc18-palette", "mask-suffix-tiff"],
)
def test_mask_names_pair_without_renaming(
    image_name: str, mask_name: str, pair_key: str | None, kind: str, tmp_path: Path
) -> None:
    _mask_folder(tmp_path, image_name, mask_name, kind=kind)
    pairs = pair_images_and_masks(tmp_path / "images", tmp_path / "masks", pair_key)
    assert [(i.name, m.name if m else None) for i, m in pairs] == [
        (image_name.format(i=i), mask_name.format(i=i)) for i in range(3)
    ]
    dm = SegmentationDataModule(
        tmp_path, pair_key=pair_key, split_fractions=(0.0, 1.0, 0.0), preprocessing=PRE
    )  # layout: auto
    dm.setup("validate")
    assert dm.layout == "masks"
    case_of = {image_name.format(i=i): i for i in range(3)}
    for sample in (dm.datasets["validate"][i] for i in range(3)):  # each mask decodes to its own square
        np.testing.assert_array_equal(sample["masks"][0].numpy(), _square(case_of[sample["file_name"]]).astype(bool))


def test_names_that_pair_not_at_all_stop_with_examples_and_the_option(tmp_path: Path) -> None:
    _mask_folder(tmp_path, "{i}_training.tif", "{i}_manual1.gif")
    with pytest.raises(ValueError) as error:
        pair_images_and_masks(tmp_path / "images", tmp_path / "masks")
    message = str(error.value)
    assert "no image pairs with a mask" in message and "0_training.tif" in message and "0_manual1.gif" in message
    assert "data.init_args.pair_key" in message and "'^([^_]+)_' pairs 3 of 3" in message  # a key that works
    with pytest.raises(ValueError, match="pair_key: '\\(' is not a regular expression"):
        SegmentationDataModule(tmp_path, pair_key="(", preprocessing=PRE)


def test_names_that_pair_only_partly_are_counted_with_examples(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _mask_folder(tmp_path, "case{i}.png", "case{i}_mask.png", n=4)
    (tmp_path / "masks" / "case3_mask.png").rename(tmp_path / "masks" / "case3-ground-truth.png")
    with caplog.at_level(logging.WARNING):
        pairs = pair_images_and_masks(tmp_path / "images", tmp_path / "masks")
    assert sum(m is not None for _, m in pairs) == 3
    assert "1 of 4 images pair with no mask in" in caplog.text and "1 mask files have no image" in caplog.text
    assert "case3.png" in caplog.text and "case3-ground-truth.png" in caplog.text and "pair_key" in caplog.text


# --- LabelMe ------------------------------------------------------------------------------------------
def _labelme(folder: Path, name: str, shapes: list[dict], image_data: bool = False, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(seed)).save(folder / f"{name}.jpg")
    data = {
        "version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": f"{name}.jpg", "imageHeight": H,
        "imageWidth": W,
        "imageData": base64.b64encode((folder / f"{name}.jpg").read_bytes()).decode() if image_data else None,
    }  # fmt: skip
    (folder / f"{name}.json").write_text(json.dumps(data))


def _shape(label: str, points: list, kind: str = "polygon", group: int | None = None) -> dict:
    return {"label": label, "points": points, "shape_type": kind, "group_id": group, "flags": {}}


POLYGON = [[5, 5], [20, 5], [20, 15], [5, 15]]
RECTANGLE = [[30, 20], [40, 28]]


def _labelme_folder(folder: Path, n: int = 3) -> None:
    for i in range(n):
        _labelme(folder, f"img{i}", [_shape("cell", POLYGON), _shape("nucleus", RECTANGLE, "rectangle")],
                 image_data=i % 2 == 1, seed=i)  # fmt: skip


def test_labelme_polygons_rectangles_groups_and_labels_as_classes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shapes = [
        _shape("tumour", POLYGON, group=1),
        _shape("tumour", [[30, 2], [44, 2], [44, 10]], group=1),  # the same instance in two parts
        _shape("cell", RECTANGLE, "rectangle"),
        _shape("cell", [[1, 1]], "point"),  # no area: counted and skipped
    ]
    _labelme(tmp_path / "train", "a", shapes, image_data=True)
    _labelme(tmp_path / "valid", "b", [_shape("cell", POLYGON)])
    Image.fromarray(_image(5)).save(tmp_path / "train" / "unlabelled.jpg")  # no json: skipped, counted
    dm = SegmentationDataModule(tmp_path, preprocessing=PRE)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert dm.layout == "labelme" and dm.class_names == ["cell", "tumour"]
    assert "1 LabelMe shapes enclose no area" in caplog.text and "1 point" in caplog.text
    assert "1 of 2 images have no annotation" in caplog.text
    sample = dm.datasets["fit"][0]
    assert sample["file_name"] == "a.jpg" and sorted(sample["category_ids"].tolist()) == [0, 1]
    masks = {c: m.numpy() for c, m in zip(sample["category_ids"].tolist(), sample["masks"], strict=True)}
    assert masks[1][8, 10] and masks[1][4, 40] and not masks[1][20, 35]  # both parts of the tumour
    assert masks[0][24, 35] and masks[0].sum() == pytest.approx(10 * 8, abs=20)  # the rectangle
    # selecting classes by name drops the others
    only = SegmentationDataModule(tmp_path, categories=["tumour"], val_split="train", preprocessing=PRE)
    only.setup("validate")
    assert only.datasets["validate"][0]["category_ids"].tolist() == [0]


def test_labelme_json_whose_image_is_missing_names_it(tmp_path: Path) -> None:
    _labelme_folder(tmp_path / "train", 2)
    (tmp_path / "train" / "img1.jpg").unlink()
    dm = SegmentationDataModule(tmp_path, val_split="train", preprocessing=PRE)
    with pytest.raises(FileNotFoundError, match=r"img1\.json: its image img1\.jpg is not beside it \(segtune reads"):
        dm.setup("validate")


# --- layout: auto ---------------------------------------------------------------------------------------
def _coco_json(names: list[str]) -> dict:
    square = [[6, 4, 30, 4, 30, 20, 6, 20]]
    return {
        "images": [{"id": i, "file_name": n, "height": H, "width": W} for i, n in enumerate(names)],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "segmentation": square, "bbox": [6, 4, 24, 16], "area": 384}
            for i in range(len(names))
        ],
        "categories": [{"id": 1, "name": "lesion"}],
    }


def _write_coco(root: Path, json_name: str, image_folder: str = "images", n: int = 10) -> None:
    (root / image_folder).mkdir(parents=True, exist_ok=True)
    names = [f"s{i}.png" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(_image(i)).save(root / image_folder / name)
    (root / json_name).write_text(json.dumps(_coco_json(names)))


def _roboflow(root: Path) -> None:
    for split in SPLITS:
        _write_coco(root / split, ANNOTATION_FILE, ".", n=2)


def _masks_here(root: Path) -> None:
    _mask_folder(root, "c{i}.png", "c{i}.png", n=10)


def _masks_per_split(root: Path) -> None:
    for split in SPLITS:
        _mask_folder(root / split, "c{i}.png", "c{i}_mask.png", n=2)


def _coco_annotations(root: Path) -> None:
    _write_coco(root, "annotations.json")


def _coco_any_name(root: Path) -> None:
    _write_coco(root, "instances_default.json")  # CVAT's COCO export name


def _labelme_here(root: Path) -> None:
    _labelme_folder(root, 10)


def _labelme_per_split(root: Path) -> None:
    for split in SPLITS:
        _labelme_folder(root / split, 2)


def _one_roboflow_split(root: Path) -> None:
    _write_coco(root, ANNOTATION_FILE, ".")  # a lone export folder: its json, split by file


LAYOUTS = {
    "roboflow": (_roboflow, "roboflow"),
    "masks in root": (_masks_here, "masks"),
    "masks per split": (_masks_per_split, "masks"),
    "coco annotations.json": (_coco_annotations, "coco"),
    "coco json of any name": (_coco_any_name, "coco"),
    "labelme in root": (_labelme_here, "labelme"),
    "labelme per split": (_labelme_per_split, "labelme"),
    "one roboflow split folder": (_one_roboflow_split, "coco"),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_auto_recognises_each_layout_and_reads_it(case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write, expected = LAYOUTS[case]
    root = tmp_path / "dataset"
    write(root)
    dm = SegmentationDataModule(root, preprocessing=PRE)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert dm.layout == expected
    assert f"layout {expected} (found" in caplog.text
    assert len(dm.datasets["fit"]) >= 2 and len(dm.datasets["validate"]) >= 1
    assert dm.datasets["fit"][0]["masks"].shape[0] >= 1


def test_a_folder_that_fits_no_layout_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    Image.fromarray(_image(0)).save(tmp_path / "scans" / "x.png")
    Image.fromarray(_image(1)).save(tmp_path / "y.png")  # images alone: nothing says where their masks are
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ValueError) as error:
        detect_layout(tmp_path, SPLITS)
    message = str(error.value)
    assert (
        "\n" not in message and "no dataset layout recognised (it holds 1 image files, scans/, notes.json)" in message
    )
    for looked_for in (f"train/{ANNOTATION_FILE}", "images/ and masks/", "annotations.json", "LabelMe"):
        assert looked_for in message


def test_a_root_that_is_one_split_names_the_parent(tmp_path: Path) -> None:
    _roboflow(tmp_path / "export")
    with pytest.raises(ValueError, match=r"export/train: this is one split folder of a dataset .*holds test, valid\)"
                       r"; point data.init_args.root at .*export$"):  # fmt: skip
        detect_layout(tmp_path / "export" / "train", SPLITS)
    _masks_per_split(tmp_path / "masks")
    with pytest.raises(ValueError, match="point data.init_args.root at"):
        detect_layout(tmp_path / "masks" / "valid", SPLITS)
