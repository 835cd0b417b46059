"""A torch Dataset over image records: decode, augment, make prompts, preprocess."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from segtune.data.batch import Sample
from segtune.data.image_cache import ImageCache, MaskCache
from segtune.data.images import image_size
from segtune.data.intensity import IntensityPolicy
from segtune.data.prompts import PromptConfig, jitter_box, mask_to_box, sample_points
from segtune.data.records import ImageRecord
from segtune.preprocessing import Preprocessing, masks_to_low_res, normalise_image, resize_image, scale_coords

log = logging.getLogger(__name__)


class InstanceDataset(Dataset):
    """Images with instance masks, one :class:`Sample` per image.

    Args:
        records: images and where their instances come from.
        pre: the model's preprocessing.
        prompts: how instances become prompts.
        train: sample instances, jitter boxes, augment; otherwise every instance, deterministic.
        augment: albumentations transforms applied to image and masks together (train only).
        seed: seeds the deterministic evaluation prompts.
        intensity: how 16-bit, float and grayscale images become the model's 3-channel input.
        category_ids: the dataset's own id of each class index (COCO category ids), for prediction
            files; ``index + 1`` when not given.
        cache_images: keep images in memory up to this many MiB, so later epochs do not decode them
            again (0: off). Without augmentations an image is kept resized to the model's input when
            that is smaller than the decoded image, so later epochs do not resize it either. See
            :mod:`segtune.data.image_cache`.

    Images the model already holds the image-encoder output of (an embedding cache, see
    :meth:`mark_encoded`) are not decoded: their samples carry no ``pixel_values``, and their size
    comes from the json or the file's header. The flags live in shared memory, so DataLoader
    workers (persistent or not) see what the main process marks. Instance masks read from mask
    files are kept run-length encoded after the first read (:class:`~segtune.data.image_cache.MaskCache`).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        pre: Preprocessing,
        prompts: PromptConfig,
        train: bool = False,
        augment: A.Compose | None = None,
        seed: int = 0,
        intensity: IntensityPolicy | None = None,
        category_ids: Sequence[int] | None = None,
        cache_images: int | None = 0,
    ) -> None:
        self.records = list(records)
        self.intensity = intensity or IntensityPolicy()
        self.pre = pre
        self.prompts = prompts
        self.train = train
        self.augment = augment if train else None
        self.seed = seed
        self.category_ids = list(category_ids) if category_ids is not None else None
        where = str(self.records[0].path.parent) if self.records else "dataset"
        self.image_cache = ImageCache(cache_images, len(self.records), where) if cache_images else None
        self.mask_cache = MaskCache()
        self.sizes: dict[int, tuple[int, int]] = {}  # (H, W) of each decoded image, by index
        # one flag per image, shared with worker processes (forked or spawned) through shared memory
        self.encoded = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()
        # an image is its file and, for a file of several images (a volume's slices), its image_key
        self._index = {(str(r.path), r.image_key): i for i, r in enumerate(self.records)}

    def mark_encoded(self, paths: Sequence[str], encoded: bool = True, keys: Sequence[str] | None = None) -> None:
        """Say whether the model holds the image-encoder output of these images.

        Marked images are read without decoding (no ``pixel_values`` in their samples); only the
        step that holds their encoder output can use such a sample. Images not in the dataset are
        ignored; augmented training data is always decoded.

        Args:
            paths: image files (as in ``Sample["image_path"]``).
            encoded: True to skip decoding them, False to decode them again.
            keys: which image of each file (``Sample["image_key"]``; None: each file is one image).
        """
        keys = keys or [""] * len(paths)
        rows = [self._index[k] for k in zip(paths, keys, strict=True) if k in self._index]
        if rows:
            self.encoded[rows] = encoded

    def pixels(self, path: str, key: str = "") -> torch.Tensor | None:
        """The model input of one image of this dataset, decoded now (None: not one of its images)."""
        index = self._index.get((path, key))
        if index is None:
            return None
        return normalise_image(self._resized(index, self.records[index])[0], self.pre)

    def clear_encoded(self) -> None:
        """Decode every image again (the model dropped the encoder outputs it held)."""
        self.encoded.zero_()

    def category_id(self, class_index: int) -> int:
        """The dataset's own id of class ``class_index`` (``index + 1`` when the data has none)."""
        if self.category_ids is not None and 0 <= class_index < len(self.category_ids):
            return self.category_ids[class_index]
        return class_index + 1

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, record: ImageRecord) -> np.random.Generator:
        if self.train:  # follows torch's seeding, so Lightning's seed_everything and worker seeds apply
            return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        return np.random.default_rng([self.seed, record.image_id])

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        if self.augment is None:
            image, size = self._resized(index, record)
        else:  # augmentations see the decoded image; it is resized after them
            image = self._image(index, record)
            size = (int(image.shape[0]), int(image.shape[1]))
        if record.boxes is not None or record.points is not None:  # given prompts (predict): no ground truth
            return self.make_sample(
                image, [], record.box_classes, record, self._rng(record), boxes=record.boxes, points=record.points,
                size=size,
            )  # fmt: skip
        masks, classes = self._instances(index, record, size)
        rng = self._rng(record)
        if self.augment is not None:
            if masks:
                image, masks, classes = self._augment(image, masks, classes, rng)
                size = (int(image.shape[0]), int(image.shape[1]))
            image = resize_image(image, self.pre)
        keep = [i for i, m in enumerate(masks) if m.any()]
        if self.train and len(keep) > self.prompts.max_instances:
            keep = sorted(rng.choice(keep, self.prompts.max_instances, replace=False).tolist())
        masks = [masks[i] for i in keep]
        classes = [classes[i] for i in keep]
        return self.make_sample(image, masks, classes, record, rng, size=size)

    def _augment(
        self, image: np.ndarray, masks: list[np.ndarray], classes: list[int], rng: np.random.Generator
    ) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
        """Apply the training transforms to the image and its masks together.

        Instances a transform moves or crops out of the image are dropped with their class; the
        prompts are made afterwards from the masks that remain (:meth:`make_sample`). Masks come back
        as ``[h, w]`` bool at the augmented image's size, which a crop or resize may change.
        """
        assert self.augment is not None
        # albumentations keeps its own generator: seed it from ours so runs (and resumes) repeat
        self.augment.set_random_seed(int(rng.integers(2**31)))
        # One (N, H, W) uint8 array, as albumentations 2 takes masks: OpenCV's warps and remaps
        # (Rotate, Affine, ElasticTransform, GridDistortion) have no bool kernel and fail with
        # cv2.error (-215). A bool array views as 0/1 uint8 without a copy.
        out = self.augment(image=image, masks=(np.stack(masks) != 0).view(np.uint8))
        augmented = np.asarray(out["masks"]) > 0
        new_image = out["image"]
        if augmented.shape[1:] != new_image.shape[:2]:
            raise ValueError(
                f"augmentations gave a {new_image.shape[1]}x{new_image.shape[0]} image but "
                f"{augmented.shape[2]}x{augmented.shape[1]} masks: use transforms that handle masks"
            )
        kept = np.flatnonzero(augmented.reshape(len(augmented), -1).any(axis=1))
        if not len(kept):  # every instance moved out: a sample without a prompt teaches nothing, keep the original
            return image, masks, classes
        return new_image, [augmented[i] for i in kept], [classes[i] for i in kept]

    def _resized(self, index: int, record: ImageRecord) -> tuple[np.ndarray | None, tuple[int, int]]:
        """The image resized to the model's input (:func:`~segtune.preprocessing.resize_image`) and the
        ``(H, W)`` of the file; no image for one the model holds the encoder output of.

        The image cache keeps whichever of the decoded and the resized image is smaller: the resized
        one spares later epochs the resize, the decoded one (a small image for a large model) the memory.
        """
        if self.encoded[index]:
            # checked against the file when it was decoded, in the pass that encoded it
            size = self.sizes.get(index) or (
                (record.height, record.width) if record.height is not None else image_size(record.path)
            )
            return None, (int(size[0]), int(size[1]))

        def decode() -> np.ndarray:
            image = self._decode(index, record)
            resized = resize_image(image, self.pre)
            return resized if resized.nbytes <= image.nbytes else image

        kept = decode() if self.image_cache is None else self.image_cache.get(index, decode)
        size = self.sizes[index]
        if kept.shape[:2] != self.pre.resized_shape(*size):  # the decoded image was kept
            kept = resize_image(kept, self.pre)
        return kept, size

    def _decode(self, index: int, record: ImageRecord) -> np.ndarray:
        """Decode the record's image (after the intensity policy) and check its size against the json."""
        image = record.decode(self.intensity)
        size = (int(image.shape[0]), int(image.shape[1]))
        if record.height is not None and size != (record.height, record.width):
            raise ValueError(
                f"{record.path}: image is {size[1]}x{size[0]} but the json says {record.width}x{record.height}"
            )
        self.sizes[index] = size
        return image

    def _instances(self, index: int, record: ImageRecord, size: tuple[int, int]) -> tuple[list[np.ndarray], list[int]]:
        """The record's instance masks; a mask file's are read once and kept run-length encoded."""
        if record.mask_path is None:  # COCO / LabelMe shapes: decoding them costs about as much as the cache would
            return record.instances(size)
        return self.mask_cache.get(index, size, lambda: record.instances(size))

    def _image(self, index: int, record: ImageRecord) -> np.ndarray:
        """The decoded image (for augmentations: a copy when it comes from the cache, which they may
        write into)."""
        if self.image_cache is None:
            return self._decode(index, record)
        return self.image_cache.get(index, lambda: self._decode(index, record), copy=True)

    def make_sample(
        self,
        image: np.ndarray | None,
        masks: list[np.ndarray],
        classes: list[int],
        record: ImageRecord,
        rng: np.random.Generator,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        *,
        size: tuple[int, int],
    ) -> Sample:
        """Build prompts from ``masks`` (or take the given ``boxes`` or ``[N, P, 3]`` ``points``) and put
        everything in the model frame.

        Args:
            image: the image resized to the model's input (:func:`~segtune.preprocessing.resize_image`);
                None for one whose encoder output the model holds (no ``pixel_values``).
            masks: ``[H, W]`` bool instance masks at the original size.
            classes: class index of each mask.
            record: the image's record.
            rng: the sample's generator (box jitter, points).
            boxes: given ``[N, 4]`` xyxy boxes at the original size (predict).
            points: given ``[N, P, 3]`` points ``(x, y, label)`` at the original size (predict).
            size: ``(H, W)`` of the original image.
        """
        reshaped = self.pre.resized_shape(*size)
        given_points = points is not None
        given_boxes = boxes is not None and given_points  # a box with points for one object (objects json)
        if given_points and not given_boxes:  # no box prompt; the box metadata (no floor in predict) stays empty
            boxes = np.zeros((len(points), 4), np.float32)
        given = boxes is not None
        if given:  # no ground truth: no masks (the prompt count comes from prompt_valid)
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            mask_t = torch.zeros(0, *size, dtype=torch.bool)
        else:
            mask_t = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, *size, dtype=torch.bool)
            boxes = np.stack([mask_to_box(m) for m in masks]) if masks else np.zeros((0, 4), np.float32)
        sample: Sample = {
            "boxes": torch.from_numpy(boxes),
            "low_res_masks": masks_to_low_res(mask_t, self.pre, reshaped),
            "masks": mask_t,
            "category_ids": torch.tensor(classes, dtype=torch.long),
            "original_size": (int(size[0]), int(size[1])),
            "reshaped_size": reshaped,
            "image_id": record.image_id,
            "file_name": record.file_name,
            "image_path": str(record.path),
        }
        if record.image_key:  # one of several images in one file (a volume's slice)
            sample["image_key"] = record.image_key
        if image is not None:
            sample["pixel_values"] = normalise_image(image, self.pre)
        if given_points:
            sample["input_points"] = scale_coords(torch.from_numpy(points[:, :, :2].copy()), size, reshaped)
            sample["input_labels"] = torch.from_numpy(points[:, :, 2].astype(np.int64))
            if given_boxes:
                sample["input_boxes"] = scale_coords(torch.from_numpy(boxes), size, reshaped)
        elif self.prompts.uses_boxes or given:  # given boxes are the only prompt predict has
            prompt_boxes = boxes
            if self.train and masks:
                jitter = self.prompts.box_jitter
                prompt_boxes = np.stack([jitter_box(b, jitter, size, rng, self.prompts.jitter_unit) for b in boxes])
            sample["input_boxes"] = scale_coords(torch.from_numpy(prompt_boxes), size, reshaped)
        if self.prompts.uses_points and not given:
            pos, neg = self.prompts.positive_points, self.prompts.negative_points
            points = np.zeros((len(masks), pos + neg, 2), np.float32)
            labels = np.zeros((len(masks), pos + neg), np.int64)
            for i, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
                points[i], labels[i] = sample_points(mask, box, pos, neg, rng)
            sample["input_points"] = scale_coords(torch.from_numpy(points), size, reshaped)
            sample["input_labels"] = torch.from_numpy(labels)
        return sample
