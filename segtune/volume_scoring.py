"""How volumes are scored and predicted: box propagation through the slices, volume Dice and NSD.

The protocol MedSAM and micro-sam evaluate 3D data with: every object (a label, or a connected
component of one, by the data's instance rule) is prompted once, with its ground-truth box on its
middle slice; each next slice, in both directions, is prompted with the box of the previous slice's
prediction grown by ``box_margin`` pixels, until the prediction vanishes. The objects' predictions
make one label volume, scored per class against the label volume: volume Dice (the same
:func:`segtune.postprocess.overlap` that scores 2D instances) and the normalised surface Dice at
``tolerance_mm`` with the case's spacing (surface elements weighted by area, as DeepMind's
``surface-distance`` and MedSAM compute it: MONAI's ``compute_surface_dice`` with ``use_subvoxels``;
MedSAM reports it at 2 mm).
Beside them, ``slice_dice`` is the mean Dice with the ground-truth box on every slice (the
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device

from segtune.click_scores import click_score_names
from segtune.data.batch import Sample, collate
from segtune.data.intensity import gray_to_rgb
from segtune.data.prompts import mask_to_box
from segtune.data.slices import PreparedVolume, VolumeOptions, connected_components, slice_instances
from segtune.postprocess import EmptyTarget, best_masks, overlap, predictions, score_instances
from segtune.preprocessing import Preprocessing, preprocess_image, scale_coords
from segtune.propagation import (
    PROTOCOLS,
    STOP_GRID,
    BoxPropagation,
    Followed,
    ObjectPrompt,
    PromptProtocol,
    PropagationOptions,
    SliceOutput,
    SlicePredictor,
    StopRule,
    check_options,
    choose_stop,
    is_finite,
    is_integer,
    is_number,
    largest_component,
    loosest,
    slice_range,
    stop_counts,
)
from segtune.slice_prompts import ObjectPredictor, SlicePrompt
from segtune.volume_clicks import curve_rows, follow_each, volume_click_curves

#: The scores of every volume row, in report order: volume Dice and NSD of the configured protocol; the
#: ceiling (every slice of the object's range prompted with its own ground-truth box, stacked and scored as
#: a volume: the most box propagation can reach with this model); the mean per-slice Dice with those boxes
#: and its filled-box floor; slices predicted outside the class's true slice range, and slices of that
#: range left empty.
VOLUME_SCORES = (
    "dice", "nsd", "ceiling_dice", "ceiling_nsd", "slice_dice", "box_dice", "outside_slices", "empty_slices",
)  # fmt: skip


#: Why ``clicks`` on volumes needs box propagation (said before any work by the module's setup).
MEMORY_CLICKS = (
    "model.init_args.clicks on volumes re-propagates each clicked slice by boxes: volume_scoring.propagation: memory "
    "is not scored with clicks; set model.init_args.clicks: 0 or volume_scoring.propagation: box"
)


def volume_score_names(clicks: int = 0) -> tuple[str, ...]:
    """The scores of a volume row: :data:`VOLUME_SCORES`, then with ``clicks`` rounds (``model.init_args.clicks``)
    volume Dice and NSD after each click, the Dice curve's AUC, gain and NoC (:mod:`segtune.volume_clicks`)."""
    return (*VOLUME_SCORES, *click_score_names(clicks, "nsd"))


@dataclass(frozen=True)
class VolumeScoring:
    """How volumes are scored and predicted (``model.init_args.volume_scoring``).

    Args:
        prompt: the 3D prompt protocol (:mod:`segtune.propagation`): ``"box3d"`` (each object's 3D box,
            its slice range known: MedSAM's 3D inference and the CVPR 2024/2025 challenges; what published
            numbers use) or ``"box2d"`` (one box on the object's middle slice, the range unknown: propagation
            stops where ``stop`` says the object ends).
        propagation: how each object is followed from its prompted slice: ``"box"`` (every model: each
            next slice prompted with the previous slice's predicted box) or ``"memory"`` (Sam2,
            Sam3Tracker, MedSAM2: transformers' video model, each slice conditioned on the memories of
            the slices before it; :mod:`segtune.volume_memory`), within the same prompts and ranges.
        tolerance_mm: the normalised surface Dice's tolerance in mm (MedSAM: 2).
        box_margin: pixels, in the model's input frame, each side of the previous slice's predicted box
            grows by before it prompts the next slice (LiteMedSAM's 3D inference: 3 at 256); never
            beyond the object's first box, so margins do not compound.
        stop: ``box2d``: the predicted IoU, the overlap with the previous slice's mask and the mask's area
            against the prompted slice's mask a slice needs to be kept
            (:class:`segtune.propagation.StopRule`); used as it is with ``choose_stop: false``.
        choose_stop: ``box2d``: choose ``stop`` on the validation volumes at every validation (among the
            rules of :data:`segtune.propagation.STOP_GRID` within ``STOP_TOLERANCE`` mean volume Dice of the
            best, the one with the fewest slices outside the objects' ranges); the choice is logged
            (``val_stop_min_score``, ``val_stop_min_overlap``, ``val_stop_min_area``), kept in the
            checkpoint and used by ``segtune test`` of that checkpoint. Never chosen on the test split.
        mask_prompt: also give the previous slice's low-resolution mask logits as a mask prompt
            (micro-sam's ``projection: mask``).
        largest_component: keep only each object's largest 3D connected component (MedSAM2).
        min_pixels: a prediction with fewer pixels is empty.
        slice_batch: slices per model call in the per-slice ground-truth-box pass.
        slice_scores: also score every slice with its ground-truth boxes (``slice_dice``,
            ``box_dice``, ``ceiling_dice``, ``ceiling_nsd``); one more decoder call per object slice.
        slice_cache_mib: the image encoder's outputs of a case's slices kept while the case is scored,
            in MiB, so that each slice is encoded once for every object, direction and pass (4 MiB a
            slice for SAM, MedSAM and LiteMedSAM; 84 MiB for SAM2); 0 encodes a slice at every call.
    """

    prompt: PromptProtocol = "box3d"
    propagation: Literal["box", "memory"] = "box"
    tolerance_mm: float = 2.0
    box_margin: float = 3.0
    stop: StopRule = StopRule()
    choose_stop: bool = True
    mask_prompt: bool = False
    largest_component: bool = False
    min_pixels: int = 1
    slice_batch: int = 8
    slice_scores: bool = True
    slice_cache_mib: int = 2048

    @property
    def chooses_stop(self) -> bool:
        """Whether a stop rule is chosen on the validation split (``box2d`` by boxes with ``choose_stop``)."""
        return self.prompt == "box2d" and self.choose_stop and self.propagation == "box"

    def __post_init__(self) -> None:
        # every value checked before any work (a negative tolerance_mm stopped only after a case had been
        # scored, in MONAI's words); stop's own values are checked by StopRule, which is built first
        ints = {"min_pixels": 0, "slice_batch": 1, "slice_cache_mib": 0}
        flags = ("choose_stop", "mask_prompt", "largest_component", "slice_scores")
        check_options("model.init_args.volume_scoring", (
            ("prompt", self.prompt, self.prompt in tuple(PROTOCOLS), f"one of {list(PROTOCOLS)}"),
            ("propagation", self.propagation, self.propagation in ("box", "memory"), "one of ['box', 'memory']"),
            ("tolerance_mm", self.tolerance_mm, is_number(self.tolerance_mm) and self.tolerance_mm > 0, "> 0"),
            ("tolerance_mm", self.tolerance_mm, is_finite(self.tolerance_mm), "finite"),
            ("box_margin", self.box_margin, is_number(self.box_margin) and self.box_margin >= 0, ">= 0"),
            ("box_margin", self.box_margin, is_finite(self.box_margin), "finite"),
            ("stop", self.stop, isinstance(self.stop, StopRule), "a StopRule (min_score, min_overlap)"),
            *((k, getattr(self, k), isinstance(getattr(self, k), bool), "true or false") for k in flags),
            *((k, getattr(self, k), is_integer(getattr(self, k)) and getattr(self, k) >= low, f"an integer >= {low}")
              for k, low in ints.items()),
        ))  # fmt: skip


# --- objects and their prompts ---------------------------------------------------------------------------
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
        parts = connected_components(region)
        count = int(parts.max())
        sizes = np.bincount(parts.ravel())
        objects += [(cls, parts == c) for c in range(1, count + 1) if sizes[c] >= options.min_area]
    return objects


def middle_slice(mask: np.ndarray) -> int:
    """The slice in the middle of a ``(S, H, W)`` object's extent (the nearest with foreground to it)."""
    present = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    middle = (present[0] + present[-1]) / 2
    return int(present[np.argmin(np.abs(present - middle))])


def object_prompt(mask: np.ndarray, protocol: PromptProtocol) -> ObjectPrompt:
    """The prompt the protocol gives a ``(S, H, W)`` ground-truth object: ``box3d`` its 3D box (the in-plane
    extent over all its slices, on its middle slice, with its slice range), ``box2d`` its box on its middle
    slice."""
    k = middle_slice(mask)
    if protocol == "box3d":
        return ObjectPrompt(k, mask_to_box(mask.any(axis=0)), slice_range(mask))
    return ObjectPrompt(k, mask_to_box(mask[k]))


def margin_pixels(scoring: VolumeScoring, image_size: int, size: tuple[int, int]) -> float:
    """``box_margin`` (model input pixels) in pixels of a slice of ``size`` (the longest side is resized
    to ``image_size``)."""
    return float(scoring.box_margin) * max(size) / float(image_size)


def follow(
    module: Any, volume: PreparedVolume, predict: SlicePredictor, objects: Sequence[ObjectPrompt],
    scoring: VolumeScoring, stop: StopRule, follow_rule: StopRule | None = None,
) -> list[Followed]:  # fmt: skip
    """Each object followed through ``volume`` by the configured propagation (``box`` with the prompt protocol,
    or ``memory``), stopped by ``stop`` (``box2d``); ``follow_rule`` (looser) keeps slices past it for
    choosing a stop rule."""
    if scoring.propagation == "memory":
        from segtune.volume_memory import propagate_memory  # transformers' video classes load only when asked for

        masks = propagate_memory(
            module, volume, [o.slice for o in objects], [o.prompt for o in objects], scoring.min_pixels,
            [o.slices for o in objects],
        )  # fmt: skip
        return [Followed(largest_component(m) if scoring.largest_component else m) for m in masks]
    protocol = box_protocol(module, volume, scoring, stop, follow_rule)
    return protocol(predict, tuple(volume.image.shape), objects)  # type: ignore[arg-type]


def box_protocol(
    module: Any, volume: PreparedVolume, scoring: VolumeScoring, stop: StopRule, follow_rule: StopRule | None = None
) -> BoxPropagation:
    """The configured box protocol for ``volume``'s slices, its options from ``scoring``."""
    size = tuple(volume.image.shape[1:])
    options = PropagationOptions(
        margin=margin_pixels(scoring, module.preprocessing.image_size, size), min_pixels=scoring.min_pixels,
        mask_prompt=scoring.mask_prompt, largest_component=scoring.largest_component,
    )  # fmt: skip
    return PROTOCOLS[scoring.prompt](options, stop, follow_rule)


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
    """Normalised surface Dice of two ``(S, H, W)`` bool volumes at ``tolerance_mm`` with ``spacing`` (mm along
    ``(S, H, W)``); NaN when both are empty, 0 when only one is.

    The published definition (DeepMind's ``surface-distance``, which MedSAM, its challenges and the Decathlon
    use): surface elements on the voxel-corner grid, each weighted by its area in mm², by MONAI's
    ``use_subvoxels=True`` (its default counts boundary voxels: another number, mostly lower).
    ``tests/test_nsd.py`` checks it against DeepMind's algorithm."""
    from monai.metrics import compute_surface_dice  # monai is imported only where volumes are scored

    if not pred.any() and not target.any():
        return float("nan")
    if not pred.any() or not target.any():
        return 0.0
    # evaluation runs under the Trainer's autocast (bf16-mixed on CPUs that compute it): MONAI's subvoxel
    # convolution must run in float32, and a bf16 autocast region refuses it
    with warnings.catch_warnings(), torch.autocast("cpu", enabled=False):
        warnings.simplefilter("ignore", FutureWarning)  # monai 1.5+ warns about its own internal argument
        score = compute_surface_dice(
            torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None], [float(tolerance_mm)],
            include_background=True, spacing=[float(s) for s in spacing], use_subvoxels=True,
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
def slice_predictor(module: Any, volume: PreparedVolume, batch_size: int = 8, cache_mib: int = 0) -> SlicePredictor:
    """A :class:`~segtune.propagation.SlicePredictor` running ``module`` (a
    :class:`~segtune.methods.base.SegmentationModule`) on slices of ``volume``, ``batch_size`` slices per
    call; several prompts may share a slice. A prompt is an ``[4]`` box, ``[P, 3]`` points or a
    :class:`~segtune.slice_prompts.SlicePrompt` (a box with points); one call takes one kind.

    Propagation prompts a slice once per object and direction, and the ground-truth-box pass once
    more: with ``cache_mib`` the image encoder's output of each slice is kept (up to that many MiB,
    the oldest dropped first) so the encoder, nearly all of a call's cost, runs once per slice.
    With mask prompts each prompt runs as its own image (SAM's mask prompt is one dense input per
    image), on the same kept encoder output.
    """
    pre: Preprocessing = module.preprocessing
    pixels: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
    kept = SliceEncodings(module, cache_mib)

    def sample(k: int, prompts: list[SlicePrompt], longest: int) -> Sample:
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
        if prompts[0].box is not None:  # boxes (alone, or with points: one prompt of both)
            boxes = torch.from_numpy(np.stack([p.box for p in prompts]).astype(np.float32))
            s["boxes"], s["input_boxes"] = boxes, scale_coords(boxes, size, reshaped)
        if prompts[0].points is not None:
            # prompts with fewer points than the call's most get SAM's "not a point" (-10), as collate pads
            points = torch.zeros(n, longest, 3)
            points[:, :, 2] = -10
            for j, p in enumerate(prompts):
                points[j, : len(p.points)] = torch.from_numpy(np.asarray(p.points, np.float32))
            s["input_points"] = scale_coords(points[:, :, :2].contiguous(), size, reshaped)
            s["input_labels"] = points[:, :, 2].long()
        return s

    def predict(
        indices: Sequence[int], asked: Sequence[np.ndarray | SlicePrompt],
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> list[SliceOutput]:  # fmt: skip
        prompts = [SlicePrompt.of(p) for p in asked]
        # the model calls' images: a slice with its prompts, or (mask prompts) one prompt alone
        groups: list[tuple[int, list[int]]] = []
        if masks is None:
            by_slice: dict[int, list[int]] = {}
            for i, k in enumerate(indices):
                by_slice.setdefault(int(k), []).append(i)
            groups = list(by_slice.items())
        else:
            groups = [(int(k), [i]) for i, k in enumerate(indices)]
        out: list[SliceOutput | None] = [None] * len(prompts)
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            kinds = {prompts[i].kind for _, members in chunk for i in members}
            assert len(kinds) == 1, "one kind of prompt per call"
            longest = max(len(prompts[i].points) if prompts[i].points is not None else 0
                          for _, members in chunk for i in members)  # fmt: skip
            samples = [sample(k, [prompts[i] for i in members], longest) for k, members in chunk]
            batch = collate(samples)
            if masks is not None:
                batch["input_masks"] = _mask_inputs([masks[members[0]] for _, members in chunk])
            batch = move_data_to_device(batch, module.device)
            output = kept.forward([k for k, _ in chunk], samples, batch)
            logits, _ = best_masks(output.pred_masks, output.iou_scores)
            for row, ((_, members), predicted) in enumerate(zip(chunk, predictions(output, batch, pre), strict=True)):
                for j, i in enumerate(members):
                    out[i] = SliceOutput(
                        predicted.masks[j].cpu().numpy(), float(predicted.scores[j]), logits[row, j].detach().float()
                    )
        return out  # type: ignore[return-value]

    return predict


def _mask_inputs(masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``[B, 1, s, s]`` mask prompts (SAM's ``input_masks``): the given low-resolution logits, or, for a
    prompt without one, logits that say "no mask information" (a large negative value, as SAM's own
    first round passes no mask)."""
    given = next(m for m in masks if m is not None)
    return torch.stack([m if m is not None else torch.full_like(given, -20.0) for m in masks])[:, None]


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
        # each slice not kept yet, once (with mask prompts a slice can stand in a chunk once per prompt)
        missing = list(dict.fromkeys(k for k in chunk if k not in self.slices))
        fresh: dict[int, list[torch.Tensor]] = {}
        if missing:  # encoded by the module: a method's own embedding cache is asked first
            sub = move_data_to_device(collate([samples[list(chunk).index(k)] for k in missing]), self.module.device)
            levels = self.module.encode(sub)
            fresh = {k: [level[j : j + 1] for level in levels] for j, k in enumerate(missing)}
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
    module: Any, item: dict[str, Any], scoring: VolumeScoring, empty_target: EmptyTarget = "exclude",
    choosing: bool = False,
) -> tuple[np.ndarray, list[dict[str, Any]]]:  # fmt: skip
    """Prompt and follow every object of one case by the configured protocol and score it: the predicted
    ``(S, H, W)`` label volume and one row per class (``class_index``, :data:`VOLUME_SCORES`; NaN where a
    score is left out). With ``choosing`` (a validation under ``box2d`` with ``choose_stop``) objects are
    followed as far as the loosest rule of :data:`~segtune.propagation.STOP_GRID` goes, and a row also holds
    ``stop_counts`` (what each rule would score) and ``target_voxels``, for the choice. With the module's
    ``clicks`` rounds (box propagation), each row also holds the scores after each click
    (:func:`volume_score_names`; :mod:`segtune.volume_clicks`)."""
    volume: PreparedVolume = item["volume"]
    values: list[int] = item["values"]
    options: VolumeOptions = item["options"]
    label = volume.label
    assert label is not None
    predict = slice_predictor(module, volume, scoring.slice_batch, scoring.slice_cache_mib)
    found = volume_objects(label, values, options)
    prompts = [object_prompt(mask, scoring.prompt) for _, mask in found]
    stop = stop_rule(module)
    choosing = choosing and scoring.chooses_stop
    follow_rule = loosest([stop, *STOP_GRID]) if choosing else None
    rounds = int(getattr(module, "clicks", 0) or 0)
    if rounds and scoring.propagation != "box":
        raise ValueError(MEMORY_CLICKS)
    if rounds:  # each object alone, the box and logits of its slices kept for the click rounds
        protocol = box_protocol(module, volume, scoring, stop, follow_rule)
        followed, clicked = follow_each(protocol, predict, tuple(label.shape), found, prompts)  # type: ignore[arg-type]
    else:
        followed = follow(module, volume, predict, prompts, scoring, stop, follow_rule)

    def score(objects: Sequence[tuple[int, np.ndarray]]) -> tuple[np.ndarray, dict[int, dict[str, float]]]:
        painted = paint(objects, values, label.shape)
        return painted, class_scores(painted, label, values, volume.spacing, scoring.tolerance_mm, empty_target)

    predicted, volume_scores = score([(cls, f.mask) for (cls, _), f in zip(found, followed, strict=True)])
    clicks: dict[int, dict[str, float]] = {}
    if rounds:
        allowed = getattr(getattr(module, "sanitise", None), "allowed", None)  # a model without input_masks
        click_options = module.click_scoring
        curves = volume_click_curves(
            protocol, predict, clicked, label, values, rounds, click_options, score, (predicted, volume_scores),
            int(item["index"]), click_options.mask_input and (allowed is None or "input_masks" in allowed),
            tuple(volume.spacing),
        )  # fmt: skip
        clicks = curve_rows(curves, range(len(values)), rounds)
    slice_means, ceiling = (
        _slice_scores(predict, label, values, options, empty_target) if scoring.slice_scores else ({}, None)
    )
    ceiling_scores = (
        class_scores(ceiling, label, values, volume.spacing, scoring.tolerance_mm, empty_target) if ceiling is not None
        else {}
    )  # fmt: skip
    rows = []
    for cls in sorted(set(volume_scores) | set(slice_means)):
        row = {"class_index": cls, **volume_scores.get(cls, {"dice": math.nan, "nsd": math.nan})}
        ceiling_row = ceiling_scores.get(cls, {"dice": math.nan, "nsd": math.nan})
        row.update({"ceiling_dice": ceiling_row["dice"], "ceiling_nsd": ceiling_row["nsd"]})
        row.update(slice_means.get(cls, {"slice_dice": math.nan, "box_dice": math.nan}))
        row.update(range_errors(predicted == values[cls], label == values[cls]))
        row.update(clicks.get(cls, {}))
        if choosing:
            target = label == values[cls]
            counts = [stop_counts(f, target) for (c, _), f in zip(found, followed, strict=True) if c == cls]
            row["stop_counts"] = {r: tuple(map(sum, zip(*(c[r] for c in counts), strict=True))) for r in STOP_GRID}
            row["target_voxels"] = float(target.sum())
        rows.append(row)
    return predicted, rows


def stop_rule(module: Any) -> StopRule:
    """The ``box2d`` stop rule in force: the one chosen on the validation split (kept in the checkpoint), else
    the configured ``volume_scoring.stop``."""
    chosen = getattr(module, "chosen_stop", None)
    return chosen if isinstance(chosen, StopRule) else module.volume_scoring.stop


class StopChoice:
    """``box2d``'s stop rule chosen on the validation volumes: the evidence of one validation (each (case,
    class) row's ``stop_counts``), then the :data:`~segtune.propagation.STOP_GRID` rule that
    :func:`~segtune.propagation.choose_stop` takes (near the best mean volume Dice, the fewest slices outside)."""

    def __init__(self) -> None:
        self.rows: list[dict[StopRule, tuple[float, ...]]] = []
        self.targets: list[float] = []

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Keep the evidence of scored (case, class) rows (those without it are skipped)."""
        for row in rows:
            if "stop_counts" in row:
                self.rows.append(row["stop_counts"])
                self.targets.append(row["target_voxels"])

    def finish(self) -> StopRule | None:
        """The chosen rule (``None`` without evidence); the evidence is cleared for the next validation."""
        chosen = choose_stop(self.rows, self.targets) if self.rows else None
        self.rows, self.targets = [], []
        return chosen


def range_errors(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Slices of a ``(S, H, W)`` class predicted outside its true slice range (``outside_slices``), and slices of
    that range left empty (``empty_slices``); NaN when the class is absent from the ground truth."""
    truth = target.reshape(len(target), -1).any(axis=1)
    if not truth.any():
        return {"outside_slices": math.nan, "empty_slices": math.nan}
    first, last = slice_range(target)
    predicted = pred.reshape(len(pred), -1).any(axis=1)
    inside = np.zeros(len(pred), bool)
    inside[first : last + 1] = True
    return {"outside_slices": float((predicted & ~inside).sum()), "empty_slices": float((~predicted & inside).sum())}


def _slice_scores(
    predict: SlicePredictor, label: np.ndarray, values: list[int], options: VolumeOptions, empty_target: EmptyTarget
) -> tuple[dict[int, dict[str, float]], np.ndarray | None]:
    """Each class's mean Dice with the ground-truth box on every slice and its filled-box floor; and those
    predictions stacked into a label volume (the ceiling of box propagation)."""
    indices, boxes, targets, classes = [], [], [], []
    for k in np.flatnonzero(np.isin(label, values).reshape(len(label), -1).any(axis=1)):
        masks, found = slice_instances(label[k], values, options)
        for mask, cls in zip(masks, found, strict=True):
            indices.append(int(k))
            boxes.append(mask_to_box(mask))
            targets.append(mask)
            classes.append(cls)
    if not indices:
        return {}, None
    masks = [o.mask for o in predict(indices, boxes)]
    scores = score_instances(
        torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(boxes)),
        empty_target,
    )  # fmt: skip
    ceiling = np.zeros(label.shape, np.uint8 if max(values, default=0) < 256 else np.uint16)
    for k, mask, cls in zip(indices, masks, classes, strict=True):
        ceiling[k][mask] = values[cls]
    out = {}
    for cls in sorted(set(classes)):
        picked = torch.tensor([c == cls for c in classes])
        out[cls] = {
            "slice_dice": float(scores.dice[picked].nanmean()),
            "box_dice": float(scores.box_dice[picked].nanmean()),
        }
    return out, ceiling


# --- the module's evaluation and prediction steps -------------------------------------------------------
@dataclass
class ScoredCase:
    """One case of an evaluation batch, followed and scored (:func:`score_case`).

    Args:
        item: the batch's item (``index``, ``volume``, ``values``, ``options``).
        predicted: the predicted ``(S, H, W)`` label volume.
        rows: :func:`score_case`'s rows, one per class (``class_index``, :data:`VOLUME_SCORES`, NaN where a
            score is left out).
    """

    item: dict[str, Any]
    predicted: np.ndarray
    rows: list[dict[str, Any]]


def score_cases(module: Any, batch: dict[str, Any], choosing: bool = False) -> list[ScoredCase]:
    """Every case of an evaluation batch followed and scored by ``module``; nothing logged, no metric or module
    state changed.

    The one path from a batch of cases to scores: validation and test (:func:`evaluate_volumes`), the untuned
    model's validation pass and its rows beside the checkpoint in the test report all go through it.
    ``choosing``: also gather the evidence for ``box2d``'s stop rule (:func:`score_case`).
    """
    scoring: VolumeScoring = module.volume_scoring
    cases = []
    for item in batch["volumes"]:
        predicted, rows = score_case(module, item, scoring, module.hparams.empty_target, choosing)
        cases.append(ScoredCase(item, predicted, rows))
    return cases


def choose_stop_on(module: Any, batches: Iterable[dict[str, Any]]) -> StopRule | None:
    """``box2d``'s stop rule chosen on the cases of ``batches`` (the validation split): what ``segtune test``
    of a model without a chosen rule (the untuned one) uses, so that the test split never chooses it.
    ``None`` when there is no case to choose on."""
    choice = StopChoice()
    with torch.no_grad():
        for batch in batches:
            choice.add([row for case in score_cases(module, batch, choosing=True) for row in case.rows])
    return choice.finish()


def update_case_metrics(
    metrics: Any, cases: Sequence[ScoredCase], empty: Any = None, scores: Sequence[str] = VOLUME_SCORES
) -> None:
    """Add scored cases to a stage's metrics (:func:`segtune.metrics.segmentation_metrics` of ``scores``,
    :func:`volume_score_names`) and, when given, its :class:`~segtune.metrics.EmptyPredictions`."""
    for case in cases:
        if not case.rows:
            continue
        classes = torch.tensor([r["class_index"] for r in case.rows])
        metrics.update({name: torch.tensor([r[name] for r in case.rows]) for name in scores}, classes)
        if empty is not None:
            class_values = [case.item["values"][c] for c in classes.tolist()]
            empty.update(
                torch.from_numpy(np.stack([case.predicted == v for v in class_values])),
                torch.from_numpy(np.stack([case.item["volume"].label == v for v in class_values])),
            )


def case_report_rows(
    cases: Sequence[ScoredCase], class_names: Sequence[str], scores: Sequence[str] = VOLUME_SCORES
) -> list[dict[str, Any]]:
    """The report rows of scored cases, one per case and class: ``image_id`` (the case's index), ``file_name``
    (its name), ``instance`` (the class index), ``class`` and ``scores`` (``None`` where left out),
    as the test report writes them and :func:`segtune.paired.paired_rows` pairs them."""
    rows = []
    for case in cases:
        volume: PreparedVolume = case.item["volume"]
        for r in case.rows:
            rows.append({
                "image_id": int(case.item["index"]), "file_name": volume.case.name, "instance": int(r["class_index"]),
                "class": _name(class_names, r["class_index"]),
                **{name: None if math.isnan(r[name]) else float(r[name]) for name in scores},
            })  # fmt: skip
    return rows


def evaluate_volumes(module: Any, batch: dict[str, Any], stage: str) -> dict[str, Any]:
    """A validation or test step on a batch of cases: propagate, score, update the stage's metrics.

    Returns:
        ``report_rows`` (one per case and class, as the test report writes them) and ``report_scores``.
    """
    cases = score_cases(module, batch, choosing=stage == "val" and hasattr(module, "stop_choice"))
    if stage == "val" and hasattr(module, "stop_choice"):  # box2d: evidence for the stop rule
        for case in cases:
            module.stop_choice.add(case.rows)
    names = volume_score_names(getattr(module, "clicks", 0))
    update_case_metrics(getattr(module, f"{stage}_metrics"), cases, getattr(module, f"{stage}_empty"), names)
    return {"report_rows": case_report_rows(cases, module.class_names, names), "report_scores": names,
            "report_unit": "case"}  # fmt: skip


def _name(names: Sequence[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


@dataclass
class VolumePrediction:
    """A predicted case: the label volume in the case's own ``(z, y, x)`` order and geometry."""

    volume: PreparedVolume
    label: np.ndarray
    slice_label: np.ndarray


def predict_volumes(module: Any, batch: dict[str, Any]) -> list[VolumePrediction]:
    """``segtune predict`` on cases with given prompts: each object followed from its prompted slice, by
    ``box3d`` inside its slice range when its prompt gives one (``"slices": [first, last]``), else by
    ``box2d`` with the stop rule in force. An object given a box with points has its prompted slice predicted
    from them together (:class:`~segtune.slice_prompts.ObjectPredictor`), then is followed by its box as any."""
    out = []
    scoring: VolumeScoring = module.volume_scoring
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
        objects = []
        for protocol in ("box3d", "box2d"):
            group = [p for p in item["prompts"] if (p.get("slices") is not None) == (protocol == "box3d")]
            given = [
                ObjectPrompt(p["slice"], np.asarray(p["box"] if p["box"] is not None else p["points"], np.float32),
                             tuple(p["slices"]) if p.get("slices") is not None else None)
                for p in group
            ]  # fmt: skip
            chosen = replace(scoring, prompt=protocol)
            # a box with points: that object followed alone, its points beside the box on their slice
            both = [i for i, p in enumerate(group) if p["box"] is not None and p["points"] is not None]
            if both and scoring.propagation != "box":
                raise ValueError(
                    f"{volume.case.image}: a prompt with a box and points together is followed by boxes; "
                    "volume_scoring.propagation: memory takes a box or points: set volume_scoring.propagation: box"
                )
            alone = [i for i in range(len(group)) if i not in both]
            followed = dict(zip(alone, follow(module, volume, predict, [given[i] for i in alone], chosen,
                                              stop_rule(module)), strict=True))  # fmt: skip
            for i in both:
                points = {group[i]["slice"]: np.asarray(group[i]["points"], np.float32)}
                (followed[i],) = follow(module, volume, ObjectPredictor(predict, points), [given[i]], chosen,
                                        stop_rule(module))  # fmt: skip
            objects += [(values.index(p["label"]), followed[i].mask) for i, p in enumerate(group)]
        painted = paint(objects, values, shape)
        out.append(VolumePrediction(volume, volume.to_original(painted), painted))
    return out
