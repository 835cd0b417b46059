"""data.cache_images: a second pass decodes nothing, samples are unchanged, the budget holds."""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

import segtune.data.dataset
import segtune.data.records
from segtune.data import Preprocessing, SegmentationDataModule
from segtune.data.image_cache import ImageCache

PRE = Preprocessing(256, "longest", 64)
IMAGE_BYTES = 240 * 320 * 3  # the synthetic shapes are 320 x 240 RGB
RESIZED_BYTES = 192 * 256 * 3  # ... resized to PRE's 256 px input (longest side)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the dataset decodes, in order."""
    calls: list[Path] = []
    read = segtune.data.records.read_image

    def counting(path: Path) -> np.ndarray:
        calls.append(path)
        return read(path)

    monkeypatch.setattr(segtune.data.records, "read_image", counting)
    return calls


def _dataset(root: Path, stage: str, pre: Preprocessing = PRE, **kwargs):
    dm = SegmentationDataModule(root, preprocessing=pre, **kwargs)
    dm.setup(stage)
    return dm.datasets[stage]


def _pass(dataset, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)  # training samples draw prompts and augmentations from torch's generator
    return [dataset[i] for i in range(len(dataset))]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k


def _brighten_in_place(image: np.ndarray, **kwargs) -> np.ndarray:
    image += 1  # a transform that writes into its input
    return image


@pytest.fixture
def resized(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the images the dataset resizes, in order."""
    calls: list[tuple[int, ...]] = []
    resize = segtune.data.dataset.resize_image

    def counting(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
        calls.append(image.shape)
        return resize(image, pre)

    monkeypatch.setattr(segtune.data.dataset, "resize_image", counting)
    return calls


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "augmented"])
def test_second_pass_decodes_nothing_and_samples_are_unchanged(
    augmented: bool, shapes_root: Path, decoded, resized
) -> None:
    # augmentations run on a copy: a transform writing in place must not change what the next epoch reads
    augmentations = [A.Lambda(image=_brighten_in_place, p=1.0), A.HorizontalFlip(p=1.0)] if augmented else None
    plain = _dataset(shapes_root, "fit", augmentations=augmentations)
    cached = _dataset(shapes_root, "fit", augmentations=augmentations, cache_images=64)
    reference = [_pass(plain, seed) for seed in (0, 1)]
    decoded.clear()
    first = _pass(cached, 0)
    assert len(decoded) == len(cached) == 8
    resized.clear()
    second = _pass(cached, 1)
    assert len(decoded) == 8  # nothing decoded again
    _assert_same(first, reference[0])
    _assert_same(second, reference[1])
    if augmented:  # the decoded image is kept: augmentations transform it before it is resized
        assert cached.image_cache.used == 8 * IMAGE_BYTES and len(resized) == 8
    else:  # the resized image is kept (smaller): nothing is resized again either
        assert cached.image_cache.used == 8 * RESIZED_BYTES and resized == []


def test_a_small_image_for_a_large_input_keeps_the_decoded_image(shapes_root: Path, decoded, resized) -> None:
    # at 1024 px the resized image (768 x 1024) would take 10x the memory of the decoded 240 x 320 one
    large = Preprocessing(1024, "longest", 256)
    cached = _dataset(shapes_root, "validate", large, cache_images=64)
    reference = _pass(_dataset(shapes_root, "validate", large))
    decoded.clear()
    _assert_same(_pass(cached), reference)
    _assert_same(_pass(cached), reference)
    assert len(decoded) == 4 and cached.image_cache.used == 4 * IMAGE_BYTES
    assert all(shape[:2] == (240, 320) for shape in resized)  # resized from the kept decoded image


def test_evaluation_split_is_cached_too(shapes_root: Path, decoded) -> None:
    cached = _dataset(shapes_root, "validate", cache_images=64)
    reference = _pass(_dataset(shapes_root, "validate"))
    decoded.clear()
    _assert_same(_pass(cached), reference)
    _assert_same(_pass(cached), reference)
    assert len(decoded) == 4


def test_budget_is_respected_and_reported_once(shapes_root: Path, decoded, caplog: pytest.LogCaptureFixture) -> None:
    augmentations = [A.HorizontalFlip(p=1.0)]  # the decoded images are kept
    dataset = _dataset(shapes_root, "fit", cache_images=1, augmentations=augmentations)  # 4 of the 230 kB images
    with caplog.at_level(logging.INFO, logger="segtune"):
        _pass(dataset)
        decoded.clear()
        _pass(dataset)
    assert len(dataset.image_cache.images) == 4 and dataset.image_cache.used <= 2**20
    assert len(decoded) == 4  # the 4 that did not fit are decoded every pass
    lines = [r.getMessage() for r in caplog.records if "image cache" in r.getMessage()]
    assert len(lines) == 1 and "4 of 8 images fit in data.init_args.cache_images=1 MiB" in lines[0]


def test_cached_images_are_read_only_and_a_negative_budget_is_refused() -> None:
    cache = ImageCache(1, total=2)
    image = cache.get(0, lambda: np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        image[0, 0, 0] = 1
    assert cache.get(0, lambda: pytest.fail("decoded twice"), copy=True).flags.writeable
    with pytest.raises(ValueError, match="cache_images must be a budget in MiB >= 0"):
        ImageCache(-1, total=2)


def test_workers_that_restart_every_epoch_are_warned_about(shapes_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="segtune"):
        SegmentationDataModule(shapes_root, cache_images=8, num_workers=2, persistent_workers=True)
        assert "persistent_workers" not in caplog.text
        SegmentationDataModule(shapes_root, cache_images=8, num_workers=2)
    assert "set data.init_args.persistent_workers: true" in caplog.text


def test_mask_files_are_read_once_and_give_the_same_instances(
    masks_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the second pass decodes the kept run lengths instead of reading, thresholding and splitting the files
    import segtune.data.records

    read = segtune.data.records.read_instances
    calls: list[Path] = []

    def counting(path: Path, *args):
        calls.append(path)
        return read(path, *args)

    monkeypatch.setattr(segtune.data.records, "read_instances", counting)
    dataset = _dataset(masks_root, "validate")
    first = _pass(dataset)
    assert len(calls) == len(dataset) > 0
    second = _pass(dataset)
    assert len(calls) == len(dataset)  # none read again
    _assert_same(second, first)
    assert any(len(s["masks"]) for s in first)
