"""The LightningDataModule: split folders -> datasets -> DataLoaders with :func:`collate`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import albumentations as A
import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from torch.utils.data import DataLoader, SequentialSampler

from segtune.data.batch import collate
from segtune.data.boxes import boxes_records, is_objects_json, is_points_json, objects_records, points_records
from segtune.data.coco import ANNOTATION_FILE, class_names_of, coco_records, load_coco, read_json
from segtune.data.dataset import InstanceDataset
from segtune.data.images import image_files
from segtune.data.intensity import IntensityPolicy
from segtune.data.labelme import LabelMeFile, labelme_class_names, labelme_files, labelme_records
from segtune.data.layouts import Layout, detect_layout
from segtune.data.masks import MaskFormat, compile_pair_key, has_foreground, index_values, pair_images_and_masks
from segtune.data.prompts import PromptConfig
from segtune.data.records import ImageRecord, RecordSet
from segtune.data.slices import VolumeOptions, VolumeSource, volume_layout_of
from segtune.data.synthetic import write_shapes_coco
from segtune.preprocessing import Preprocessing

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = PromptConfig()
DEFAULT_MASKS = MaskFormat()
DEFAULT_INTENSITY = IntensityPolicy()
DEFAULT_VOLUMES = VolumeOptions()


class SegmentationDataModule(LightningDataModule):
    """Instance segmentation data from a COCO export, image/mask folders or LabelMe files; every
    instance is one prompt.

    Layouts (``root`` is the dataset folder):

    - ``"auto"``: whichever of the others ``root`` holds (:func:`segtune.data.layouts.detect_layout`),
      logged; a folder that fits none stops with one line saying what was looked for.
    - ``"roboflow"``: one folder per split (``train/ valid/ test/``), each with the images and
      ``_annotations.coco.json``.
    - ``"coco"``: one image folder (``image_dir``) and a json per split named ``<split>.json``
      (``train.json``, ...); without those, the single ``annotation_file`` is split by image
      file with ``split_fractions``.
    - ``"masks"``: ``images/`` and ``masks/`` whose files pair by name (``pair_key``), inside one
      folder per split or directly in ``root`` (then split by file with ``split_fractions``).
    - ``"labelme"``: images with a LabelMe ``.json`` beside each (polygons, rectangles, circles;
      the shape labels are the classes), in one folder per split or directly in ``root``.
    - ``"volumes"``: 3D volumes (:mod:`segtune.data.volumes`): a Decathlon / nnU-Net folder
      (``imagesTr/``, ``labelsTr/``, ``dataset.json``), image and label folders of NIfTI, NRRD or
      MetaImage files, images and labels side by side in one folder (``<case>_image.nrrd`` +
      ``<case>_label.nrrd``, LiTS' ``volume-<n>.nii`` + ``segmentation-<n>.nii``), one folder per case
      (KiTS' ``case_00000/imaging.nii.gz`` + ``segmentation.nii.gz``, BraTS with ``modality``) or
      MedSAM2 npz files. Training samples are slices (:mod:`segtune.data.slices`);
      validation and test score whole volumes (:mod:`segtune.volume_scoring`).

    Args:
        root: the dataset's folder.
        layout: how ``root`` is organised (above).
        train_split: the training split's folder (roboflow, masks) or json stem (coco).
        val_split: the validation split, as ``train_split``.
        test_split: the held-out split ``segtune test`` scores, as ``train_split``.
        predict_split: the split ``segtune predict`` runs over when ``predict_images`` is not set.
        categories: class names in class-index order. Volumes: the names of label values 1, 2, ...
            (or of ``dataset.json``'s values), replacing ``dataset.json``'s names. COCO: the
            categories to train on (``None``:
            every category except Roboflow's unused parent; categories sharing a name merge).
            Index masks: the name of pixel value ``i + 1`` is ``categories[i]``. Binary masks: the
            one class's name.
        annotation_file: coco layout: the single json split by file when there is no
            ``<split>.json``.
        image_dir: coco and masks layouts: the image folder's name.
        mask_dir: masks layout: the mask folder's name.
        pair_key: masks layout: a regular expression whose first group, searched in an image's and
            a mask's file stem, is the key they pair by (``'^(\\d+)_'`` pairs ``21_training.tif``
            with ``21_manual1.gif``). None: the whole stem, case-insensitive, a mask's stem also
            without a common ending (``_mask``, ``_seg``, ``_segmentation``, ``_label``, ``_gt``,
            ``_annotation``). Volumes (image and label folders, and images and labels side by side in one
            folder): the same, its group the case name; in one folder the file whose name outside the group
            holds a label word (``label``, ``seg``, ``segmentation``, ``mask``, ``gt``, ...) is the label
            (``'^(\\d+)_'`` pairs ``001_t2.nrrd`` with ``001_gt.nrrd``). None: a flat folder's names are
            recognised (``<case>_image`` + ``<case>_label``, ``volume-<n>`` + ``segmentation-<n>``, ...).
        mask_format: masks layout: how mask files encode instances.
        split_fractions: train, validation and test fractions when one folder or json is split by
            file (a seeded shuffle of the sorted file names, so the split never changes).
        intensity: how 16-bit, float and grayscale images become 3-channel model input.
        predict_images: a folder of images for ``segtune predict`` (instead of ``predict_split``).
        predict_prompts: prompts for ``predict_images``: a COCO json (boxes from its annotations),
            a boxes json ``{"<file name or stem>": [[x0, y0, x1, y1], ...]}`` (Kvasir's
            ``{"<stem>": {"bbox": [{"xmin": ...}, ...]}}`` also reads) or a points json
            ``{"<file name or stem>": [[x, y, label], ...]}`` (one object; label 1 positive, 0
            negative; ``[[[x, y, label], ...], ...]`` for several objects), or an objects json
            ``{"<file name or stem>": [{"box": [x0, y0, x1, y1], "points": [[x, y, label], ...]}, ...]}``
            (a box with positive and negative points for each object). Without it, predict
            finds every object by automatic mask generation (the method's ``amg`` settings).
        batch_size: images per batch (each image carries all its prompts).
        num_workers: DataLoader worker processes.
        pin_memory: page-locked host memory for faster copies to a GPU.
        persistent_workers: keep workers alive between epochs (needs ``num_workers > 0``).
        cache_images: keep decoded images in memory up to this many MiB per dataset and process, so
            later epochs skip decoding (0 or null: off); with ``num_workers > 0`` each worker keeps its
            own cache, which lasts across epochs only with ``persistent_workers: true``. Volumes: the
            normalised volumes kept (the most recent one always is); null sizes it from the volumes'
            headers and the memory available (all of a split's cases, up to a quarter of it; said at
            INFO), 0 reads a volume again for each training slice.
        volumes: volumes layout: the slice axis, the instance rule and how many slices without
            foreground train (:class:`segtune.data.slices.VolumeOptions`).
        modality: volumes layout, a case with several images (BraTS' ``<case>_flair.nii.gz``,
            ``_t1``, ``_t1ce``, ``_t2`` beside ``<case>_seg.nii.gz``): the one to read, by the last word of
            its name (``flair``). None: a case must have one image.
        prompts: how instances become prompts.
        augmentations: albumentations transforms for training, applied to image and masks together.
        preprocessing: the model's input geometry and normalisation; the CLI links it from the model.
        seed: seeds the deterministic validation and test prompts and the split by file.
    """

    def __init__(
        self,
        root: str | Path,
        layout: Literal["auto", "roboflow", "coco", "masks", "labelme", "volumes"] = "auto",
        train_split: str = "train",
        val_split: str = "valid",
        test_split: str = "test",
        predict_split: str = "test",
        categories: list[str] | None = None,
        annotation_file: str = "annotations.json",
        image_dir: str = "images",
        mask_dir: str = "masks",
        pair_key: str | None = None,
        mask_format: MaskFormat = DEFAULT_MASKS,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        intensity: IntensityPolicy = DEFAULT_INTENSITY,
        predict_images: str | Path | None = None,
        predict_prompts: str | Path | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        cache_images: int | None = None,
        prompts: PromptConfig = DEFAULT_PROMPTS,
        augmentations: list[A.BasicTransform] | None = None,
        preprocessing: Preprocessing | None = None,
        seed: int = 0,
        volumes: VolumeOptions = DEFAULT_VOLUMES,
        modality: str | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.layout_option = layout
        self._layout: Layout | None = None
        self.splits = {"fit": train_split, "validate": val_split, "test": test_split, "predict": predict_split}
        self.categories = categories
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.mask_dir = mask_dir
        compile_pair_key(pair_key)  # a bad expression stops here, before any work
        self.pair_key = pair_key
        self.mask_format = mask_format
        if len(split_fractions) != 3 or min(split_fractions) < 0 or not 0.99 <= sum(split_fractions) <= 1.01:
            raise ValueError(
                f"data.init_args.split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}"
            )
        self.split_fractions = tuple(split_fractions)
        self.intensity = intensity
        self.predict_images = Path(predict_images) if predict_images else None
        self.predict_prompts = Path(predict_prompts) if predict_prompts else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        if cache_images is not None and cache_images < 0:
            raise ValueError(
                f"data.init_args.cache_images must be a budget in MiB >= 0 (or null: automatic), got {cache_images}"
            )
        self.cache_images = cache_images
        if cache_images and num_workers > 0 and not persistent_workers:
            log.warning("data.init_args.cache_images: workers restart every epoch and lose their cache; "
                        "set data.init_args.persistent_workers: true")  # fmt: skip
        self.prompts = prompts
        self.augmentations = augmentations
        self.preprocessing = preprocessing
        self.seed = seed
        self.volumes = volumes
        self.modality = modality
        self._volume_source: VolumeSource | None = None
        self.datasets: dict[str, InstanceDataset] = {}
        self._class_names: list[str] | None = None
        self._labelme: dict[Path, list[LabelMeFile]] = {}

    # --- layout --------------------------------------------------------------------------------------
    @property
    def layout(self) -> str:
        """The layout read: ``layout`` as configured, or what ``auto`` recognised (logged once)."""
        if self._layout is None:
            if self.layout_option == "auto":
                splits = list(dict.fromkeys(self.splits.values()))
                found = detect_layout(self.root, splits, self.image_dir, self.mask_dir, self.annotation_file)
                log.info("%s: layout %s (found %s); data.init_args.layout sets another", self.root, found.name,
                         found.found)  # fmt: skip
                self.annotation_file = found.annotation_file or self.annotation_file
                self.image_dir = found.image_dir or self.image_dir
            else:
                found = Layout(self.layout_option, "configured")
            self._layout = found
        return self._layout.name

    @property
    def volumetric(self) -> bool:
        """Whether the data are volumes: slices train, whole volumes are scored (:mod:`segtune.volume_scoring`)."""
        return self.layout == "volumes"

    @property
    def volume_source(self) -> VolumeSource:
        """The volumes layout's reader (cases per split, classes, datasets)."""
        if self._volume_source is None:
            splits = list(dict.fromkeys(self.splits.values()))
            found = volume_layout_of(self.root, splits, self.image_dir, self.mask_dir, self.pair_key, self.modality)
            self._volume_source = VolumeSource(
                self.root, found, self.splits, self.volumes, self.categories, self._take_split
            )
        return self._volume_source

    # --- classes -----------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Class index ``i`` is ``class_names[i]``."""
        if self._class_names is None:
            self._class_names = list(self.categories) if self.categories is not None else self._find_class_names()
        return self._class_names

    def _find_class_names(self) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: data root folder not found")
        if self.layout == "volumes":
            return list(self.volume_source.labels().values())
        if self.layout == "masks":
            if self.mask_format.kind == "binary":
                return ["foreground"]
            paths = [m for _, m in self._mask_pairs("fit") if m is not None]
            values = index_values(paths)
            log.info("%s: index masks hold values %s; name them with data.categories", self.root, values)
            return [str(v) for v in range(1, max(values, default=1) + 1)]
        if self.layout == "labelme":
            stages = ("fit",) if self._split_by_file("fit") else ("fit", "validate", "test", "predict")
            folders = dict.fromkeys(self._split_folder(s) for s in stages)
            return labelme_class_names(
                [f for folder in folders if folder.is_dir() for f in self._labelme_files(folder)]
            )
        for stage in ("fit", "validate", "test", "predict"):
            json_path = self._coco_json(stage)
            if json_path.exists():
                return class_names_of(load_coco(json_path))
        raise FileNotFoundError(f"{self.root}: no COCO json for any split (looked for {self._coco_json('fit')})")

    # --- records per layout --------------------------------------------------------------------------
    def _coco_json(self, stage: str) -> Path:
        split = self.splits[stage]
        if self.layout == "roboflow":
            return self.root / split / ANNOTATION_FILE
        per_split = self.root / f"{split}.json"
        return per_split if per_split.exists() else self.root / self.annotation_file

    def _split_by_file(self, stage: str) -> bool:
        if self.layout == "coco":
            return not (self.root / f"{self.splits[stage]}.json").exists()
        if self.layout == "masks":
            return not (self.root / self.splits[stage] / self.image_dir).is_dir()
        if self.layout == "labelme":
            return not any((self.root / self.splits[stage]).glob("*.json"))
        return False

    def _split_folder(self, stage: str) -> Path:
        return self.root if self._split_by_file(stage) else self.root / self.splits[stage]

    def _mask_pairs(self, stage: str) -> list[tuple[Path, Path | None]]:
        folder = self._split_folder(stage)
        return pair_images_and_masks(folder / self.image_dir, folder / self.mask_dir, self.pair_key)

    def _labelme_files(self, folder: Path) -> list[LabelMeFile]:
        """The LabelMe jsons of a folder, read once (class names and records both need them)."""
        if folder not in self._labelme:
            self._labelme[folder] = labelme_files(folder)
        return self._labelme[folder]

    def _records(self, stage: str) -> RecordSet:
        if self.layout == "masks":
            records = [
                ImageRecord(i, image, mask_path=mask, mask_format=self.mask_format)
                for i, (image, mask) in enumerate(self._mask_pairs(stage))
            ]
            found = RecordSet(records, [i + 1 for i in range(len(self.class_names))])
        elif self.layout == "labelme":
            folder = self._split_folder(stage)
            found = labelme_records(folder, self._labelme_files(folder), self.class_names)
            if found.dropped:
                log.info("%s: %d LabelMe shapes of unselected labels ignored", folder, found.dropped)
        else:
            json_path = self._coco_json(stage)
            image_dir = json_path.parent if self.layout == "roboflow" else self.root / self.image_dir
            found = coco_records(load_coco(json_path), json_path, image_dir, self.class_names)  # logs what it drops
        if self._split_by_file(stage):
            found.records = self._take_split(found.records, stage)
        return found

    def _take_split(self, records: list[ImageRecord], stage: str) -> list[ImageRecord]:
        """This stage's share of one folder or json: a seeded shuffle of the files, cut by ``split_fractions``."""
        ordered = sorted(records, key=lambda r: r.path.name)
        order = np.random.default_rng(self.seed).permutation(len(ordered))
        n_train = round(self.split_fractions[0] * len(ordered))
        n_val = round(self.split_fractions[1] * len(ordered))
        bounds = {"fit": (0, n_train), "validate": (n_train, n_train + n_val)}
        start, stop = bounds.get(stage, (n_train + n_val, len(ordered)))
        return [ordered[i] for i in order[start:stop]]

    @property
    def automatic_masks(self) -> bool:
        """Whether ``segtune predict`` runs automatic mask generation: images given without prompts."""
        return self.predict_images is not None and self.predict_prompts is None

    def _predict_records(self) -> RecordSet:
        assert self.predict_images is not None
        if self.predict_prompts is None:  # automatic mask generation: the images, no prompt
            records = [
                ImageRecord(i, path, boxes=np.zeros((0, 4), np.float32))
                for i, path in enumerate(image_files(self.predict_images))
            ]
            if not records:
                raise ValueError(f"{self.predict_images}: no image files for data.predict_images")
            return RecordSet(records, [1])
        data = read_json(self.predict_prompts)  # parsed once, whichever of the formats it is
        if "annotations" in data:
            coco = load_coco(self.predict_prompts, data)
            return coco_records(coco, self.predict_prompts, self.predict_images, self.class_names)
        if is_objects_json(data):  # a box with positive and negative points per object
            return objects_records(self.predict_prompts, self.predict_images, self.class_names, data)
        if is_points_json(data):
            return points_records(self.predict_prompts, self.predict_images, data)
        return boxes_records(self.predict_prompts, self.predict_images, self.class_names, data)

    # --- Lightning hooks -------------------------------------------------------------------------------
    def _dataset(self, stage: str) -> InstanceDataset:
        if self.preprocessing is None:
            raise ValueError("data.preprocessing is not set: run through `segtune`, which links it from the model")
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: data root folder not found")
        if self.layout == "volumes":  # slices for fit, whole cases for validate, test and predict
            augment = A.Compose(self.augmentations) if stage == "fit" and self.augmentations else None
            return self.volume_source.dataset(
                stage, self.preprocessing, self.prompts, augment, self.seed, self.intensity, self.cache_images,
                self.predict_images, self.predict_prompts,
            )  # fmt: skip
        found = (
            self._predict_records() if stage == "predict" and self.predict_images is not None else self._records(stage)
        )
        records = found.records
        empty = [r for r in records if not r.has_instances]
        if stage != "predict" and empty:  # no prompt can be made; predict keeps them (empty output)
            records = [r for r in records if r.has_instances]
            log.info(
                "%s split %r: %d of %d images have no annotation and are skipped",
                self.root, self.splits[stage], len(empty), len(records) + len(empty),
            )  # fmt: skip
        if not records:
            raise ValueError(f"{self.root}: split {self.splits[stage]!r} has no image with an instance")
        if stage != "predict":
            self._check_some_mask_has_foreground(records, stage)
        train = stage == "fit"
        augment = A.Compose(self.augmentations) if train and self.augmentations else None
        return InstanceDataset(
            records, self.preprocessing, self.prompts, train, augment, self.seed, self.intensity, found.category_ids,
            cache_images=self.cache_images,
        )  # fmt: skip

    def _check_some_mask_has_foreground(self, records: list[ImageRecord], stage: str) -> None:
        """Refuse a split whose mask files are all empty (it would train on nothing and score 0, silently).

        Reads masks only until one holds an instance: the first, in a dataset that is fine.

        Raises:
            ValueError: naming the split's mask folder and the mask format.
        """
        masks = [r for r in records if r.mask_path is not None]
        if not masks or len(masks) < len(records):
            return
        if any(has_foreground(r.mask_path, r.mask_format or self.mask_format) for r in masks):
            return
        fmt = self.mask_format
        level = f"above {fmt.threshold} (0/1 masks: above 0)" if fmt.kind == "binary" else "above 0"
        raise ValueError(
            f"{masks[0].mask_path.parent}: every one of the {len(masks)} mask files of split "
            f"{self.splits[stage]!r} is empty (no pixel {level}): check the masks, or "
            "data.init_args.mask_format (kind, threshold)"
        )

    def setup(self, stage: str) -> None:
        """Read the splits that ``stage`` needs."""
        for needed in {"fit": ("fit", "validate")}.get(stage, (stage,)):
            self.datasets[needed] = self._dataset(needed)

    def _loader(self, stage: str, shuffle: bool = False) -> DataLoader:
        sampler = None
        trainer = self.trainer
        if stage != "fit" and trainer is not None and trainer.world_size > 1:
            images = len(self.datasets[stage])
            if 0 < images < trainer.world_size:
                # every process must run the loop (DDP would wait for the idle one): refused here in one line
                raise ValueError(
                    f"{self.root}: the {stage} split has {images} image(s) for {trainer.world_size} processes; each "
                    f"process needs at least one: add images to it or run {stage} with fewer trainer.devices"
                )
            # Lightning's DistributedSampler repeats images to even out the processes, which would
            # count them twice in the metrics: each image is scored by exactly one process instead.
            sampler = UnrepeatedDistributedSamplerWrapper(
                SequentialSampler(self.datasets[stage]), num_replicas=trainer.world_size, rank=trainer.global_rank,
                shuffle=False,
            )  # fmt: skip
        return DataLoader(
            self.datasets[stage],
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=getattr(self.datasets[stage], "collate", collate),  # whole volumes batch as cases
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
