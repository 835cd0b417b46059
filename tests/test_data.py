"""COCO export reading, prompts and the batch the collate function builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from segtune.data import Preprocessing, PromptConfig, SegmentationDataModule
from segtune.data.coco import ANNOTATION_FILE, class_names_of, load_coco

PRE = Preprocessing(256, "longest", 64)


def _datamodule(root: Path, **kwargs) -> SegmentationDataModule:
    return SegmentationDataModule(root=root, batch_size=4, preprocessing=PRE, **kwargs)


def test_synthetic_export_is_a_roboflow_coco_export(shapes_root: Path) -> None:
    for split, count in (("train", 8), ("valid", 4), ("test", 4)):
        coco = COCO(str(shapes_root / split / ANNOTATION_FILE))
        assert len(coco.imgs) == count == len(list((shapes_root / split).glob("*.jpg")))
        assert all(len(a["segmentation"][0]) >= 6 for a in coco.anns.values())
        assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == {0: "shapes", 1: "star", 2: "cross"}
        assert all(coco.imgToAnns[i] for i in coco.imgs)  # every image has a shape


def test_class_names_drop_roboflow_parent(shapes_root: Path) -> None:
    assert class_names_of(load_coco(shapes_root / "train" / ANNOTATION_FILE)) == ["star", "cross"]
    assert _datamodule(shapes_root).class_names == ["star", "cross"]


def test_batch_shapes_and_contract(shapes_root: Path) -> None:
    dm = _datamodule(shapes_root, prompts=PromptConfig(kind="box+points", positive_points=2, negative_points=1))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b, n = batch["prompt_valid"].shape
    assert batch["pixel_values"].shape == (b, 3, 256, 256)
    assert batch["input_boxes"].shape == (b, n, 4)
    assert batch["input_points"].shape == (b, n, 3, 2) and batch["input_labels"].shape == (b, n, 3)
    assert batch["low_res_masks"].shape == (b, n, 64, 64)
    assert len(batch["masks"]) == b and batch["masks"][0].shape[1:] == (240, 320)
    assert batch["original_sizes"].tolist() == [[240, 320]] * b
    assert batch["reshaped_sizes"].tolist() == [[192, 256]] * b
    valid = batch["prompt_valid"]
    assert (batch["category_ids"][~valid] == -1).all() and (batch["category_ids"][valid] >= 0).all()
    assert (batch["input_labels"][~valid] == -10).all()
    # positive points fall inside their instance's mask
    scale = 320 / 256
    for i, masks in enumerate(batch["masks"]):
        for j in range(len(masks)):
            x, y = (batch["input_points"][i, j, 0] * scale).long().tolist()
            assert masks[j, min(y, 239), min(x, 319)]


def test_evaluation_prompts_are_deterministic(shapes_root: Path) -> None:
    prompts = PromptConfig(kind="box+points", positive_points=3, negative_points=2)
    first, second = _datamodule(shapes_root, prompts=prompts), _datamodule(shapes_root, prompts=prompts)
    first.setup("validate")
    second.setup("validate")
    a, b = next(iter(first.val_dataloader())), next(iter(second.val_dataloader()))
    assert torch.equal(a["input_points"], b["input_points"]) and torch.equal(a["input_boxes"], b["input_boxes"])
    # evaluation boxes are the tight boxes, never jittered
    expected = a["boxes"] * (256 / 320)
    assert torch.allclose(a["input_boxes"][a["prompt_valid"]], expected[a["prompt_valid"]])


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / ANNOTATION_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"_annotations\.coco\.json: invalid json"):
        load_coco(tmp_path / "train" / ANNOTATION_FILE)


def test_undecodable_annotations_are_skipped_and_empty_images_counted(
    shapes_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "export"
    shutil.copytree(shapes_root, root)
    path = root / "valid" / ANNOTATION_FILE
    data = json.loads(path.read_text())
    first_image = data["images"][0]["id"]
    for ann in data["annotations"]:
        if ann["image_id"] == first_image:
            ann["segmentation"] = []
    data["annotations"][-1]["segmentation"] = [[1, 2, 3, 4]]  # a 2-point polygon
    path.write_text(json.dumps(data))
    dm = _datamodule(root)
    with caplog.at_level("INFO"):
        dm.setup("validate")
    text = caplog.text
    assert "empty segmentation" in text and "no polygon with 3 or more points" in text
    assert "images have no annotation and are skipped" in text
    assert first_image not in [r.image_id for r in dm.datasets["validate"].records]
