"""One image and where its instances come from: COCO annotations, a mask file, or given boxes.

Every layout (Roboflow COCO, plain COCO, image/mask folders, LabelMe, predict folders) is read into a list
of :class:`ImageRecord`; the dataset only ever sees records, so adding a layout never touches the
sample-building code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from segtune.data.images import read_image
from segtune.data.intensity import IntensityPolicy, to_model_range
from segtune.data.masks import MaskFormat, read_instances


@dataclass
class ImageRecord:
    """An image and its instances.

    Args:
        image_id: id from the json, or the index of the file in its folder.
        path: the image file.
        height: image height from the json, checked against the file; None when only the file knows.
        width: image width, as ``height``.
        annotations: COCO annotations, each with the class index added as ``"class_index"``.
        mask_path: the mask file of an image/mask-folder dataset.
        mask_format: how to read ``mask_path``.
        boxes: given ``[N, 4]`` xyxy prompt boxes (predict), with ``box_classes``.
        box_classes: class index of each given box or point prompt.
        points: given ``[N, P, 3]`` point prompts (predict): ``x, y, label`` per point (1 positive,
            0 negative, -10 padding), one row of ``P`` points per object.
    """

    image_id: int
    path: Path
    height: int | None = None
    width: int | None = None
    annotations: list[dict] = field(default_factory=list)
    mask_path: Path | None = None
    mask_format: MaskFormat | None = None
    boxes: np.ndarray | None = None
    box_classes: list[int] = field(default_factory=list)
    points: np.ndarray | None = None

    @property
    def has_instances(self) -> bool:
        """Whether the record can give a prompt (an empty mask file is only found when read)."""
        given = [p for p in (self.boxes, self.points) if p is not None]
        return bool(self.annotations) or self.mask_path is not None or any(len(p) > 0 for p in given)

    @property
    def file_name(self) -> str:
        """What reports and pictures call the image."""
        return self.path.name

    @property
    def image_key(self) -> str:
        """Which image of ``path`` this is (empty: the file is one image), for the embedding cache key."""
        return ""

    def decode(self, policy: IntensityPolicy) -> np.ndarray:
        """The image as the model's ``[H, W, 3]`` input range (:func:`segtune.data.intensity.to_model_range`)."""
        return to_model_range(read_image(self.path), policy, self.path)

    def instances(self, size: tuple[int, int]) -> tuple[list[np.ndarray], list[int]]:
        """Decode the ``[H, W]`` bool instance masks and their class indices for an image of ``size``."""
        if self.mask_path is not None:
            return read_instances(self.mask_path, self.mask_format or MaskFormat(), size)
        masks = [decode_segmentation(a["segmentation"], *size) for a in self.annotations]
        return masks, [a["class_index"] for a in self.annotations]


@dataclass
class RecordSet:
    """What a layout reader returns for one split.

    Args:
        records: one per image.
        category_ids: the dataset's own id of each class index (COCO category ids; ``index + 1``
            for mask folders and boxes files), used for prediction output.
        dropped: annotations ignored because their category is not selected.
    """

    records: list[ImageRecord]
    category_ids: list[int]
    dropped: int = 0


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, RLE or uncompressed crowd RLE) as an ``[H, W]`` bool mask."""
    if isinstance(segmentation, list):  # one or several polygons of one instance
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE (iscrowd)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)
