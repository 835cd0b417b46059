"""Training augmentations: geometric transforms on image and masks, dropped instances, prompts after augmenting."""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image
from pycocotools import mask as mask_utils

from segtune.data import Preprocessing, PromptConfig
from segtune.data.dataset import InstanceDataset
from segtune.data.records import ImageRecord
from tests.conftest import CONFIGS

PRE = Preprocessing(64, "longest", 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
HEIGHT, WIDTH = 64, 96
# instance 0 (class 1) on the left, instance 1 (class 0) on the right: rows, columns (end exclusive)
LEFT = (slice(10, 30), slice(5, 25))
RIGHT = (slice(30, 50), slice(60, 90))

# Every transform the README names as tested, each as a user's config would give it.
GEOMETRIC = {
    "Rotate": lambda: A.Rotate(limit=(20, 20), p=1.0),
    "Affine": lambda: A.Affine(rotate=(10, 10), scale=(0.9, 0.9), translate_percent=(0.05, 0.05), p=1.0),
    "ElasticTransform": lambda: A.ElasticTransform(alpha=30, sigma=5, p=1.0),
    "GridDistortion": lambda: A.GridDistortion(distort_limit=0.3, p=1.0),
    "RandomResizedCrop": lambda: A.RandomResizedCrop(size=(48, 40), scale=(0.6, 1.0), p=1.0),
}


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _record(tmp_path: Path, sixteen_bit: bool = False) -> ImageRecord:
    """A 64x96 image with two rectangles given as exact RLE annotations."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 100, (HEIGHT, WIDTH), dtype=np.uint16)
    masks = []
    for rows, cols in (LEFT, RIGHT):
        mask = np.zeros((HEIGHT, WIDTH), bool)
        mask[rows, cols] = True
        image[mask] += 120
        masks.append(mask)
    if sixteen_bit:  # a 16-bit PNG: the intensity policy turns it into float32 in [0, 1]
        path = tmp_path / "image16.png"
        Image.fromarray(image * 200).save(path)
    else:
        path = tmp_path / "image.png"
        Image.fromarray(np.repeat(image.astype(np.uint8)[:, :, None], 3, axis=2)).save(path)
    annotations = [
        {"segmentation": _rle(masks[0]), "class_index": 1},
        {"segmentation": _rle(masks[1]), "class_index": 0},
    ]
    return ImageRecord(7, path, HEIGHT, WIDTH, annotations=annotations)


def _dataset(record: ImageRecord, transforms: list, kind: str = "box", seed: int = 0) -> InstanceDataset:
    torch.manual_seed(seed)  # the training dataset draws its generator from torch's
    prompts = PromptConfig(kind=kind, box_jitter=0.0, positive_points=3, negative_points=1)
    return InstanceDataset([record], PRE, prompts, train=True, augment=A.Compose(transforms))


def _rectangle(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("sixteen_bit", [False, True], ids=["uint8", "float"])
@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_transforms_give_masks_and_prompts_in_the_augmented_frame(
    name: str, sixteen_bit: bool, tmp_path: Path
) -> None:
    record = _record(tmp_path, sixteen_bit)
    # bool masks made Rotate, Affine, ElasticTransform and GridDistortion fail with cv2.error (-215)
    sample = _dataset(record, [GEOMETRIC[name]()], kind="box+points")[0]
    height, width = sample["original_size"]
    assert (height, width) == ((48, 40) if name == "RandomResizedCrop" else (HEIGHT, WIDTH))
    masks = sample["masks"]
    assert masks.dtype == torch.bool and masks.shape[1:] == (height, width)
    assert len(masks) == len(sample["category_ids"]) == len(sample["boxes"]) >= 1
    assert set(sample["category_ids"].tolist()) <= {0, 1}
    if name != "RandomResizedCrop":  # the transform ran: some mask left its rectangle
        before = {1: LEFT, 0: RIGHT}
        unmoved = [_rectangle(*before[c]) for c in sample["category_ids"].tolist()]
        assert not all(torch.equal(m, u) for m, u in zip(masks, unmoved, strict=True))
    reshaped = PRE.resized_shape(height, width)
    assert sample["reshaped_size"] == reshaped
    scale = torch.tensor([reshaped[1] / width, reshaped[0] / height] * 2)
    for i, mask in enumerate(masks):
        assert mask.any()
        assert sample["boxes"][i].tolist() == _tight_box(mask)  # prompts come from the augmented mask
        assert torch.allclose(sample["input_boxes"][i], sample["boxes"][i] * scale)
        positives = sample["input_points"][i][sample["input_labels"][i] == 1] / scale[:2]
        for x, y in positives.long().tolist():
            assert mask[min(y, height - 1), min(x, width - 1)]
    # the loss target is the augmented mask in the model frame: its area matches the mask's
    low = sample["low_res_masks"]
    factor = (PRE.mask_size / PRE.image_size) * (reshaped[0] / height)
    for i, mask in enumerate(masks):
        assert low[i].sum().item() == pytest.approx(mask.sum().item() * factor**2, rel=0.35, abs=3)


def test_instance_moved_out_of_the_image_is_dropped_with_its_class(tmp_path: Path) -> None:
    record = _record(tmp_path)
    # 40 px to the right: the left rectangle lands at columns 45..64, the right one (60..89) leaves the image
    sample = _dataset(record, [A.Affine(translate_px={"x": (40, 40), "y": (0, 0)}, p=1.0)])[0]
    assert sample["original_size"] == (HEIGHT, WIDTH)
    assert sample["category_ids"].tolist() == [1]  # the left rectangle's class; the right one's (0) went with it
    expected = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    expected[10:30, 45:65] = True
    assert torch.equal(sample["masks"][0], expected)
    assert sample["boxes"].tolist() == [[45.0, 10.0, 65.0, 30.0]]
    # the prompt in the model frame: 96x64 resized to 64x43 (longest side 64)
    assert sample["reshaped_size"] == (43, 64)
    expected_prompt = torch.tensor([[45 * 64 / 96, 10 * 43 / 64, 65 * 64 / 96, 30 * 43 / 64]])
    assert torch.allclose(sample["input_boxes"], expected_prompt, atol=1e-4)
    assert sample["low_res_masks"].shape == (1, 16, 16)


def test_a_crop_changes_the_sample_size_and_drops_what_it_cuts_away(tmp_path: Path) -> None:
    record = _record(tmp_path)
    # columns 50..95: the left rectangle is cut away, the right one is kept at columns 10..39
    sample = _dataset(record, [A.Crop(x_min=50, y_min=0, x_max=96, y_max=64, p=1.0)])[0]
    assert sample["original_size"] == (64, 46)
    assert sample["category_ids"].tolist() == [0]
    assert sample["masks"].shape == (1, 64, 46)
    assert sample["boxes"].tolist() == [[10.0, 30.0, 40.0, 50.0]]
    assert sample["reshaped_size"] == PRE.resized_shape(64, 46) == (64, 46)


def test_a_transform_that_removes_every_instance_keeps_the_original(tmp_path: Path) -> None:
    record = _record(tmp_path)
    sample = _dataset(record, [A.Affine(translate_px={"x": (200, 200), "y": (0, 0)}, p=1.0)])[0]
    assert sample["original_size"] == (HEIGHT, WIDTH)
    assert sample["category_ids"].tolist() == [1, 0]
    assert sample["boxes"].tolist() == [[5.0, 10.0, 25.0, 30.0], [60.0, 30.0, 90.0, 50.0]]


class RecordTrainBatches(Callback):
    """Keeps each training step's loss and image sizes, for the test below."""

    seen: list[tuple[float, list[list[int]]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        RecordTrainBatches.seen.append((float(loss), batch["original_sizes"].tolist()))


def test_fit_with_every_tested_transform_from_a_config(run_cli, shapes_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "augment.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: tests.test_augmentations.RecordTrainBatches
data:
  init_args:
    batch_size: 4
    augmentations:
      - class_path: albumentations.Rotate
        init_args: {limit: 15, p: 1.0}
      - class_path: albumentations.Affine
        init_args: {scale: [0.9, 1.1], translate_percent: [-0.05, 0.05], p: 1.0}
      - class_path: albumentations.ElasticTransform
        init_args: {alpha: 20, sigma: 5, p: 1.0}
      - class_path: albumentations.GridDistortion
        init_args: {distort_limit: 0.2, p: 1.0}
      - class_path: albumentations.RandomResizedCrop
        init_args: {size: [200, 256], scale: [0.7, 1.0], ratio: [1.2, 1.4], p: 1.0}
      - class_path: albumentations.ColorJitter
        init_args: {p: 1.0}
"""
    )
    RecordTrainBatches.seen = []
    run_cli(
        "fit", "--config", CONFIGS / "quickstart.yaml", "--config", config,
        "--data.init_args.root", shapes_root, "--trainer.fast_dev_run", "2",
    )  # fmt: skip
    assert len(RecordTrainBatches.seen) == 2  # both training steps ran
    for loss, sizes in RecordTrainBatches.seen:
        assert math.isfinite(loss)
        # every image went through the whole list: the crop's size, not the 240x320 of the files
        assert sizes == [[200, 256]] * 4
