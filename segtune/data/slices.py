"""How volumes are sampled: cases -> slice records for training, whole cases for scoring and predicting.

A volumetric dataset plugs into the 2D path as records: every training slice is a
:class:`SliceRecord`, an :class:`~segtune.data.records.ImageRecord` whose image and instances come
from its case's volume, so the dataset, the prompts, augmentations, the batch and the embedding
cache (keyed by case and slice) treat it as any image. Validation, test and predict see whole cases
(:class:`VolumeCaseDataset`): their objects are followed from slice to slice by
:mod:`segtune.volume_scoring`.

A volume is read and normalised once and kept in a :class:`VolumeStore` within the
``cache_images`` budget, so its slices do not read it again (the most recent case is always kept).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from segtune.data.batch import Sample
from segtune.data.dataset import InstanceDataset
from segtune.data.dataset_json import missing_listed, read_dataset_json
from segtune.data.intensity import IntensityPolicy, gray_to_rgb, volume_to_model_range
from segtune.data.masks import split_instances
from segtune.data.prompts import PromptConfig
from segtune.data.records import ImageRecord
from segtune.data.volume_cache import automatic_cache_mib
from segtune.data.volume_prompts import prompts_by_case, read_volume_prompts
from segtune.data.volumes import (
    Geometry,
    VolumeCase,
    VolumeLayout,
    case_folders,
    case_name,
    find_volume_layout,
    flat_cases,
    flat_naming,
    folder_cases,
    holds_flat_volumes,
    npz_cases,
    pair_cases,
    predict_cases,
    read_volume,
)
from segtune.preprocessing import Preprocessing, masks_to_low_res, resize_image

log = logging.getLogger(__name__)

#: Axis names by the array axis they are in SimpleITK's ``(z, y, x)`` numpy order.
AXES = {"z": 0, "y": 1, "x": 2}


@dataclass(frozen=True)
class VolumeOptions:
    """How volumes become slices (``data.init_args.volumes``).

    Args:
        axis: the axis slices are cut across: ``"auto"`` takes the one with the largest spacing (the
            through-plane axis of an anisotropic scan; ``z`` when all are equal), or ``"x"``, ``"y"``,
            ``"z"`` (the image's index axes i, j, k). A ``z`` slice has rows along y and columns along x.
        instances: ``"semantic"``: each label value present is one object (on a slice and in the
            volume). ``"components"``: each connected component of a label is its own object (one
            prompt per lesion), 8-connected on a slice, 26-connected in the volume.
        min_area: components smaller than this many pixels (on a slice) or voxels (in a volume) are
            dropped; only used with ``instances: components``.
        empty_slices: the fraction of slices without foreground that train too (a seeded choice per
            case). Each is prompted with the boxes of the nearest slice's objects and has an empty
            target, as a propagated box is once its object has ended.
        propagation_prompts: trains for box propagation (:mod:`segtune.volume_scoring`): the chance
            that a training sample of a slice with objects is prompted as a propagated slice is, with
            the (jittered) boxes of the objects of a neighbouring slice, drawn anew each time among the
            slices at most ``propagation_offset`` away that have objects; its targets are this slice's
            masks of the same objects, empty for one that has ended here. When above 0, the slices
            without foreground up to ``propagation_offset`` past an object's first or last slice train
            too (unless ``empty_slices`` picked them), always prompted so: with empty targets the
            model learns to stop. Objects follow ``instances``; under ``components`` they are the
            26-connected components of the volume, as scoring follows them (a component's pieces on a
            slice are one prompt). 0 trains every slice with its own boxes only.
        propagation_offset: the farthest slice a propagated prompt comes from (1: the adjacent slice,
            as scoring propagates; 2 also learns from a box two slices away).
        unpaired: what a labelled folder's images without a label and labels without an image do:
            ``"stop"`` with one line listing them, or ``"skip"``: leave them out with a warning listing
            them (pairs that ``dataset.json`` lists and the folders lack whole are one warning).
    """

    axis: Literal["auto", "x", "y", "z"] = "auto"
    instances: Literal["semantic", "components"] = "semantic"
    min_area: int = 4
    empty_slices: float = 0.0
    propagation_prompts: float = 0.0
    propagation_offset: int = 2
    unpaired: Literal["stop", "skip"] = "stop"

    def __post_init__(self) -> None:
        # every value checked before any work, in one line naming its key (the form of
        # segtune.propagation.check_options; that module imports this one)
        def integer(value: Any) -> bool:
            return isinstance(value, int | np.integer) and not isinstance(value, bool)

        def fraction(value: Any) -> bool:  # NaN is not
            return (integer(value) or isinstance(value, float | np.floating)) and 0 <= value <= 1

        kinds = {"axis": ["auto", *AXES], "instances": ["semantic", "components"], "unpaired": ["stop", "skip"]}
        checks = (
            *((key, getattr(self, key), getattr(self, key) in kinds[key], f"one of {kinds[key]}") for key in kinds),
            ("min_area", self.min_area, integer(self.min_area) and self.min_area >= 0, "an integer >= 0"),
            *((key, getattr(self, key), fraction(getattr(self, key)), "a fraction in [0, 1]")
              for key in ("empty_slices", "propagation_prompts")),
            ("propagation_offset", self.propagation_offset,
             integer(self.propagation_offset) and self.propagation_offset >= 1, "1 or more (slices)"),
        )  # fmt: skip
        for key, value, ok, need in checks:
            if not ok:
                raise ValueError(f"data.init_args.volumes.{key} must be {need} (got {value!r})")

    def slice_axis(self, geometry: Geometry) -> int:
        """The array axis slices are cut across, for a case of ``geometry``."""
        if self.axis != "auto":
            return AXES[self.axis]
        spacing = np.round(np.asarray(geometry.array_spacing), 6)
        return int(np.argmax(spacing))  # the first of equal ones: z


@dataclass
class PreparedVolume:
    """A case as slices are cut from it: arrays with the slice axis first.

    Args:
        case: the case.
        image: ``(S, H, W)`` in the model's range (uint8, or float32 in [0, 1]), one channel.
        label: ``(S, H, W)`` label values, or None.
        geometry: the case's geometry (of the original ``(z, y, x)`` array).
        axis: the original array axis the slices were cut across.
        spacing: mm along ``(S, H, W)``.
        shape: the original ``(z, y, x)`` shape.
    """

    case: VolumeCase
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    axis: int
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def axis_name(self) -> str:
        return "zyx"[self.axis]

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """An ``(S, H, W)`` array back in the case's ``(z, y, x)`` order."""
        return np.moveaxis(array, 0, self.axis)

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + (self.label.nbytes if self.label is not None else 0)


class VolumeStore:
    """Read, checked and normalised cases by index, kept within a memory budget.

    Args:
        cases: the split's cases.
        options: the slicing options.
        intensity: the intensity policy (statistics over each whole volume).
        label_values: the label values the classes allow (None: any).
        budget_mib: memory for kept cases (``data.init_args.cache_images``); the most recently read
            case is kept in any case, so consecutive slices of one case read it once.
    """

    def __init__(
        self, cases: Sequence[VolumeCase], options: VolumeOptions, intensity: IntensityPolicy,
        label_values: list[int] | None, budget_mib: int = 0,
    ) -> None:  # fmt: skip
        self.cases = list(cases)
        self.options = options
        self.intensity = intensity
        self.label_values = label_values
        self.budget = max(0, int(budget_mib)) * 2**20
        self.kept: OrderedDict[int, PreparedVolume] = OrderedDict()
        self.reads = 0

    def __len__(self) -> int:
        return len(self.cases)

    def get(self, index: int) -> PreparedVolume:
        """Case ``index``, read once while it stays within the budget."""
        if index in self.kept:
            self.kept.move_to_end(index)
            return self.kept[index]
        prepared = self._prepare(self.cases[index])
        self.reads += 1
        self.kept[index] = prepared
        while len(self.kept) > 1 and sum(v.nbytes for v in self.kept.values()) > self.budget:
            self.kept.popitem(last=False)  # the least recently used
        return prepared

    def _prepare(self, case: VolumeCase) -> PreparedVolume:
        volume = read_volume(case, self.label_values)
        axis = self.options.slice_axis(volume.geometry)
        image = np.moveaxis(volume_to_model_range(volume.image, self.intensity), axis, 0)
        label = np.moveaxis(volume.label, axis, 0) if volume.label is not None else None
        spacing = volume.geometry.array_spacing
        moved = (spacing[axis], *(s for a, s in enumerate(spacing) if a != axis))
        return PreparedVolume(case, image, label, volume.geometry, axis, moved, volume.image.shape)  # type: ignore[arg-type]


def slice_instances(
    label: np.ndarray, values: Sequence[int], options: VolumeOptions
) -> tuple[list[np.ndarray], list[int]]:
    """The objects of one ``[H, W]`` label slice: bool masks and their class indices (``values.index``)."""
    regions = [(label == value, cls) for cls, value in enumerate(values)]
    return split_instances(regions, options.instances, options.min_area)


def _pieces(region: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The 8-connected pieces of a ``[H, W]`` bool region: their label image and ``(label, first pixel)``
    of each, the first pixel (flat, in raster order) naming the piece from one call to the next."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    width = region.shape[1]
    # a piece's first pixel lies on its top row: one row searched, not the image sorted
    tops = stats[:, cv2.CC_STAT_TOP]
    return labels, [(c, int(tops[c]) * width + int(np.argmax(labels[tops[c]] == c))) for c in range(1, count)]


def connected_components(region: np.ndarray) -> np.ndarray:
    """The 26-connected components of a ``(S, H, W)`` bool volume, numbered from 1 (0: background); SimpleITK,
    fully connected, as the volume library reads volumes."""
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(region.astype(np.uint8)), True))


def volume_components(label: np.ndarray, values: Sequence[int], min_area: int) -> list[dict[int, int]]:
    """Which object each slice's pieces belong to under ``instances: components``, as scoring follows them.

    The objects are the 26-connected components of each label value of at least ``min_area`` voxels
    (those of :func:`segtune.volume_scoring.volume_objects`), numbered from 1 across the classes. A
    class's 8-connected piece on a slice lies inside one of them; it is kept by its first pixel, so a
    case costs a few numbers per slice instead of a volume of component labels.

    Returns:
        per slice of the ``(S, H, W)`` label volume, first pixel of a piece -> its object (pieces of
        components under ``min_area`` are left out).
    """
    named: list[dict[int, int]] = [{} for _ in range(len(label))]
    count = 0
    for value in values:
        region = label == value
        if not region.any():
            continue
        parts = connected_components(region)  # as volume_objects: the same objects scoring prompts
        sizes = np.bincount(parts.ravel())
        kept = np.flatnonzero(sizes >= min_area)
        kept = kept[kept > 0]
        number = np.zeros(len(sizes), np.int64)
        number[kept] = count + 1 + np.arange(len(kept))
        count += len(kept)
        for s in np.flatnonzero(region.reshape(len(region), -1).any(axis=1)):
            for _, first in _pieces(region[s])[1]:
                obj = int(number[parts[s].flat[first]])
                if obj:
                    named[s][first] = obj
    return named


@dataclass
class SliceRecord(ImageRecord):
    """One slice of a case as an image record.

    Args:
        store: the cases' store.
        case: the case's index in ``store``.
        index: the slice index along the case's slice axis.
        values: the label value of each class index.
        options: the slicing options (instance rule).
        prompt_from: for a slice without foreground, the slice whose objects give its prompts (its
            targets are empty, :class:`SliceDataset`); None otherwise.
        sources: the slices a propagated prompt of this slice may come from (``propagation_prompts``):
            those at most ``propagation_offset`` away with objects; empty: never prompted so.
        past_end: a slice without foreground just past objects: always prompted from ``sources``.
        components: under ``instances: components`` with propagation, the case's
            :func:`volume_components` (shared by its slices), which tell objects apart across slices.
    """

    store: VolumeStore | None = None
    case: int = 0
    index: int = 0
    values: list[int] = field(default_factory=list)
    options: VolumeOptions = field(default_factory=VolumeOptions)
    prompt_from: int | None = None
    axis_name: str = "z"
    sources: tuple[int, ...] = ()
    past_end: bool = False
    components: list[dict[int, int]] | None = None

    @property
    def has_instances(self) -> bool:
        return True  # made only for slices with objects, or prompted from one

    @property
    def file_name(self) -> str:
        return f"{self.store.cases[self.case].name} {self.image_key}"  # type: ignore[union-attr]

    @property
    def image_key(self) -> str:
        return f"{self.axis_name}={self.index}"

    def decode(self, policy: IntensityPolicy) -> np.ndarray:
        """The slice as ``[H, W, 3]``, from the volume normalised once by the store's (the data's) policy."""
        return gray_to_rgb(self.store.get(self.case).image[self.index])  # type: ignore[union-attr]

    def instances(self, size: tuple[int, int]) -> tuple[list[np.ndarray], list[int]]:
        label = self.store.get(self.case).label  # type: ignore[union-attr]
        at = self.index if self.prompt_from is None else self.prompt_from
        return slice_instances(label[at], self.values, self.options)  # type: ignore[index]

    def objects(self, at: int) -> dict[int, tuple[np.ndarray, int]]:
        """The objects on slice ``at`` as propagation follows them, by an identity that holds across the
        case's slices: the class index (``instances: semantic``) or the volume component (``components``,
        its pieces on the slice as one mask) -> ``([H, W]`` bool mask, class index)."""
        label = self.store.get(self.case).label[at]  # type: ignore[union-attr,index]
        found: dict[int, tuple[np.ndarray, int]] = {}
        for cls, value in enumerate(self.values):
            region = label == value
            if not region.any():
                continue
            if self.options.instances == "semantic":
                found[cls] = (region, cls)
                continue
            assert self.components is not None, "components are worked out when propagation_prompts is set"
            labels, pieces = _pieces(region)
            for piece, first in pieces:
                obj = self.components[at].get(first)
                if obj is not None:  # None: a piece of a component under min_area
                    mask = labels == piece
                    found[obj] = (found[obj][0] | mask, cls) if obj in found else (mask, cls)
        return found


class SliceDataset(InstanceDataset):
    """The training slices: an :class:`InstanceDataset` whose slices without foreground keep the prompts
    of their nearest foreground slice with empty targets (the model learns to stop there), and whose
    slices are prompted from a neighbouring slice as often as ``VolumeOptions.propagation_prompts`` says
    (:meth:`propagated`)."""

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        sources = getattr(record, "sources", ())
        if self.train and sources:  # only with propagation_prompts: otherwise no draw, the samples of before
            rng = self._rng(record)
            if record.past_end or rng.random() < record.options.propagation_prompts:
                return self.propagated(index, int(rng.choice(sources)), rng)
        sample = super().__getitem__(index)
        if getattr(record, "prompt_from", None) is not None:
            sample["masks"] = torch.zeros_like(sample["masks"])
            sample["low_res_masks"] = torch.zeros_like(sample["low_res_masks"])
        return sample

    def propagated(self, index: int, source: int, rng: np.random.Generator) -> Sample:
        """Slice ``index`` prompted as box propagation prompts it: with the objects of slice ``source``.

        Each object on ``source`` is one prompt, made from its mask there as any prompt is (its box
        jittered, points when the prompt kind has them); its target is its mask on this slice, empty
        where it has ended (a real target: ``prompt_valid`` is True, the loss pushes the mask to
        nothing). ``boxes`` are the prompts' boxes before jitter, as for ``empty_slices``.
        """
        record: SliceRecord = self.records[index]  # type: ignore[assignment]
        given = record.objects(source)
        here = record.objects(record.index)
        prompts = [mask for mask, _ in given.values()]
        classes = [cls for _, cls in given.values()]
        targets = [here[key][0] if key in here else np.zeros_like(mask) for key, (mask, _) in given.items()]
        if self.augment is None:
            image, size = self._resized(index, record)
        else:
            image, prompts, targets, classes = self._augment_pairs(index, record, prompts, targets, classes, rng)
            size = (int(image.shape[0]), int(image.shape[1]))
            image = resize_image(image, self.pre)
        keep = list(range(len(prompts)))
        if len(keep) > self.prompts.max_instances:
            keep = sorted(rng.choice(keep, self.prompts.max_instances, replace=False).tolist())
        sample = self.make_sample(image, [prompts[i] for i in keep], [classes[i] for i in keep], record, rng, size=size)
        target = torch.from_numpy(np.stack([targets[i] for i in keep])) if keep else torch.zeros(0, *size).bool()
        sample["masks"] = target
        sample["low_res_masks"] = masks_to_low_res(target, self.pre, sample["reshaped_size"])
        return sample

    def _augment_pairs(
        self, index: int, record: SliceRecord, prompts: list[np.ndarray], targets: list[np.ndarray],
        classes: list[int], rng: np.random.Generator,
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[int]]:  # fmt: skip
        """The training transforms on the image, the prompts' masks and their targets together; an object
        whose prompt mask they move out of the image is dropped (its target may be empty anyway)."""
        image = self._image(index, record)
        n = len(prompts)
        if not n:
            return image, prompts, targets, classes
        # the masks go through _augment tagged by their position: it drops those that end empty
        out, masks, tags = self._augment(image, prompts + targets, list(range(2 * n)), rng)
        moved = dict(zip(tags, masks, strict=True))
        kept = [i for i in range(n) if i in moved]
        if not kept:  # every prompt moved out but a target stayed: train this one unaugmented
            return self._image(index, record), prompts, targets, classes
        blank = np.zeros(out.shape[:2], bool)
        return out, [moved[i] for i in kept], [moved.get(n + i, blank) for i in kept], [classes[i] for i in kept]


def _slice_records(store: VolumeStore, values: list[int], options: VolumeOptions, seed: int) -> list[SliceRecord]:
    """Every slice with foreground of every case, the ``empty_slices`` fraction of those without and, with
    ``propagation_prompts``, those without within ``propagation_offset`` of an object (past its ends)."""
    records: list[SliceRecord] = []
    for case in range(len(store)):
        volume = store.get(case)
        assert volume.label is not None
        present = np.isin(volume.label, values).reshape(len(volume.label), -1).any(axis=1)
        foreground = np.flatnonzero(present)
        chosen = list(foreground)
        empty = np.flatnonzero(~present)
        prompt_from: dict[int, int] = {}
        if options.empty_slices and len(foreground) and len(empty):
            rng = np.random.default_rng([seed, case])
            picked = rng.choice(empty, round(options.empty_slices * len(empty)), replace=False)
            for s in sorted(picked.tolist()):
                prompt_from[s] = int(foreground[np.argmin(np.abs(foreground - s))])
            chosen += list(prompt_from)
        sources: dict[int, tuple[int, ...]] = {}
        components = None
        if options.propagation_prompts:
            if options.instances == "components":
                components = volume_components(volume.label, values, options.min_area)
                with_objects = np.array([bool(named) for named in components])
            else:
                with_objects = present
            sources = _neighbours(with_objects, options.propagation_offset)
            # an empty_slices pick keeps its rule (the nearest foreground slice's boxes, empty targets)
            chosen += [s for s in sources if not present[s] and s not in prompt_from]
        height, width = volume.image.shape[1:3]  # known, so a slice the model holds needs no decoding
        for s in sorted(int(s) for s in chosen):
            records.append(
                SliceRecord(len(records), volume.case.image, height=int(height), width=int(width), store=store,
                            case=case, index=s, values=values, options=options, prompt_from=prompt_from.get(s),
                            axis_name=volume.axis_name, sources=() if s in prompt_from else sources.get(s, ()),
                            past_end=bool(not present[s] and s not in prompt_from), components=components)
            )  # fmt: skip
    return records


def _neighbours(with_objects: np.ndarray, offset: int) -> dict[int, tuple[int, ...]]:
    """Slice -> the other slices at most ``offset`` away that have objects, for each slice that has some."""
    found: dict[int, tuple[int, ...]] = {}
    for s in range(len(with_objects)):
        near = [t for t in range(max(0, s - offset), min(len(with_objects), s + offset + 1)) if t != s]
        near = [t for t in near if with_objects[t]]
        if near:
            found[s] = tuple(near)
    return found


class Cases:
    """The cases of a batch: a plain container Lightning's device transfer leaves as it is (it would
    walk into the cases' dataclasses; their arrays stay on the host until a slice is run).

    Args:
        items: the :class:`VolumeCaseDataset` items.
    """

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class VolumeCaseDataset(Dataset):
    """Whole cases, one item each (validation, test, predict), as plain dicts that Lightning leaves alone.

    Args:
        store: the cases.
        values: the label value of each class index.
        prompts: predict: the given prompts of each case by case name (see :func:`read_volume_prompts`).
    """

    def __init__(self, store: VolumeStore, values: list[int], prompts: dict[str, list[dict]] | None = None) -> None:
        self.store = store
        self.values = values
        self.prompts = prompts
        self.checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = self.store.get(index)
        if volume.label is not None and index not in self.checked:  # said once: the case is scored on nothing
            self.checked.add(index)
            if not np.isin(volume.label, self.values).any():
                log.warning("%s: the label holds none of the classes' values %s: the case adds no score",
                            volume.case.label, self.values)  # fmt: skip
        item: dict[str, Any] = {"index": index, "volume": volume, "values": self.values, "options": self.store.options}
        if self.prompts is not None:
            item["prompts"] = self.prompts.get(volume.case.name.lower(), [])
        return item

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch of cases: ``volumes`` (the items), ``image_ids`` and ``file_names`` (case names)."""
        return {
            "volumes": Cases(items),
            "image_ids": [it["index"] for it in items],
            "file_names": [it["volume"].case.name for it in items],
        }


class VolumeSource:
    """A volumetric dataset folder as the DataModule reads it: its cases per split, classes and datasets.

    Args:
        root: the dataset folder.
        layout: what :func:`segtune.data.volumes.find_volume_layout` found.
        splits: stage (fit, validate, test, predict) -> split folder name.
        options: the slicing options.
        categories: class names (``data.init_args.categories``); label value ``i + 1`` is ``categories[i]``.
        take_split: this stage's share of cases split by file (the DataModule's seeded split).
    """

    def __init__(
        self, root: Path, layout: VolumeLayout, splits: dict[str, str], options: VolumeOptions,
        categories: list[str] | None, take_split: Callable[[list, str], list],
    ) -> None:  # fmt: skip
        self.root = root
        self.layout = layout
        self.splits = splits
        self.options = options
        self.categories = categories
        self.take_split = take_split
        self.dataset_json = read_dataset_json(root / "dataset.json") if layout.kind == "decathlon" else None
        self._labels: dict[int, str] | None = None
        self._found: dict[Path, list[VolumeCase]] = {}

    @property
    def skip_unpaired(self) -> bool:
        return self.options.unpaired == "skip"

    # --- cases ---------------------------------------------------------------------------------
    def cases(self, stage: str) -> list[VolumeCase]:
        """The labelled cases of ``stage``'s split."""
        root, kind = self.root, self.layout.kind
        if kind == "decathlon":
            if stage == "test" and (root / "labelsTs").is_dir():
                return self._once(root / "imagesTs", lambda: pair_cases(root / "imagesTs", root / "labelsTs"))
            return self.take_split(self._once(root / "imagesTr", self._listed_training), stage)
        folder = root / self.splits[stage]
        per_split = folder.is_dir() and self._holds_cases(folder)
        base = folder if per_split else root
        cases = self._once(base, lambda: self._folder_cases(base))
        return cases if per_split else self.take_split(cases, stage)

    def _once(self, folder: Path, find: Callable[[], list[VolumeCase]]) -> list[VolumeCase]:
        """The cases of ``folder``, found (and their pairing checked and reported) once."""
        if folder not in self._found:
            self._found[folder] = find()
        return self._found[folder]

    def _listed_training(self) -> list[VolumeCase]:
        """``imagesTr`` paired with ``labelsTr``, checked against the pairs ``dataset.json`` lists."""
        root = self.root
        cases = pair_cases(root / "imagesTr", root / "labelsTr", skip_unpaired=self.skip_unpaired)
        listed = self.dataset_json
        if listed is None:
            return cases
        wholes = missing_listed(listed, root, {c.name.lower() for c in cases})
        if wholes:  # a subset of the listed cases, as a user who copies some keeps it
            log.warning("%s: %d pairs of its training list are in neither imagesTr nor labelsTr (e.g. %s); the %d "
                        "pairs found are used", listed.path, len(wholes), wholes[0].name, len(cases))  # fmt: skip
        names = {case_name(Path(image)).lower() for image, _ in listed.training or []}
        unlisted = [c.image.name for c in cases if listed.training is not None and c.name.lower() not in names]
        if unlisted:
            log.warning("%s: %d cases of imagesTr are not in its training list and are used too (e.g. %s)",
                        listed.path, len(unlisted), unlisted[0])  # fmt: skip
        elif listed.training is None and listed.num_training not in (None, len(cases)):
            log.warning("%s: numTraining is %d but imagesTr and labelsTr pair %d cases", listed.path,
                        listed.num_training, len(cases))  # fmt: skip
        return cases

    def _holds_cases(self, folder: Path) -> bool:
        """Whether the split folder ``folder`` holds its own cases in the layout's form."""
        kind = self.layout.kind
        if kind == "folders":
            return (folder / self.layout.image_dir).is_dir()
        if kind == "flat":
            return holds_flat_volumes(folder)
        if kind == "cases":
            return bool(case_folders(folder))
        return any(folder.glob("*.npz"))

    def _folder_cases(self, base: Path) -> list[VolumeCase]:
        """The labelled cases of ``base`` (``root`` or a split folder) in the layout's form."""
        layout = self.layout
        skip = self.skip_unpaired
        if layout.kind == "folders":
            return pair_cases(base / layout.image_dir, base / layout.label_dir, layout.pair_key, skip)
        if layout.kind == "flat":  # each folder's own naming, unless pair_key is configured
            return flat_cases(base, flat_naming(base, layout.pair_key)[0], layout.modality, skip_unpaired=skip)
        if layout.kind == "cases":
            return folder_cases(base, layout.modality, skip_unpaired=skip)
        return npz_cases(base)

    # --- classes -------------------------------------------------------------------------------
    def labels(self) -> dict[int, str]:
        """Label value -> class name: ``categories``, else ``dataset.json``, else the values the training
        labels hold (named by their value)."""
        if self._labels is None:
            listed = self.dataset_json.labels if self.dataset_json is not None else None
            if self.dataset_json is not None and listed is None and self.categories is None:
                log.info("%s: no labels field: the classes are the label values the training labels hold",
                         self.dataset_json.path)  # fmt: skip
            if self.categories is not None:
                values = sorted(listed) if listed and len(listed) == len(self.categories) else None
                self._labels = dict(zip(values or range(1, len(self.categories) + 1), self.categories, strict=True))
            elif listed is not None:
                self._labels = listed
            else:
                found: set[int] = set()
                for case in self.cases("fit"):
                    label = read_volume(case).label
                    found |= set(np.unique(label).tolist()) - {0} if label is not None else set()
                log.info("%s: label volumes hold values %s; name them with data.categories", self.root, sorted(found))
                self._labels = {v: str(v) for v in sorted(found)} or {1: "1"}
        return self._labels

    # --- datasets ------------------------------------------------------------------------------
    def dataset(
        self, stage: str, pre: Preprocessing, prompts: PromptConfig, augment: A.Compose | None, seed: int,
        intensity: IntensityPolicy, cache_mib: int | None, predict_images: Path | None, predict_prompts: Path | None,
    ) -> Dataset:  # fmt: skip
        """``stage``'s dataset: slices for fit, whole cases for validate, test and predict."""
        labels = self.labels()
        values = list(labels)
        if stage == "predict":
            if predict_images is None or predict_prompts is None:
                raise ValueError(
                    f"{self.root}: predicting volumes needs data.init_args.predict_images (a folder of volumes) and "
                    "predict_prompts (a json of one box per object on one slice)"
                )
            cases = predict_cases(predict_images, self.layout.pair_key, self.layout.modality)
            if not cases:
                raise ValueError(f"{predict_images}: no volume files for data.predict_images")
            if cache_mib is None:
                cache_mib = automatic_cache_mib(cases, str(predict_images))
            store = VolumeStore(cases, self.options, intensity, None, cache_mib)
            # every prompt checked against its volume's header before any model work
            given = read_volume_prompts(predict_prompts, values)
            prompts = prompts_by_case(cases, given, predict_prompts, predict_images, self.options.slice_axis)
            return VolumeCaseDataset(store, values, prompts)
        cases = self.cases(stage)
        if not cases:
            raise ValueError(f"{self.root}: split {self.splits[stage]!r} has no case")
        if cache_mib is None:
            cache_mib = automatic_cache_mib(cases, f"{self.root}: split {self.splits[stage]!r}")
        store = VolumeStore(cases, self.options, intensity, values, cache_mib)
        if stage != "fit":
            log.info("%s: split %r: %d cases, scored as volumes", self.root, self.splits[stage], len(cases))
            return VolumeCaseDataset(store, values)
        records = _slice_records(store, values, self.options, seed)
        if not records:
            raise ValueError(f"{self.root}: split {self.splits[stage]!r} has no slice with a labelled object")
        used = {r.case for r in records}
        empty = [c.image.name for i, c in enumerate(cases) if i not in used]
        log.info("%s: split %r: %d training slices from %d cases", self.root, self.splits[stage], len(records),
                 len(cases) - len(empty))  # fmt: skip
        if empty:
            log.warning("%s: split %r: %d of %d cases have no foreground and add no training slice (%s)",
                        self.root, self.splits[stage], len(empty), len(cases), ", ".join(empty[:5]))  # fmt: skip
        # the store keeps the volumes: the dataset's own image cache would keep each slice a second time
        return SliceDataset(records, pre, prompts, True, augment, seed, intensity, values, cache_images=0)


def volume_layout_of(
    root: Path, splits: list[str], image_dir: str, mask_dir: str, pair_key: str | None = None,
    modality: str | None = None,
) -> VolumeLayout:  # fmt: skip
    """The volume layout of ``root`` (``layout: volumes`` configured), or one line saying what was looked for.

    Args:
        root: the dataset folder.
        splits: the configured split folder names.
        image_dir: the configured image folder name.
        mask_dir: the configured mask folder name.
        pair_key: ``data.init_args.pair_key``: image and label folders and flat folders pair by it; a flat
            folder without it by the one of :data:`segtune.data.volumes.FLAT_NAMINGS` its names follow.
        modality: ``data.init_args.modality``: which image a case with several reads (flat and case folders).

    Raises:
        ValueError: one line naming the folder: no layout, or a flat folder whose names pair in no or several ways.
    """
    found = find_volume_layout(root, splits, image_dir, mask_dir)
    if found is None:
        raise ValueError(
            f"{root}: no volume layout recognised; looked for imagesTr/ (Decathlon, nnU-Net), {image_dir}/ with "
            f"{mask_dir}/ or labels/ of volume files, image and label volumes side by side (<case>_image + "
            "<case>_label, volume-<n> + segmentation-<n>, <case> + <case>_seg), one folder per case (imaging + "
            "segmentation, <case>_<modality> + <case>_seg), here or in split folders, and MedSAM2 .npz files"
        )
    if found.kind == "flat":  # the first folder's naming, logged (and a folder whose names pair not stops here)
        folder = next(f for f in (root, *(root / s for s in splits)) if holds_flat_volumes(f))
        log.info("%s: image and label volumes paired %s", folder, flat_naming(folder, pair_key)[1])
    used_by = {"pair_key": (pair_key, ("folders", "flat")), "modality": (modality, ("flat", "cases"))}
    for option, (value, kinds) in used_by.items():
        if value is not None and found.kind not in kinds:
            log.warning("%s: data.init_args.%s is not used by the %s volume layout", root, option, found.kind)
    return replace(found, pair_key=pair_key if found.kind in ("folders", "flat") else None, modality=modality)
