"""The LightningDataModule: split folders -> datasets -> DataLoaders with :func:`collate`."""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from segtune.data.batch import collate
from segtune.data.coco import ANNOTATION_FILE, class_names_of, load_coco, read_records
from segtune.data.dataset import InstanceDataset
from segtune.data.preprocessing import Preprocessing
from segtune.data.prompts import PromptConfig
from segtune.data.synthetic import write_shapes_coco

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = PromptConfig()


class SegmentationDataModule(LightningDataModule):
    """Instance segmentation data from a Roboflow COCO export.

    The root holds one folder per split (``train/ valid/ test/``), each with the images and
    ``_annotations.coco.json``. Every instance becomes one prompt.

    Args:
        root: the export's folder.
        train_split: folder name of the training split.
        val_split: folder name of the validation split.
        test_split: folder name of the held-out split used by ``segtune test``.
        predict_split: folder name of the split ``segtune predict`` runs over.
        categories: category names to train on, in class-index order; ``None`` takes every
            category of the first split's json except Roboflow's unused parent category.
        batch_size: images per batch (each image carries all its prompts).
        num_workers: DataLoader worker processes.
        pin_memory: page-locked host memory for faster copies to a GPU.
        persistent_workers: keep workers alive between epochs (needs ``num_workers > 0``).
        prompts: how instances become prompts.
        augmentations: albumentations transforms for training, applied to image and masks together.
        preprocessing: the model's input geometry and normalisation; the CLI links it from the model.
        seed: seeds the deterministic validation and test prompts.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "valid",
        test_split: str = "test",
        predict_split: str = "test",
        categories: list[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prompts: PromptConfig = DEFAULT_PROMPTS,
        augmentations: list[A.BasicTransform] | None = None,
        preprocessing: Preprocessing | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.splits = {"fit": train_split, "validate": val_split, "test": test_split, "predict": predict_split}
        self.categories = categories
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prompts = prompts
        self.augmentations = augmentations
        self.preprocessing = preprocessing
        self.seed = seed
        self.datasets: dict[str, InstanceDataset] = {}
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """Class index ``i`` is ``class_names[i]``."""
        if self._class_names is None:
            if self.categories is not None:
                self._class_names = list(self.categories)
            else:
                first = next((s for s in self.splits.values() if (self.root / s / ANNOTATION_FILE).exists()), None)
                if first is None:
                    raise FileNotFoundError(f"{self.root}: no split folder with {ANNOTATION_FILE}")
                self._class_names = class_names_of(load_coco(self.root / first / ANNOTATION_FILE))
        return self._class_names

    def _dataset(self, split: str, train: bool, keep_empty: bool = False) -> InstanceDataset:
        if self.preprocessing is None:
            raise ValueError("data.preprocessing is not set: run through `segtune`, which links it from the model")
        folder = self.root / split
        coco = load_coco(folder / ANNOTATION_FILE)
        records, dropped = read_records(coco, folder, self.class_names)
        empty = [r for r in records if not r.annotations]
        if not keep_empty and empty:
            records = [r for r in records if r.annotations]
            log.info(
                "%s: %d of %d images have no annotation and are skipped", folder, len(empty), len(records) + len(empty)
            )
        if dropped:
            log.info("%s: %d annotations of unselected categories ignored", folder, dropped)
        augment = A.Compose(self.augmentations) if train and self.augmentations else None
        return InstanceDataset(
            records, coco, self.class_names, self.preprocessing, self.prompts, train, augment, self.seed
        )

    def setup(self, stage: str) -> None:
        """Read the splits that ``stage`` needs."""
        if stage == "fit":
            self.datasets["fit"] = self._dataset(self.splits["fit"], train=True)
            self.datasets["validate"] = self._dataset(self.splits["validate"], train=False)
        elif stage in ("validate", "test"):
            self.datasets[stage] = self._dataset(self.splits[stage], train=False)
        elif stage == "predict":
            self.datasets[stage] = self._dataset(self.splits[stage], train=False)

    def _loader(self, stage: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.datasets[stage],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validate")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class SyntheticShapesDataModule(SegmentationDataModule):
    """The quickstart's data: writes a synthetic Roboflow COCO export into ``root`` once, then reads it.

    Args:
        root: folder for the export; it is written only when ``train/_annotations.coco.json`` is absent.
        num_images: images per split folder.
        image_height: height of every image.
        image_width: width of every image.
        data_seed: seed of the generated images (``seed`` seeds the prompts).
        **kwargs: everything :class:`SegmentationDataModule` takes.
    """

    def __init__(
        self,
        root: str | Path = "data/shapes",
        num_images: dict[str, int] | None = None,
        image_height: int = 240,
        image_width: int = 320,
        data_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.num_images = num_images or {"train": 400, "valid": 24, "test": 24}
        self.image_size = (image_height, image_width)
        self.data_seed = data_seed

    def prepare_data(self) -> None:
        """Write the export unless it is already there."""
        if not (self.root / self.splits["fit"] / ANNOTATION_FILE).exists():
            log.info("writing synthetic shapes to %s", self.root)
            write_shapes_coco(self.root, self.num_images, self.image_size, self.data_seed)
