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

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from segtune.data.batch import Sample
from segtune.data.dataset import InstanceDataset
from segtune.data.intensity import IntensityPolicy, gray_to_rgb, volume_to_model_range
from segtune.data.masks import split_instances
from segtune.data.prompts import PromptConfig
from segtune.data.records import ImageRecord
from segtune.data.volumes import (
    Geometry,
    VolumeCase,
    VolumeLayout,
    case_name,
    dataset_json_labels,
    find_volume_layout,
    npz_cases,
    pair_cases,
    read_volume,
    volume_files,
)
from segtune.preprocessing import Preprocessing

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
    """

    axis: Literal["auto", "x", "y", "z"] = "auto"
    instances: Literal["semantic", "components"] = "semantic"
    min_area: int = 4
    empty_slices: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.empty_slices <= 1:
            raise ValueError(
                f"data.init_args.volumes.empty_slices must be a fraction in [0, 1], got {self.empty_slices}"
            )

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
    """

    store: VolumeStore | None = None
    case: int = 0
    index: int = 0
    values: list[int] = field(default_factory=list)
    options: VolumeOptions = field(default_factory=VolumeOptions)
    prompt_from: int | None = None
    axis_name: str = "z"

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


class SliceDataset(InstanceDataset):
    """The training slices: an :class:`InstanceDataset` whose slices without foreground keep the prompts
    of their nearest foreground slice with empty targets (the model learns to stop there)."""

    def __getitem__(self, index: int) -> Sample:
        sample = super().__getitem__(index)
        if getattr(self.records[index], "prompt_from", None) is not None:
            sample["masks"] = torch.zeros_like(sample["masks"])
            sample["low_res_masks"] = torch.zeros_like(sample["low_res_masks"])
        return sample


def _slice_records(store: VolumeStore, values: list[int], options: VolumeOptions, seed: int) -> list[SliceRecord]:
    """Every slice with foreground of every case, and the ``empty_slices`` fraction of those without."""
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
        height, width = volume.image.shape[1:3]  # known, so a slice the model holds needs no decoding
        for s in sorted(int(s) for s in chosen):
            records.append(
                SliceRecord(len(records), volume.case.image, height=int(height), width=int(width), store=store,
                            case=case, index=s, values=values, options=options, prompt_from=prompt_from.get(s),
                            axis_name=volume.axis_name)
            )  # fmt: skip
    return records


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

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = self.store.get(index)
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


def read_volume_prompts(path: Path, class_values: list[int]) -> dict[str, list[dict]]:
    """A predict prompts json for volumes: ``{"<case file or name>": [{"slice": k, "box": [x0, y0, x1, y1],
    "label": v}, ...]}``, one entry per object, on one slice each (along the slice axis; ``label`` is the
    label value written, default the first class's); ``"points": [[x, y, 1], ...]`` may replace ``"box"``.

    Raises:
        ValueError: naming the file and the entry when an entry is malformed.
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid json ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a volume prompts json maps case names to lists of {{slice, box, label}}")
    out: dict[str, list[dict]] = {}
    for name, entries in data.items():
        parsed = []
        for entry in entries if isinstance(entries, list) else [entries]:
            try:
                k = int(entry["slice"])
                label = int(entry.get("label", class_values[0] if class_values else 1))
                box = [float(v) for v in entry["box"]] if "box" in entry else None
                points = [[float(v) for v in p] for p in entry["points"]] if "points" in entry else None
            except (KeyError, TypeError, ValueError, AttributeError):
                box = points = None
            if (box is None or len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]) and not (
                points and all(len(p) == 3 for p in points)
            ):
                raise ValueError(
                    f"{path}: entry {name!r}: {entry!r} is not "
                    '{"slice": k, "box": [x0, y0, x1, y1], "label": v} (or "points": [[x, y, 1], ...])'
                )
            parsed.append({"slice": k, "box": box, "points": points, "label": label})
        key = case_name(Path(name)).lower()
        out[key] = parsed
    return out


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
        self._labels: dict[int, str] | None = None

    # --- cases ---------------------------------------------------------------------------------
    def cases(self, stage: str) -> list[VolumeCase]:
        """The labelled cases of ``stage``'s split."""
        root, kind = self.root, self.layout.kind
        if kind == "decathlon":
            if stage == "test" and (root / "labelsTs").is_dir():
                return pair_cases(root / "imagesTs", root / "labelsTs")
            return self.take_split(pair_cases(root / "imagesTr", root / "labelsTr"), stage)
        folder = root / self.splits[stage]
        per_split = folder.is_dir() and (
            (folder / self.layout.image_dir).is_dir() if kind == "folders" else any(folder.glob("*.npz"))
        )
        base = folder if per_split else root
        if kind == "folders":
            cases = pair_cases(base / self.layout.image_dir, base / self.layout.label_dir)
        else:
            cases = npz_cases(base)
        return cases if per_split else self.take_split(cases, stage)

    # --- classes -------------------------------------------------------------------------------
    def labels(self) -> dict[int, str]:
        """Label value -> class name: ``categories``, else ``dataset.json``, else the values the training
        labels hold (named by their value)."""
        if self._labels is None:
            listed = dataset_json_labels(self.root / "dataset.json")
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
        intensity: IntensityPolicy, cache_mib: int, predict_images: Path | None, predict_prompts: Path | None,
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
            cases = [VolumeCase(case_name(p), p) for p in volume_files(predict_images)]
            if not cases:
                raise ValueError(f"{predict_images}: no volume files for data.predict_images")
            store = VolumeStore(cases, self.options, intensity, None, cache_mib)
            return VolumeCaseDataset(store, values, read_volume_prompts(predict_prompts, values))
        cases = self.cases(stage)
        if not cases:
            raise ValueError(f"{self.root}: split {self.splits[stage]!r} has no case")
        store = VolumeStore(cases, self.options, intensity, values, cache_mib)
        if stage != "fit":
            return VolumeCaseDataset(store, values)
        records = _slice_records(store, values, self.options, seed)
        if not records:
            raise ValueError(f"{self.root}: split {self.splits[stage]!r} has no slice with a labelled object")
        if not cache_mib:
            log.warning(
                "%s: data.init_args.cache_images is 0: each training slice reads its volume again; set it to the "
                "MiB the normalised volumes need (kept once per process)", self.root,
            )  # fmt: skip
        log.info("%s: %d training slices from %d cases", self.root, len(records), len(cases))
        # the store keeps the volumes: the dataset's own image cache would keep each slice a second time
        return SliceDataset(records, pre, prompts, True, augment, seed, intensity, values, cache_images=0)


def volume_layout_of(root: Path, splits: list[str], image_dir: str, mask_dir: str) -> VolumeLayout:
    """The volume layout of ``root`` (``layout: volumes`` configured), or one line saying what was looked for."""
    found = find_volume_layout(root, splits, image_dir, mask_dir)
    if found is None:
        raise ValueError(
            f"{root}: no volume layout recognised; looked for imagesTr/ (Decathlon, nnU-Net), {image_dir}/ with "
            f"{mask_dir}/ or labels/ of volume files here or in split folders, and MedSAM2 .npz files"
        )
    return found
