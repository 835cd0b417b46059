"""Prompts for ``segtune predict`` on a folder of volumes: the prompts json, read and checked.

The json maps a case (its name or its image file's name) to its objects' prompts, one entry per object on
one slice: ``{"case.nii.gz": [{"slice": 17, "box": [x0, y0, x1, y1], "label": 1, "slices": [12, 20]},
...]}``, or ``"points": [[x, y, 1], ...]`` instead of the box, or both: a box with positive (1) and negative
(0) points prompts that slice of the object together, as a user refining a mask gives them (the 2D objects
json of :mod:`segtune.data.boxes` does the same), and the object is followed from there by its box.
``slice`` counts along the slice axis
(``data.init_args.volumes.axis``) and ``x``, ``y`` are the column and the row of that slice as the model
sees it (the volume's array with the slice axis moved first, the other two axes in their order).

Every entry is checked before any model work, as the 2D prompts of :mod:`segtune.data.boxes` are: its form
when the file is read (:func:`read_volume_prompts`), its slices and coordinates against the volume's size
(from its header, not its voxels) when it is joined to its case (:func:`prompts_by_case`). A problem stops
with one line ``<json>: entry '<case>': <entry> <what is wrong>``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segtune.data.coco import read_json
from segtune.data.volumes import Geometry, VolumeCase, case_name, volume_header

log = logging.getLogger(__name__)

#: The keys a prompt entry may hold (anything else is most likely a misspelt ``slices``, silently box2d).
ENTRY_KEYS = ("slice", "box", "points", "label", "slices")
#: What an entry looks like, for messages about its form.
ENTRY_FORM = (
    '{"slice": k, "box": [x0, y0, x1, y1], "label": v} (with "points": [[x, y, 1], ...] beside the box, or '
    "instead of it)"
)


@dataclass(frozen=True)
class CasePrompts:
    """One key of a volume prompts json: the prompts of one case.

    Args:
        key: the key as written (a case name or an image file's name), for messages.
        written: each entry as written, for messages.
        prompts: each entry as predict reads it: ``{"slice": k, "box": [x0, y0, x1, y1] or None,
            "points": [[x, y, label], ...] or None, "label": v, "slices": [first, last] or None}``.
    """

    key: str
    written: list[Any]
    prompts: list[dict[str, Any]]


class _Refused(ValueError):
    """An entry's problem, raised where it is found and given the file and the entry's key by the reader."""


def _is_number(value: Any) -> bool:
    # json's true and false are Python bools, which are ints: a prompt never means them as numbers
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    """A whole number (``3`` or ``3.0``, as numpy-written json has it), not ``3.7``, NaN, a string or a bool."""
    return _is_number(value) and math.isfinite(value) and float(value).is_integer()


def _coordinates(values: list[Any], what: str) -> list[float]:
    """Finite, non-negative numbers (the image-independent part of the 2D check)."""
    if not all(math.isfinite(v) for v in values):
        raise _Refused(f"{what} has a coordinate that is not a finite number")
    if min(values) < 0:
        raise _Refused(f"{what} has a negative coordinate")
    return [float(v) for v in values]


def _box(value: Any) -> list[float]:
    if not (isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)):
        raise _Refused('"box" is not [x0, y0, x1, y1], four numbers')
    box = _coordinates(value, '"box"')
    if box[2] <= box[0]:
        raise _Refused('"box" has x1 <= x0: a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0')
    if box[3] <= box[1]:
        raise _Refused('"box" has y1 <= y0: a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0')
    return box


def _points(value: Any) -> list[list[float]]:
    form = '"points" is not a list of [x, y, label] points (label 1 or 0)'
    if not (isinstance(value, list) and value):
        raise _Refused(form)
    rows = []
    for point in value:
        if not (isinstance(point, list) and len(point) == 3 and all(_is_number(v) for v in point)):
            raise _Refused(form)
        if point[2] not in (0, 1):
            raise _Refused(f"{form}: {point!r} has label {point[2]!r}")
        rows.append([*_coordinates(point[:2], f"point {point!r}"), float(point[2])])
    return rows


def _parse(entry: Any, class_values: list[int]) -> dict[str, Any]:
    """One entry as predict reads it, its form checked (what needs no volume).

    Raises:
        _Refused: saying what is wrong with the entry.
    """
    if not isinstance(entry, dict):
        raise _Refused(f"is not {ENTRY_FORM}")
    unknown = [k for k in entry if k not in ENTRY_KEYS]
    if unknown:
        raise _Refused(f"has the key {unknown[0]!r}; an entry holds {', '.join(map(repr, ENTRY_KEYS))}")
    if "slice" not in entry:
        raise _Refused(f'has no "slice": an entry is {ENTRY_FORM}')
    k = entry["slice"]
    if not _is_whole(k) or k < 0:
        raise _Refused(f'"slice" {k!r} is not a whole number >= 0: slices count 0, 1, 2, ... along the slice axis')
    default = class_values[0] if class_values else 1
    label = entry.get("label", default)
    classes = ", ".join(map(str, sorted(class_values)))
    if not _is_whole(label) or (class_values and int(label) not in class_values):
        raise _Refused(
            f'"label" {label!r} is not a class: the label must be one of the class values {classes} (dataset.json '
            "or data.init_args.categories)"
        )
    if "box" not in entry and "points" not in entry:
        raise _Refused(f'has neither "box" nor "points": an entry is {ENTRY_FORM}')
    box = _box(entry["box"]) if "box" in entry else None
    points = _points(entry["points"]) if "points" in entry else None
    span = entry.get("slices")
    if span is not None:
        if not (isinstance(span, list) and len(span) == 2 and all(_is_whole(v) for v in span)):
            raise _Refused('"slices" is not [first, last], two whole numbers: the object\'s first and last slice')
        span = [int(v) for v in span]
        if not span[0] <= k <= span[1]:
            raise _Refused(
                f'"slices" {span} does not hold "slice" {int(k)}: it is the object\'s [first, last] slice, '
                "first <= slice <= last"
            )
    return {"slice": int(k), "box": box, "points": points, "label": int(label), "slices": span}


def read_volume_prompts(path: Path, class_values: list[int]) -> dict[str, CasePrompts]:
    """A predict prompts json for volumes (module docstring), read and its form checked, by case name (lower case).

    ``label`` is the label value written (default: the first class's); ``"slices": [first, last]`` gives the
    object's slice range (``box3d``: its box is then the in-plane extent over the range, and nothing is
    predicted outside it); without it the object is followed until the model says it ends (``box2d``).
    The slices and coordinates are checked against each volume by :func:`prompts_by_case`.

    Args:
        path: the json.
        class_values: the label values of the classes.

    Raises:
        FileNotFoundError, ValueError: one line naming the file (and the entry when one is malformed): not
            json, no entry, two keys of one case, an entry not of the form, a coordinate that is not a finite
            number or is negative, an inverted box, a label that is no class, a slice that is not a whole number.
    """
    data = read_json(path)
    if not data:
        raise ValueError(f"{path}: no entry; a volume prompts json maps case names to lists of {ENTRY_FORM}")
    out: dict[str, CasePrompts] = {}
    for key, entries in data.items():
        written = entries if isinstance(entries, list) else [entries]  # one object may be given without a list
        prompts = []
        for entry in written:
            try:
                prompts.append(_parse(entry, class_values))
            except _Refused as e:
                raise ValueError(f"{path}: entry {key!r}: {entry!r} {e}") from None
        name = case_name(Path(key)).lower()
        if name in out:  # the later key's prompts would silently replace the earlier's
            raise ValueError(f"{path}: entries {out[name].key!r} and {key!r} name the same case; give its prompts once")
        out[name] = CasePrompts(key, written, prompts)
    return out


# --- against the volumes --------------------------------------------------------------------------------
def _check_in_volume(prompt: dict[str, Any], shape: tuple[int, int, int], axis: int) -> None:
    """Refuse a prompt whose slices or coordinates lie outside its volume.

    Args:
        prompt: the parsed entry.
        shape: the volume's ``(z, y, x)`` shape.
        axis: the array axis slices are cut across.

    Raises:
        _Refused: saying what lies outside, and the slice's or the volume's size.
    """
    count = shape[axis]
    rows, cols = (a for a in range(3) if a != axis)  # a slice keeps the other two axes in their order
    height, width = shape[rows], shape[cols]
    across = f"{count} slices across {'zyx'[axis]} (0 to {count - 1}; data.init_args.volumes.axis)"
    if not prompt["slice"] < count:
        raise _Refused(f'"slice" {prompt["slice"]} lies outside the volume: it has {across}')
    span = prompt["slices"]
    if span is not None and not (0 <= span[0] and span[1] < count):
        raise _Refused(f'"slices" {span} reaches outside the volume: it has {across}')
    outside = (
        f"lies outside the {width}x{height} slice: x is in [0, {width}] (along the volume's {'zyx'[cols]}), "
        f"y in [0, {height}] (along its {'zyx'[rows]}) on a slice across {'zyx'[axis]}"
    )
    if prompt["box"] is not None:
        # x0, y0 are non-negative and below x1, y1 (read_volume_prompts): the far corner decides
        x1, y1 = prompt["box"][2:]
        if x1 > width or y1 > height:
            raise _Refused(f'"box" {outside}')
    for x, y, _ in prompt["points"] or []:
        if x > width or y > height:
            raise _Refused(f"point [{x:g}, {y:g}] {outside}")


def prompts_by_case(
    cases: Sequence[VolumeCase], prompts: dict[str, CasePrompts], path: Path, folder: Path,
    slice_axis: Callable[[Geometry], int],
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Each case's predict prompts by its case name (lower case), checked against its volume.

    A case's entry is the one of its case name, or of its image file's name where that is one case's
    (``a_image.nrrd`` for case ``a``; not ``imaging.nii.gz``, every KiTS case's). Keys that name no case
    are logged; when none names one, nothing would be predicted, and that stops.

    Args:
        cases: the cases of ``data.init_args.predict_images``.
        prompts: :func:`read_volume_prompts`' answer.
        path: the json, for messages.
        folder: ``data.init_args.predict_images``, for messages.
        slice_axis: the array axis slices are cut across for a volume of a geometry
            (:meth:`segtune.data.slices.VolumeOptions.slice_axis`).

    Raises:
        ValueError: one line naming the json: no key names a case; an entry's slice lies outside its volume,
            or its box or a point outside the slice.
    """
    stems = Counter(case_name(c.image).lower() for c in cases)
    out: dict[str, list[dict[str, Any]]] = {}
    used: set[str] = set()
    for case in cases:
        stem = case_name(case.image).lower()
        names = [case.name.lower()] + ([stem] if stems[stem] == 1 else [])
        found = next((name for name in names if name in prompts), None)
        if found is None:
            continue
        used.add(found)
        given = prompts[found]
        header = volume_header(case.image) if given.prompts else None
        if header is not None:
            shape, geometry = header
            axis = slice_axis(geometry)
            for entry, prompt in zip(given.written, given.prompts, strict=True):
                try:
                    _check_in_volume(prompt, shape, axis)
                except _Refused as e:
                    raise ValueError(f"{path}: entry {given.key!r}: {entry!r} {e}") from None
        out[case.name.lower()] = given.prompts
    unknown = [p.key for name, p in prompts.items() if name not in used]
    if unknown and not used:
        files = ", ".join(c.image.name for c in cases[:3]) or "no volume"
        raise ValueError(
            f"{path}: none of its {len(prompts)} entries names a volume in {folder} (e.g. {unknown[0]!r}; the "
            f"folder has {files}): keys are case names or volume file names"
        )
    if unknown:
        log.warning(
            "%s: %d entries name no volume in %s and are ignored: %s%s",
            path, len(unknown), folder, ", ".join(map(repr, unknown[:5])), ", ..." if len(unknown) > 5 else "",
        )  # fmt: skip
    return out
