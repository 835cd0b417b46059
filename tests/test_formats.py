"""Every file format and layout the DataModule reads, and each kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segtune.data import Preprocessing, SegmentationDataModule
from segtune.data.images import read_image
from segtune.data.intensity import IntensityPolicy, to_model_range
from segtune.data.masks import MaskFormat, read_instances
from segtune.data.records import decode_segmentation

PRE = Preprocessing(256, "longest", 64)
H, W = 48, 64


def _blob(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


# --- mask files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["png01", "png255", "jpeg", "gif_palette", "bmp", "tiff"])
def test_binary_mask_encodings(encoding: str, tmp_path: Path) -> None:
    truth = _blob(10, 12, 40, 50)
    suffix = {"png01": ".png", "png255": ".png", "jpeg": ".jpg", "gif_palette": ".gif", "bmp": ".bmp"}
    path = tmp_path / f"m{suffix.get(encoding, '.tif')}"
    values = truth.astype(np.uint8) * (1 if encoding == "png01" else 255)
    if encoding == "gif_palette":
        Image.fromarray(values).convert("P").save(path)
        assert Image.open(path).mode == "P"
    else:
        Image.fromarray(values).save(path, **({"quality": 60} if encoding == "jpeg" else {}))
    masks, classes = read_instances(path, MaskFormat(), (H, W))
    assert classes == [0] and len(masks) == 1
    if encoding == "jpeg":  # lossy: the threshold recovers the shape up to a fringe
        assert (masks[0] == truth).mean() > 0.99
    else:
        np.testing.assert_array_equal(masks[0], truth)


def test_index_masks_semantic_and_components(tmp_path: Path) -> None:
    index = np.zeros((H, W), np.uint8)
    index[_blob(2, 2, 10, 10)] = 1
    index[_blob(20, 5, 30, 15)] = 2
    index[_blob(20, 40, 30, 60)] = 2
    index[0, 63] = 2  # one-pixel speckle
    path = tmp_path / "m.png"
    Image.fromarray(index).save(path)
    masks, classes = read_instances(path, MaskFormat(kind="index"), (H, W))
    assert classes == [0, 1] and [int(m.sum()) for m in masks] == [64, 301]
    masks, classes = read_instances(path, MaskFormat(kind="index", instances="components", min_area=4), (H, W))
    assert classes == [0, 1, 1] and sorted(int(m.sum()) for m in masks) == [64, 100, 200]
    # a VOC-style colour palette keeps its indices as classes
    voc = Image.fromarray(index, mode="L").convert("P")
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    voc.save(tmp_path / "voc.png")
    assert read_instances(tmp_path / "voc.png", MaskFormat(kind="index"), (H, W))[1] == [0, 1]


def test_mask_of_another_size_names_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"m\.png: mask is 10x10 but its image is 64x48"):
        read_instances(tmp_path / "m.png", MaskFormat(), (H, W))


# --- image files and the intensity policy ----------------------------------------------------------------
def test_image_formats_become_three_channels(tmp_path: Path) -> None:
    rgb = _image()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((H, W), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.gif")
    for name in ("a.png", "a.bmp", "rgba.png"):
        out = to_model_range(read_image(tmp_path / name), IntensityPolicy(), name)
        assert out.dtype == np.uint8 and out.shape == (H, W, 3)
        np.testing.assert_array_equal(out, rgb)  # 8-bit data passes through exactly
    grey = to_model_range(read_image(tmp_path / "grey.png"), IntensityPolicy())
    np.testing.assert_array_equal(grey, np.repeat(rgb[:, :, :1], 3, axis=2))
    assert to_model_range(read_image(tmp_path / "p.gif"), IntensityPolicy()).shape == (H, W, 3)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_images_keep_their_range(suffix: str, tmp_path: Path) -> None:
    ramp = np.linspace(1000, 61000, H * W).reshape(H, W).astype(np.uint16)
    cv2.imwrite(str(tmp_path / f"x{suffix}"), ramp)
    raw = read_image(tmp_path / f"x{suffix}")
    assert raw.dtype == np.uint16 and raw.max() == 61000
    out = to_model_range(raw, IntensityPolicy())
    assert out.dtype == np.float32 and out.shape == (H, W, 3)
    # min-max over the 16-bit range: thousands of distinct levels survive, not 256
    assert out.min() == 0.0 and out.max() == 1.0 and len(np.unique(out[:, :, 0])) > 1000
    window = to_model_range(raw, IntensityPolicy(mode="window", window=(1000, 31000)))
    np.testing.assert_allclose(window[:, :, 0], np.clip((raw - 1000.0) / 30000.0, 0, 1), atol=1e-6)


def test_float_tiff_and_percentile_policy(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(H, W)).astype(np.float32)
    data[0, 0] = 1e6  # a hot pixel
    cv2.imwrite(str(tmp_path / "f.tif"), data)
    raw = read_image(tmp_path / "f.tif")
    assert raw.dtype == np.float32
    minmax = to_model_range(raw, IntensityPolicy(mode="minmax"))
    robust = to_model_range(raw, IntensityPolicy(mode="percentile", percentiles=(1, 99)))
    assert np.median(minmax) < 0.01 < 0.3 < np.median(robust) < 0.7


def test_bad_intensity_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        IntensityPolicy(mode="window")


# --- COCO annotations -------------------------------------------------------------------------------------
def _coco(images: list[tuple[str, list[dict]]], categories: list[dict] | None = None) -> dict:
    data = {"images": [], "annotations": [], "categories": categories or [{"id": 1, "name": "lesion"}]}
    for i, (name, anns) in enumerate(images):
        data["images"].append({"id": i, "file_name": name, "height": H, "width": W})
        for a in anns:
            data["annotations"].append({"id": len(data["annotations"]), "image_id": i, "category_id": 1, **a})
    return data


SQUARE = {"segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]}


def test_rle_and_crowd_rle_decode_like_polygons() -> None:
    truth = decode_segmentation(SQUARE["segmentation"], H, W)
    compressed = mask_utils.encode(np.asfortranarray(truth.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    np.testing.assert_array_equal(decode_segmentation(compressed, H, W), truth)
    # uncompressed (crowd) RLE: run lengths in column-major order
    flat = truth.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    np.testing.assert_array_equal(decode_segmentation({"size": [H, W], "counts": counts}, H, W), truth)
    # two polygons of one instance
    two = decode_segmentation([[0, 0, 4, 0, 4, 4, 0, 4], [40, 40, 44, 40, 44, 44, 40, 44]], H, W)
    assert two[:4, :4].all() and two[40:44, 40:44].all() and two.sum() == 32


def _write_plain_coco(root: Path, names: list[str]) -> None:
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(_image(i)).save(root / "images" / name)
    (root / "annotations.json").write_text(json.dumps(_coco([(n, [SQUARE]) for n in names])))


def test_plain_coco_layout_split_by_file_and_by_json(tmp_path: Path) -> None:
    names = [f"img{i:02d}.png" for i in range(20)]
    _write_plain_coco(tmp_path, names)
    dm = SegmentationDataModule(tmp_path, layout="coco", preprocessing=PRE)
    dm.setup("fit")
    dm.setup("test")
    parts = [{r.path.name for r in dm.datasets[s].records} for s in ("fit", "validate", "test")]
    assert [len(p) for p in parts] == [16, 2, 2]
    assert set().union(*parts) == set(names) and not parts[0] & parts[1] and not parts[0] & parts[2]
    again = SegmentationDataModule(tmp_path, layout="coco", preprocessing=PRE)
    again.setup("test")
    assert {r.path.name for r in again.datasets["test"].records} == parts[2]  # the split never moves
    # one json per split wins over splitting the single file
    (tmp_path / "test.json").write_text(json.dumps(_coco([(names[0], [SQUARE])])))
    per_split = SegmentationDataModule(tmp_path, layout="coco", preprocessing=PRE)
    per_split.setup("test")
    assert [r.path.name for r in per_split.datasets["test"].records] == [names[0]]
    assert per_split.class_names == ["lesion"]


def test_file_name_case_resolves_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_plain_coco(tmp_path, ["scan.jpg"] * 1)
    data = json.loads((tmp_path / "annotations.json").read_text())
    data["images"][0]["file_name"] = "SCAN.JPG"
    (tmp_path / "test.json").write_text(json.dumps(data))
    dm = SegmentationDataModule(tmp_path, layout="coco", preprocessing=PRE)
    with caplog.at_level(logging.WARNING):
        dm.setup("test")
    assert "differ from the files only in case" in caplog.text and "SCAN.JPG -> scan.jpg" in caplog.text
    assert dm.datasets["test"][0]["masks"].shape == (1, H, W)


@pytest.mark.parametrize(
    ("problem", "error"),
    [
        ("missing", r"nothere\.png: image file not found"),
        ("corrupt", r"img00\.png: cannot read image"),
        ("size", r"img00\.png: image is 64x48 but the json says 80x48"),
    ],
)
def test_bad_image_files_name_the_file(problem: str, error: str, tmp_path: Path) -> None:
    _write_plain_coco(tmp_path, ["img00.png"])
    data = json.loads((tmp_path / "annotations.json").read_text())
    if problem == "missing":
        data["images"][0]["file_name"] = "nothere.png"
    elif problem == "corrupt":
        (tmp_path / "images" / "img00.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    else:
        data["images"][0]["width"] = 80
    (tmp_path / "test.json").write_text(json.dumps(data))
    dm = SegmentationDataModule(tmp_path, layout="coco", preprocessing=PRE)
    with pytest.raises((FileNotFoundError, ValueError), match=error):
        dm.setup("test")
        dm.datasets["test"][0]


def test_annotations_outside_the_image_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = {"segmentation": [[100, 100, 120, 100, 120, 120]]}
    partly = {"segmentation": [[50, 30, 90, 30, 90, 60, 50, 60]]}
    _write_plain_coco(tmp_path, ["img00.png"])
    (tmp_path / "test.json").write_text(json.dumps(_coco([("img00.png", [SQUARE, outside, partly])])))
    dm = SegmentationDataModule(tmp_path, layout="coco", preprocessing=PRE)
    with caplog.at_level(logging.WARNING):
        dm.setup("test")
    assert "1 annotations lie outside their image" in caplog.text
    sample = dm.datasets["test"][0]
    assert sample["masks"].shape[0] == 2
    assert sample["boxes"][1].tolist() == [50.0, 30.0, 64.0, 48.0]  # clipped to the image


# --- image/mask folders -----------------------------------------------------------------------------------
def _write_mask_folder(root: Path, n: int, mask_suffix: str = ".png", orphan: bool = False) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(_image(i)).save(root / "images" / f"case{i:02d}.jpg")
        mask = _blob(5 + i % 5, 8, 30, 40 + i % 7).astype(np.uint8) * 255
        Image.fromarray(mask).save(root / "masks" / f"CASE{i:02d}{mask_suffix}")
    if orphan:
        Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / "lonely.png")


def test_mask_folders_pair_by_stem_and_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_mask_folder(tmp_path, 10, orphan=True)
    (tmp_path / "images" / "nomask.jpg").write_bytes((tmp_path / "images" / "case00.jpg").read_bytes())
    dm = SegmentationDataModule(
        tmp_path, layout="masks", categories=["polyp"], split_fractions=(0.6, 0.2, 0.2), preprocessing=PRE
    )
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
        dm.setup("test")
    assert "1 mask files have no image" in caplog.text
    assert "have no annotation and are skipped" in caplog.text
    sizes = [len(dm.datasets[s]) for s in ("fit", "validate", "test")]
    assert sum(sizes) == 10 and sizes[0] >= 6  # nomask.jpg takes a place in the split but has no prompt
    sample = dm.datasets["validate"][0]
    assert sample["category_ids"].tolist() == [0] and sample["masks"].shape[1:] == (H, W)
    assert dm.class_names == ["polyp"]


def test_mask_folders_per_split(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        _write_mask_folder(tmp_path / split, 3, mask_suffix=".gif")
    dm = SegmentationDataModule(tmp_path, layout="masks", preprocessing=PRE)
    dm.setup("fit")
    assert len(dm.datasets["fit"]) == 3 and len(dm.datasets["validate"]) == 3
    assert dm.class_names == ["foreground"]


def test_empty_mask_gives_a_padding_prompt(tmp_path: Path) -> None:
    _write_mask_folder(tmp_path / "train", 2)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "train" / "masks" / "CASE01.png")
    dm = SegmentationDataModule(tmp_path, layout="masks", train_split="train", val_split="train", preprocessing=PRE)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["prompt_valid"].tolist() == [[True], [False]]


# --- prompts ----------------------------------------------------------------------------------------------
def test_box_jitter_in_pixels() -> None:
    from segtune.data.prompts import jitter_box

    box = np.array([100.0, 100.0, 300.0, 200.0], np.float32)
    rng = np.random.default_rng(0)
    moved = np.stack([jitter_box(box, 5, (1000, 1000), rng, "pixels") for _ in range(200)])
    assert np.abs(moved - box).max() <= 5 and np.abs(moved - box).max() > 4


# --- through the CLI ----------------------------------------------------------------------------------
def test_mask_folder_fit_with_yaml_augmentations_then_predict_from_a_boxes_json(
    run_cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "polyps"
    _write_mask_folder(data, 10, mask_suffix=".jpg")
    config = tmp_path / "masks.yaml"
    config.write_text(
        f"""
data:
  class_path: segtune.data.SegmentationDataModule
  init_args:
    root: {data}
    layout: masks
    categories: [polyp]
    batch_size: 2
    mask_format: {{threshold: 100, instances: components}}
    augmentations:
      - class_path: albumentations.HorizontalFlip
        init_args: {{p: 1.0}}
      - class_path: albumentations.RandomBrightnessContrast
"""
    )
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", quickstart, "--config", config, "--print_config")
    printed = capsys.readouterr().out
    assert "albumentations.HorizontalFlip" in printed and "layout: masks" in printed
    run_cli("fit", "--config", quickstart, "--config", config, "--trainer.fast_dev_run", "2")

    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps({"case00": {"bbox": [{"label": "polyp", "xmin": 8, "ymin": 5, "xmax": 40, "ymax": 30}]}})
    )
    dm = SegmentationDataModule(
        data, layout="masks", predict_images=data / "images", predict_prompts=boxes, preprocessing=PRE
    )
    dm.setup("predict")
    records = dm.datasets["predict"].records
    assert len(records) == 10 and [len(r.boxes) for r in records].count(1) == 1  # the others get no prompt
    batch = next(iter(dm.predict_dataloader()))
    assert batch["input_boxes"].shape == (4, 1, 4) and batch["prompt_valid"].tolist() == [
        [True],
        [False],
        [False],
        [False],
    ]
    run_cli(
        "predict", "--config", quickstart, "--config", config,
        "--data.init_args.predict_images", data / "images", "--data.init_args.predict_prompts", boxes,
    )  # fmt: skip


def test_predict_images_without_prompts_ask_for_automatic_masks(tmp_path: Path) -> None:
    _write_mask_folder(tmp_path, 2)
    dm = SegmentationDataModule(tmp_path, layout="masks", predict_images=tmp_path / "images", preprocessing=PRE)
    assert dm.automatic_masks
    dm.setup("predict")
    assert len(dm.datasets["predict"].records) == 2  # every image, none with a prompt
    assert not next(iter(dm.predict_dataloader()))["prompt_valid"].any()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        SegmentationDataModule(tmp_path, layout="masks", predict_images=empty, preprocessing=PRE).setup("predict")


def test_jpeg_decodes_exactly_as_pillow_does(tmp_path: Path) -> None:
    # HF processors are usually handed a Pillow image: our faster OpenCV decode must give the same pixels
    smooth = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (120, 170, 3), dtype=np.uint8), (9, 9), 3)
    Image.fromarray(smooth).save(tmp_path / "x.jpg", quality=80)
    np.testing.assert_array_equal(read_image(tmp_path / "x.jpg"), np.asarray(Image.open(tmp_path / "x.jpg")))


def test_predict_folder_with_coco_prompts_keeps_images_without_annotations(tmp_path: Path) -> None:
    _write_plain_coco(tmp_path, ["a.png", "b.png"])
    data = json.loads((tmp_path / "annotations.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 0]  # b.png: no prompt
    (tmp_path / "prompts.json").write_text(json.dumps(data))
    dm = SegmentationDataModule(
        tmp_path, layout="coco", predict_images=tmp_path / "images", predict_prompts=tmp_path / "prompts.json",
        batch_size=2, preprocessing=PRE,
    )  # fmt: skip
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["file_names"] == ["a.png", "b.png"]
    assert batch["prompt_valid"].tolist() == [[True], [False]]
    assert batch["boxes"][0, 0].tolist() == [10.0, 10.0, 30.0, 30.0]
    assert dm.datasets["predict"].category_id(0) == 1  # the json's category id, for predictions.json
