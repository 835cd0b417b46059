"""How volumes are scored and predicted: box propagation through the slices, volume Dice and NSD.

The protocol MedSAM and micro-sam evaluate 3D data with: every object (a label, or a connected
component of one, by the data's instance rule) is prompted once, with its ground-truth box on its
middle slice; each next slice, in both directions, is prompted with the box of the previous slice's
prediction grown by ``box_margin`` pixels, until the prediction vanishes. The objects' predictions
make one label volume, scored per class against the label volume: volume Dice (the same
:func:`segtune.postprocess.overlap` that scores 2D instances) and the normalised surface Dice at
``tolerance_mm`` with the case's spacing (MONAI's ``compute_surface_dice``; MedSAM reports it at
2 mm). Beside them, ``slice_dice`` is the mean Dice with the ground-truth box on every slice (the
2D protocol on the same slices, so a user sees what propagation loses) and ``box_dice`` its filled-box
floor.

``propagation: memory`` replaces the box propagation by a SAM2-family model's video memory
(:mod:`segtune.volume_memory`); the prompts, the stopping rule and every score stay as they are.

Each row of the report is one class of one case; the logged ``val_dice`` (checkpoint choice) and
``test_dice`` are the means of those rows' volume Dice. Nothing here knows about Lightning beyond the
module it is handed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch
from lightning.pytorch.utilities import move_data_to_device

from segtune.data.batch import Sample, collate
from segtune.data.intensity import gray_to_rgb
from segtune.data.prompts import mask_to_box
from segtune.data.slices import PreparedVolume, VolumeOptions, slice_instances
from segtune.postprocess import EmptyTarget, overlap, predictions, score_instances
from segtune.preprocessing import Preprocessing, preprocess_image, scale_coords

#: The scores of every volume row, in report order.
VOLUME_SCORES = ("dice", "nsd", "slice_dice", "box_dice")

#: ``predict(slice_indices, prompts)`` -> one ``[H, W]`` bool mask per prompt; a prompt is an ``[4]`` box
#: or ``[P, 3]`` points (``x, y, label``) on that slice.
SlicePredictor = Callable[[Sequence[int], Sequence[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class VolumeScoring:
    """How volumes are scored and predicted (``model.init_args.volume_scoring``).

    Args:
        propagation: how each object is followed from its prompted slice: ``"box"`` (every model: each
            next slice prompted with the previous slice's predicted box) or ``"memory"`` (Sam2,
            Sam3Tracker, MedSAM2: transformers' video model, each slice conditioned on the memories of
            the slices before it; :mod:`segtune.volume_memory`).
        tolerance_mm: the normalised surface Dice's tolerance in mm (MedSAM: 2).
        box_margin: pixels each side of the previous slice's predicted box grows by before it
            prompts the next slice.
        min_pixels: a prediction with fewer pixels has vanished: propagation stops there.
        slice_batch: slices per model call in the per-slice ground-truth-box pass.
        slice_scores: also score every slice with its ground-truth boxes (``slice_dice``,
            ``box_dice``); one more decoder call per slice with foreground.
        slice_cache_mib: the image encoder's outputs of a case's slices kept while the case is scored,
            in MiB, so that each slice is encoded once for every object, direction and pass (4 MiB a
            slice for SAM, MedSAM and LiteMedSAM; 84 MiB for SAM2); 0 encodes a slice at every call.
    """

    propagation: Literal["box", "memory"] = "box"
    tolerance_mm: float = 2.0
    box_margin: int = 3
    min_pixels: int = 1
    slice_batch: int = 8
    slice_scores: bool = True
    slice_cache_mib: int = 2048


# --- objects and propagation ---------------------------------------------------------------------------
def volume_objects(label: np.ndarray, values: Sequence[int], options: VolumeOptions) -> list[tuple[int, np.ndarray]]:
    """The objects of a ``(S, H, W)`` label volume: ``(class index, bool mask)``, in class order.

    ``instances: semantic`` makes one object per label value present; ``components`` one per
    26-connected component of at least ``min_area`` voxels.
    """
    objects = []
    for cls, value in enumerate(values):
        region = label == value
        if not region.any():
            continue
        if options.instances == "semantic":
            objects.append((cls, region))
            continue
        # SimpleITK (the volume library): fully connected, i.e. 26-connected in 3D
        parts = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(region.astype(np.uint8)), True))
        count = int(parts.max())
        sizes = np.bincount(parts.ravel())
        objects += [(cls, parts == c) for c in range(1, count + 1) if sizes[c] >= options.min_area]
    return objects


def middle_slice(mask: np.ndarray) -> int:
    """The slice in the middle of a ``(S, H, W)`` object's extent (the nearest with foreground to it)."""
    present = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    middle = (present[0] + present[-1]) / 2
    return int(present[np.argmin(np.abs(present - middle))])


def grow_box(box: np.ndarray, margin: float, size: tuple[int, int]) -> np.ndarray:
    """``box`` grown by ``margin`` pixels each side, inside an image of ``size`` ``(H, W)``."""
    grown = box + np.array([-margin, -margin, margin, margin], np.float32)
    grown[[0, 2]] = np.clip(grown[[0, 2]], 0, size[1])
    grown[[1, 3]] = np.clip(grown[[1, 3]], 0, size[0])
    return grown.astype(np.float32)


def propagate(
    predict: SlicePredictor, shape: tuple[int, int, int], start: int, prompt: np.ndarray, scoring: VolumeScoring
) -> np.ndarray:
    """One object's ``(S, H, W)`` bool prediction, prompted with ``prompt`` on slice ``start`` and followed
    both ways with the previous slice's predicted box (grown by ``box_margin``) until it vanishes."""
    return propagate_all(predict, shape, [start], [prompt], scoring)[0]


def propagate_all(
    predict: SlicePredictor, shape: tuple[int, int, int], starts: Sequence[int], prompts: Sequence[np.ndarray],
    scoring: VolumeScoring,
) -> list[np.ndarray]:  # fmt: skip
    """:func:`propagate` for several objects at once: every object and direction advances one slice per
    model call, so a call carries up to two prompts per object (each object's result is the same as alone)."""
    outs = [np.zeros(shape, bool) for _ in starts]
    firsts = predict(list(starts), list(prompts)) if len(starts) else []
    # (object, next slice, direction, its previous slice's prediction)
    active = []
    for i, (k, mask) in enumerate(zip(starts, firsts, strict=True)):
        if mask.sum() >= scoring.min_pixels:
            outs[i][k] = mask
            active += [(i, k + step, step, mask) for step in (1, -1)]
    size = shape[1:]
    while active := [a for a in active if 0 <= a[1] < shape[0]]:
        boxes = [grow_box(mask_to_box(previous), scoring.box_margin, size) for _, _, _, previous in active]
        masks = predict([k for _, k, _, _ in active], boxes)
        going = []
        for (i, k, step, _), mask in zip(active, masks, strict=True):
            if mask.sum() >= scoring.min_pixels:  # vanished: this object stops in this direction
                outs[i][k] = mask
                going.append((i, k + step, step, mask))
        active = going
    return outs


#: ``propagation(module, volume, predict, starts, prompts, scoring)`` -> each object's ``(S, H, W)`` bool
#: prediction, prompted with ``prompts[i]`` on slice ``starts[i]`` (``predict``: the module's
#: :data:`SlicePredictor` on that volume).
Propagation = Callable[
    [Any, PreparedVolume, SlicePredictor, Sequence[int], Sequence[np.ndarray], VolumeScoring], list[np.ndarray]
]


def box_propagation(
    module: Any, volume: PreparedVolume, predict: SlicePredictor, starts: Sequence[int], prompts: Sequence[np.ndarray],
    scoring: VolumeScoring,
) -> list[np.ndarray]:  # fmt: skip
    """MedSAM's and micro-sam's protocol, for every model: :func:`propagate_all`."""
    return propagate_all(predict, tuple(volume.image.shape), starts, prompts, scoring)  # type: ignore[arg-type]


def memory_propagation(
    module: Any, volume: PreparedVolume, predict: SlicePredictor, starts: Sequence[int], prompts: Sequence[np.ndarray],
    scoring: VolumeScoring,
) -> list[np.ndarray]:  # fmt: skip
    """SAM2's video memory, for SAM2-family models: :func:`segtune.volume_memory.propagate_memory`."""
    from segtune.volume_memory import propagate_memory  # transformers' video classes load only when asked for

    return propagate_memory(module, volume, list(starts), list(prompts), scoring.min_pixels)


#: ``VolumeScoring.propagation`` -> how objects are followed through a volume.
PROPAGATIONS: dict[str, Propagation] = {"box": box_propagation, "memory": memory_propagation}


def check_propagation(module: Any) -> None:
    """Stop with one line, before any work, when the module's model cannot run its ``propagation``.

    Raises:
        ValueError: ``propagation: memory`` on a model without a SAM2 video memory that fits it.
    """
    if module.volume_scoring.propagation == "memory":
        from segtune.volume_memory import check_memory_support

        check_memory_support(module.model, module.model_name)


def paint(objects: Sequence[tuple[int, np.ndarray]], values: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """One label volume from predicted objects, each voxel the label value of the last object covering it."""
    dtype = np.uint8 if max(values, default=0) < 256 else np.uint16
    out = np.zeros(shape, dtype)
    for cls, mask in objects:
        out[mask] = values[cls]
    return out


# --- scores ---------------------------------------------------------------------------------------
def surface_dice(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice of two ``(S, H, W)`` bool volumes at ``tolerance_mm`` with ``spacing`` (mm per
    axis), by MONAI; NaN when both are empty, 0 when only one is."""
    from monai.metrics import compute_surface_dice  # monai is imported only where volumes are scored

    if not pred.any() and not target.any():
        return float("nan")
    if not pred.any() or not target.any():
        return 0.0
    with warnings.catch_warnings():  # monai 1.5+ warns about its own internal argument
        warnings.simplefilter("ignore", FutureWarning)
        score = compute_surface_dice(
            torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None], [float(tolerance_mm)],
            include_background=True, spacing=[float(s) for s in spacing],
        )  # fmt: skip
    return float(score.item())


def class_scores(
    pred: np.ndarray, label: np.ndarray, values: Sequence[int], spacing: Sequence[float], tolerance_mm: float,
    empty_target: EmptyTarget = "exclude",
) -> dict[int, dict[str, float]]:  # fmt: skip
    """Volume Dice and NSD of each class present in the prediction or the ground truth: ``{class: {dice, nsd}}``."""
    out = {}
    for cls, value in enumerate(values):
        p, t = pred == value, label == value
        if not p.any() and not t.any():
            continue
        dice = overlap(torch.from_numpy(p.reshape(1, -1, p.shape[-1])), torch.from_numpy(t.reshape(1, -1, t.shape[-1])),
                       "dice", empty_target)  # fmt: skip
        out[cls] = {"dice": float(dice[0]), "nsd": surface_dice(p, t, spacing, tolerance_mm)}
    return out


# --- running a module on slices ---------------------------------------------------------------------------
def slice_predictor(
    module: Any, volume: PreparedVolume, batch_size: int = 8, cache_mib: int = 0
) -> Callable[..., list[np.ndarray]]:
    """``predict(slice_indices, prompts)`` running ``module`` (a :class:`~segtune.methods.base.SegmentationModule`)
    on slices of ``volume``, ``batch_size`` slices per call; several prompts may share a slice.

    Propagation prompts a slice once per object and direction, and the ground-truth-box pass once
    more: with ``cache_mib`` the image encoder's output of each slice is kept (up to that many MiB,
    the oldest dropped first) so the encoder, nearly all of a call's cost, runs once per slice.
    """
    pre: Preprocessing = module.preprocessing
    pixels: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
    kept = SliceEncodings(module, cache_mib)

    def sample(k: int, prompts: list[np.ndarray]) -> Sample:
        if k not in pixels:  # the slice's pixels are prepared once for every prompt and pass
            if len(pixels) > 64:
                pixels.clear()
            pixels[k] = preprocess_image(gray_to_rgb(volume.image[k]), pre)
        pixel_values, reshaped = pixels[k]
        size = tuple(volume.image.shape[1:])
        n = len(prompts)
        s: Sample = {
            "pixel_values": pixel_values, "boxes": torch.zeros(n, 4), "low_res_masks": torch.zeros(n, 1, 1),
            "masks": torch.zeros(n, 0, 0, dtype=torch.bool), "category_ids": torch.zeros(n, dtype=torch.long),
            "original_size": size, "reshaped_size": reshaped, "image_id": k,  # type: ignore[typeddict-item]
            "file_name": f"{volume.case.name} {volume.axis_name}={k}", "image_path": str(volume.case.image),
            "image_key": f"{volume.axis_name}={k}",
        }  # fmt: skip
        if prompts[0].ndim == 1:  # boxes
            boxes = torch.from_numpy(np.stack(prompts).astype(np.float32))
            s["boxes"], s["input_boxes"] = boxes, scale_coords(boxes, size, reshaped)
        else:
            points = torch.from_numpy(np.stack(prompts).astype(np.float32))
            s["input_points"] = scale_coords(points[:, :, :2].contiguous(), size, reshaped)
            s["input_labels"] = points[:, :, 2].long()
        return s

    def predict(indices: Sequence[int], prompts: Sequence[np.ndarray]) -> list[np.ndarray]:
        by_slice: dict[int, list[int]] = {}
        for i, k in enumerate(indices):
            by_slice.setdefault(int(k), []).append(i)
        out: list[np.ndarray | None] = [None] * len(prompts)
        slices = list(by_slice)
        for start in range(0, len(slices), batch_size):
            chunk = slices[start : start + batch_size]
            kinds = {prompts[by_slice[k][0]].ndim for k in chunk}
            assert len(kinds) == 1, "one kind of prompt per call"
            samples = [sample(k, [prompts[i] for i in by_slice[k]]) for k in chunk]
            batch = move_data_to_device(collate(samples), module.device)
            output = kept.forward(chunk, samples, batch)
            for k, predicted in zip(chunk, predictions(output, batch, pre), strict=True):
                for j, i in enumerate(by_slice[k]):
                    out[i] = predicted.masks[j].cpu().numpy()
        return out  # type: ignore[return-value]

    return predict


class SliceEncodings:
    """The image encoder's outputs of one volume's slices, kept up to ``budget_mib`` while it is scored.

    Args:
        module: the :class:`~segtune.methods.base.SegmentationModule` that scores.
        budget_mib: MiB kept (0: nothing kept, every call runs the whole model).
    """

    def __init__(self, module: Any, budget_mib: int) -> None:
        self.module = module
        self.budget = int(budget_mib) * 2**20
        self.slices: dict[int, list[torch.Tensor]] = {}  # insertion order: the oldest first
        self.used = 0

    def forward(self, chunk: Sequence[int], samples: Sequence[Sample], batch: dict[str, Any]) -> Any:
        """The module's output for ``batch``, collated from ``samples`` of the slices ``chunk``."""
        if self.budget <= 0 or not hasattr(self.module, "forward_encoded"):  # (a stand-in model: whole calls)
            return self.module(batch)
        missing = [i for i, k in enumerate(chunk) if k not in self.slices]
        fresh: dict[int, list[torch.Tensor]] = {}
        if missing:  # encoded by the module: a method's own embedding cache is asked first
            sub = move_data_to_device(collate([samples[i] for i in missing]), self.module.device)
            levels = self.module.encode(sub)
            fresh = {chunk[i]: [level[j : j + 1] for level in levels] for j, i in enumerate(missing)}
        rows = [self.slices[k] if k in self.slices else fresh[k] for k in chunk]
        encoded = [torch.cat([row[level] for row in rows]) for level in range(len(rows[0]))]
        for k, row in fresh.items():
            self._keep(k, row)
        return self.module.forward_encoded(batch, encoded)

    def _keep(self, k: int, row: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in row)
        while self.slices and self.used + size > self.budget:
            self.used -= sum(t.numel() * t.element_size() for t in self.slices.pop(next(iter(self.slices))))
        if size <= self.budget:
            self.slices[k] = row
            self.used += size


def score_case(
    module: Any, item: dict[str, Any], scoring: VolumeScoring, empty_target: EmptyTarget = "exclude"
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Propagate every object of one case and score it: the predicted ``(S, H, W)`` label volume and one
    row per class (``class_index``, :data:`VOLUME_SCORES`; NaN where a score is left out)."""
    volume: PreparedVolume = item["volume"]
    values: list[int] = item["values"]
    options: VolumeOptions = item["options"]
    label = volume.label
    assert label is not None
    predict = slice_predictor(module, volume, scoring.slice_batch, scoring.slice_cache_mib)
    found = volume_objects(label, values, options)
    starts = [middle_slice(mask) for _, mask in found]
    boxes = [mask_to_box(mask[k]) for (_, mask), k in zip(found, starts, strict=True)]
    followed = PROPAGATIONS[scoring.propagation](module, volume, predict, starts, boxes, scoring)
    predicted = paint([(cls, m) for (cls, _), m in zip(found, followed, strict=True)], values, label.shape)
    volume_scores = class_scores(predicted, label, values, volume.spacing, scoring.tolerance_mm, empty_target)
    slice_means = _slice_scores(predict, label, values, options, empty_target) if scoring.slice_scores else {}
    rows = []
    for cls in sorted(set(volume_scores) | set(slice_means)):
        row = {"class_index": cls, **volume_scores.get(cls, {"dice": math.nan, "nsd": math.nan})}
        row.update(slice_means.get(cls, {"slice_dice": math.nan, "box_dice": math.nan}))
        rows.append(row)
    return predicted, rows


def _slice_scores(
    predict: SlicePredictor, label: np.ndarray, values: list[int], options: VolumeOptions, empty_target: EmptyTarget
) -> dict[int, dict[str, float]]:
    """Each class's mean Dice with the ground-truth box on every slice, and its filled-box floor."""
    indices, boxes, targets, classes = [], [], [], []
    for k in np.flatnonzero(np.isin(label, values).reshape(len(label), -1).any(axis=1)):
        masks, found = slice_instances(label[k], values, options)
        for mask, cls in zip(masks, found, strict=True):
            indices.append(int(k))
            boxes.append(mask_to_box(mask))
            targets.append(mask)
            classes.append(cls)
    if not indices:
        return {}
    masks = predict(indices, boxes)
    scores = score_instances(
        torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(boxes)),
        empty_target,
    )  # fmt: skip
    out = {}
    for cls in sorted(set(classes)):
        picked = torch.tensor([c == cls for c in classes])
        out[cls] = {
            "slice_dice": float(scores.dice[picked].nanmean()),
            "box_dice": float(scores.box_dice[picked].nanmean()),
        }
    return out


# --- the module's evaluation and prediction steps -------------------------------------------------------
def evaluate_volumes(module: Any, batch: dict[str, Any], stage: str) -> dict[str, Any]:
    """A validation or test step on a batch of cases: propagate, score, update the stage's metrics.

    Returns:
        ``report_rows`` (one per case and class, as the test report writes them) and ``report_scores``.
    """
    metrics, empty = getattr(module, f"{stage}_metrics"), getattr(module, f"{stage}_empty")
    scoring: VolumeScoring = module.volume_scoring
    rows = []
    for item in batch["volumes"]:
        volume: PreparedVolume = item["volume"]
        predicted, case_rows = score_case(module, item, scoring, module.hparams.empty_target)
        if not case_rows:
            continue
        classes = torch.tensor([r["class_index"] for r in case_rows])
        metrics.update({name: torch.tensor([r[name] for r in case_rows]) for name in VOLUME_SCORES}, classes)
        class_values = [item["values"][c] for c in classes.tolist()]
        empty.update(
            torch.from_numpy(np.stack([predicted == v for v in class_values])),
            torch.from_numpy(np.stack([volume.label == v for v in class_values])),
        )
        for r in case_rows:
            rows.append({
                "image_id": item["index"], "file_name": volume.case.name, "instance": r["class_index"],
                "class": _name(module.class_names, r["class_index"]),
                **{name: None if math.isnan(r[name]) else r[name] for name in VOLUME_SCORES},
            })  # fmt: skip
    return {"report_rows": rows, "report_scores": VOLUME_SCORES, "report_unit": "case"}


def _name(names: Sequence[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


@dataclass
class VolumePrediction:
    """A predicted case: the label volume in the case's own ``(z, y, x)`` order and geometry."""

    volume: PreparedVolume
    label: np.ndarray
    slice_label: np.ndarray


def predict_volumes(module: Any, batch: dict[str, Any]) -> list[VolumePrediction]:
    """``segtune predict`` on cases with given prompts: each prompt propagated from its slice."""
    out = []
    scoring: VolumeScoring = module.volume_scoring
    propagation = PROPAGATIONS[scoring.propagation]
    for item in batch["volumes"]:
        volume: PreparedVolume = item["volume"]
        predict = slice_predictor(module, volume, scoring.slice_batch, scoring.slice_cache_mib)
        shape = tuple(volume.image.shape)
        values = sorted({p["label"] for p in item["prompts"]} | set(item["values"]))
        for prompt in item["prompts"]:
            if not 0 <= prompt["slice"] < shape[0]:
                raise ValueError(
                    f"{volume.case.image}: prompt on slice {prompt['slice']}, but the volume has {shape[0]} slices "
                    f"along {volume.axis_name} (data.init_args.volumes.axis)"
                )
        # boxes first, then points: one kind of prompt per model call
        ordered = sorted(item["prompts"], key=lambda p: p["box"] is None)
        objects = []
        for kind in (True, False):
            group = [p for p in ordered if (p["box"] is not None) == kind]
            given = [np.asarray(p["box"] if kind else p["points"], np.float32) for p in group]
            followed = propagation(module, volume, predict, [p["slice"] for p in group], given, scoring)
            objects += [(values.index(p["label"]), m) for p, m in zip(group, followed, strict=True)]
        painted = paint(objects, values, shape)
        out.append(VolumePrediction(volume, volume.to_original(painted), painted))
    return out
