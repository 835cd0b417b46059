"""How volumes are read and written: Decathlon / nnU-Net folders, image and label folders, MedSAM2 npz.

One library does the medical volume I/O: SimpleITK. It reads and writes NIfTI (``.nii``, ``.nii.gz``),
NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) with their spacing, origin and direction
(nibabel reads no NRRD or MetaImage; pynrrd only NRRD), and its numpy order is the one MedSAM2's npz
files use. Arrays here are in that order, ``(z, y, x)``: array axis ``a`` has spacing
``geometry.spacing[2 - a]``; a :class:`Geometry` keeps SimpleITK's ``(x, y, z)`` order, as MedSAM2's
npz ``spacing`` does.

Layouts (``root`` is the dataset folder; :func:`find_volume_layout` tells which):

- ``decathlon``: ``imagesTr/`` and ``labelsTr/`` (optional ``imagesTs/``, ``labelsTs/``), with an
  optional ``dataset.json`` whose ``labels`` name the classes. Images pair with labels by case name;
  nnU-Net v2's channel suffix (``case_0000.nii.gz`` beside ``case.nii.gz``) is stripped.
- ``folders``: an image folder and a label folder (``images/`` with ``labels/`` or the configured
  mask folder) of volume files, in ``root`` or in one folder per split.
- ``npz``: MedSAM2 npz files (``imgs``, ``gts``, ``spacing`` and optional ``origin``, ``direction``),
  in ``root`` or in one folder per split.
- ``flat``: images and labels side by side in one folder (``root`` or one per split), their names
  the case's with an image or a label word: ``<case>_image.nrrd`` + ``<case>_label.nrrd``,
  ``volume-<n>.nii`` + ``segmentation-<n>.nii`` (LiTS), ``<case>.nii.gz`` + ``<case>_seg.nii.gz``.
- ``cases``: one folder per case (in ``root`` or in one folder per split) holding its image and its
  label: ``case_00000/imaging.nii.gz`` + ``segmentation.nii.gz`` (KiTS),
  ``<case>/<case>_flair.nii.gz`` ... + ``<case>_seg.nii.gz`` (BraTS; ``modality`` picks the image).

Naming, one concept for every layout that pairs by name (``pair_key``, as for 2D masks): a regular
expression whose first group, searched in a file's stem, is the case name. In one folder the file
whose name outside that group holds a label word (:data:`LABEL_WORDS`) is the label, the others are
images; when a case has several images (modalities), the last word outside the group names each.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from segtune.data.masks import MASK_SUFFIXES, compile_pair_key
from segtune.data.volume_checks import is_nifti, nonfinite_voxels

log = logging.getLogger(__name__)

#: File endings read as volumes (compared case-insensitively).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz")
#: nnU-Net v2's channel suffix on image files: ``case_0000.nii.gz`` is channel 0 of ``case``.
_CHANNEL = re.compile(r"_(\d{4})$")
#: Geometry differences below this (mm, or direction cosines) are rounding, not another grid.
GEOMETRY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie in the scanner's space, in SimpleITK's ``(x, y, z)`` order.

    Args:
        spacing: voxel size in mm along x, y, z (the array's axes 2, 1, 0).
        origin: the first voxel's position in mm.
        direction: the 3x3 direction cosines, row-major.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def array_spacing(self) -> tuple[float, float, float]:
        """Spacing along the array's axes ``(z, y, x)``."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def differs(self, other: Geometry) -> str | None:
        """What differs from ``other`` beyond rounding (for an error message), or None."""
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if a.shape != b.shape or np.abs(a - b).max() > GEOMETRY_TOLERANCE:
                return f"{name} {tuple(round(float(v), 4) for v in a)} vs {tuple(round(float(v), 4) for v in b)}"
        return None


@dataclass(frozen=True)
class VolumeCase:
    """One case: its image file and label file (``None``: unlabelled; an npz holds both).

    Args:
        name: the case name (file name without its ending and nnU-Net channel suffix).
        image: the image file.
        label: the label file; for an npz, the same file when it holds ``gts``.
    """

    name: str
    image: Path
    label: Path | None = None

    @property
    def path(self) -> Path:
        """The image file (what a split by file sorts and shuffles by, as for images)."""
        return self.image


@dataclass
class Volume:
    """A read case: ``(z, y, x)`` arrays in their stored dtype and the image's geometry."""

    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry


@dataclass(frozen=True)
class VolumeLayout:
    """A recognised volume layout.

    Args:
        kind: ``"decathlon"``, ``"folders"``, ``"npz"``, ``"flat"`` or ``"cases"`` (module docstring).
        found: what was found, for the log.
        image_dir: folders: the image folder's name.
        label_dir: folders: the label folder's name.
        pair_key: folders, flat: the configured regular expression whose first group is the case name;
            None: folders pair by file name, each flat folder by the naming it follows (:func:`flat_naming`).
        modality: flat, cases: which image a case with several reads (the last word of its name).
    """

    kind: Literal["decathlon", "folders", "npz", "flat", "cases"]
    found: str
    image_dir: str = "images"
    label_dir: str = "labels"
    pair_key: str | None = None
    modality: str | None = None


def is_volume_file(path: Path) -> bool:
    """Whether ``path`` ends in one of :data:`VOLUME_SUFFIXES` (any case); ``.raw``/``.zraw`` data files are not."""
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def volume_files(folder: Path) -> list[Path]:
    """The volume files of ``folder``, sorted by name (hidden files such as macOS ``._x.nii.gz`` skipped)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_volume_file(p))


def volume_stem(path: Path) -> str:
    """The file name without its volume ending (``case.nii.gz`` -> ``case``)."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def case_name(path: Path) -> str:
    """The case an image file belongs to: its stem without nnU-Net's ``_0000`` channel suffix."""
    return _CHANNEL.sub("", volume_stem(path))


# --- layouts -----------------------------------------------------------------------------------------
def _holds_volumes(folder: Path) -> bool:
    return folder.is_dir() and any(is_volume_file(p) for p in folder.iterdir() if p.is_file())


def _label_dir(folder: Path, image_dir: str, mask_dir: str) -> str | None:
    if not _holds_volumes(folder / image_dir):
        return None
    return next((d for d in dict.fromkeys((mask_dir, "labels")) if (folder / d).is_dir()), None)


def find_volume_layout(root: Path, splits: list[str], image_dir: str = "images", mask_dir: str = "masks") -> (
    VolumeLayout | None
):  # fmt: skip
    """The volume layout of ``root``, or None when it holds no volumes in a known layout.

    Args:
        root: the dataset folder.
        splits: the configured split folder names.
        image_dir: the configured image folder name.
        mask_dir: the configured mask folder name (``labels/`` is also looked for).
    """
    if (root / "imagesTr").is_dir():
        has_json = " and dataset.json" if (root / "dataset.json").is_file() else ""
        return VolumeLayout("decathlon", f"imagesTr/, labelsTr/{has_json}")
    label_dir = _label_dir(root, image_dir, mask_dir)
    if label_dir:
        found = f"{image_dir}/ and {label_dir}/ of volumes (split by case)"
        return VolumeLayout("folders", found, image_dir, label_dir)
    for split in dict.fromkeys(splits):
        label_dir = _label_dir(root / split, image_dir, mask_dir)
        if label_dir:
            found = f"{image_dir}/ and {label_dir}/ of volumes in {split}/"
            return VolumeLayout("folders", found, image_dir, label_dir)
    if any(p.suffix.lower() == ".npz" for p in root.glob("*.npz")):
        return VolumeLayout("npz", "MedSAM2 npz files (split by case)")
    if any(any((root / s).glob("*.npz")) for s in dict.fromkeys(splits) if (root / s).is_dir()):
        return VolumeLayout("npz", "MedSAM2 npz files in split folders")
    # split folders before case folders: a split folder of images and labels is no case
    where = _where(root, splits, holds_flat_volumes)
    if where:
        return VolumeLayout("flat", f"image and label volumes side by side {where}")
    where = _where(root, splits, holds_case_folders)
    if where:
        return VolumeLayout("cases", f"one folder per case holding its image and label volumes {where}")
    return None


def _where(root: Path, splits: list[str], holds: Callable[[Path], bool]) -> str | None:
    """Where ``holds`` is true, for the log: ``root`` (split by case) or the first split folder; None: nowhere."""
    if holds(root):
        return "(split by case)"
    return next((f"in {split}/" for split in dict.fromkeys(splits) if holds(root / split)), None)


def pair_cases(
    image_dir: Path, label_dir: Path | None, pair_key: str | None = None, skip_unpaired: bool = False
) -> list[VolumeCase]:
    """Pair the volumes of ``image_dir`` with the label files of ``label_dir`` by case name.

    Args:
        image_dir: the image folder.
        label_dir: the label folder; None: unlabelled cases.
        pair_key: a regular expression whose first group, searched in both file stems, is the case name
            (``'^(.+)_'`` pairs ``a_image.nrrd`` with ``a_label.nrrd``); None: the file name.
        skip_unpaired: leave images without a label and labels without an image out (with a warning
            listing them) instead of stopping.

    Raises:
        ValueError: one line naming the folder or file: images without a label or labels without an image
            (listing them, unless ``skip_unpaired``), a case stored twice (both files named), a second
            channel (``_0001``: segtune reads one channel) or no volume at all.
    """
    images = volume_files(image_dir)
    if not images:
        raise ValueError(f"{image_dir}: no volume files ({', '.join(VOLUME_SUFFIXES)})")
    key = compile_pair_key(pair_key)
    labels: dict[str, tuple[str, Path]] = {}
    unnamed: list[Path] = []
    for path in volume_files(label_dir) if label_dir is not None else []:
        name = _key_name(path, key)
        if name is None:
            unnamed.append(path)
        else:
            _add_once(labels, name, path)
    by_name: dict[str, tuple[str, Path]] = {}
    for path in images:
        channel = _CHANNEL.search(volume_stem(path))
        if channel and channel.group(1) != "0000":
            raise ValueError(
                f"{path}: image channel {channel.group(1)}: segtune reads single-channel volumes (channel 0000 only); "
                "move the other channels out of the folder"
            )
        _add_once(by_name, _key_name(path, key) or case_name(path), path)
    if label_dir is None:
        return [VolumeCase(name, path) for name, path in by_name.values()]
    lonely = [path for low, (_, path) in by_name.items() if low not in labels]
    orphans = unnamed + [path for low, (_, path) in labels.items() if low not in by_name]
    how = (
        f", paired by data.init_args.pair_key {pair_key!r}"
        if key
        else ", paired by file name (data.init_args.pair_key pairs names that differ)"
    )
    unpaired = {"images without a label": lonely, "labels without an image": orphans}
    settle_unpaired(f"{image_dir} and {label_dir}", unpaired, skip_unpaired, how)
    return [VolumeCase(name, path, labels[low][1]) for low, (name, path) in by_name.items() if low in labels]


def _add_once(cases: dict[str, tuple[str, Path]], name: str, path: Path) -> None:
    """``cases[name.lower()] = (name, path)``, refusing a case stored twice (two formats of one name)."""
    low = name.lower()
    if low in cases:
        raise ValueError(
            f"{path.parent}: case {name} is stored twice ({cases[low][1].name} and {path.name}); keep one file per case"
        )
    cases[low] = (name, path)


def _listing(paths: list[Path], base: Path | None, most: int = 5) -> str:
    """The first ``most`` files, named from ``base`` (``case_00002/imaging.nii.gz``) or by file name."""
    names = ", ".join(str(p.relative_to(base)) if base and p.is_relative_to(base) else p.name for p in paths[:most])
    return names + (f" and {len(paths) - most} more" if len(paths) > most else "")


def settle_unpaired(
    where: str, unpaired: dict[str, list[Path]], skip: bool, how: str = "", base: Path | None = None
) -> None:
    """Stop, or with ``skip`` warn, listing files that found no partner.

    Args:
        where: the folder(s) or file, first in the line.
        unpaired: what they are -> the files (``"images without a label"``, ``"labels without an image"``,
            ``"listed files not in the folders"``); empty lists are left out.
        skip: warn and go on (``data.init_args.volumes.unpaired: skip``) instead of stopping.
        how: how the files were paired, for the line.
        base: the files are named from this folder (None: by file name).

    Raises:
        ValueError: one line listing them, unless ``skip`` or there are none.
    """
    what = " and ".join(f"{len(paths)} {kind} ({_listing(paths, base)})" for kind, paths in unpaired.items() if paths)
    if not what:
        return
    if skip:
        log.warning("%s: %s are left out (data.init_args.volumes.unpaired: skip)", where, what)
        return
    raise ValueError(
        f"{where}: {what}{how}; pair them or move them out (data.init_args.volumes.unpaired: skip leaves them out)"
    )


def _key_name(path: Path, key: re.Pattern | None) -> str | None:
    """The case name of a file of an image or label folder: ``key``'s, else the file's (nnU-Net channel stripped)."""
    if key is None:
        return case_name(path)
    named = name_by_key(path, key)
    return named.case if named is not None else None


def npz_cases(folder: Path) -> list[VolumeCase]:
    """The MedSAM2 npz files of ``folder`` as cases (each its own label file)."""
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() == ".npz" and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no .npz files")
    return [VolumeCase(p.stem, p, p) for p in files]


# --- naming: which file of a case is its image, which its label ---------------------------------------
#: Words that make a file its case's label (the 2D masks' endings): ``<case>_seg``, ``segmentation-<n>``.
LABEL_WORDS = MASK_SUFFIXES
#: Words that make a file its case's image in a flat folder: ``<case>_image``, ``volume-<n>``, ``<case>_ct``.
IMAGE_WORDS = ("image", "images", "img", "imaging", "volume", "vol", "scan", "ct", "mr", "mri")
_SEPARATOR = r"[_\-. ]"
_WORDS = "|".join(IMAGE_WORDS + LABEL_WORDS)
#: The ``pair_key`` s tried on a flat folder, by what they read (for the log), all case-insensitive.
FLAT_NAMINGS = {
    "<case>_image + <case>_label": rf"(?i)^(.+){_SEPARATOR}(?:{_WORDS})$",
    "volume-<case> + segmentation-<case>": rf"(?i)^(?:{_WORDS})(?:{_SEPARATOR}|(?=\d))(.+)$",
    "<case> + <case>_seg": rf"(?i)^(.+?)(?:{_SEPARATOR}(?:{'|'.join(LABEL_WORDS)}))?$",
}


@dataclass(frozen=True)
class NamedFile:
    """A volume file read by its name: the case it belongs to and the rest of its name.

    Args:
        path: the file.
        case: the case name as the file writes it.
        rest: the name outside the case name (``_label``, ``segmentation-``, ``_flair``, ``imaging``).
    """

    path: Path
    case: str
    rest: str

    @property
    def words(self) -> list[str]:
        """The words of :attr:`rest`, lower case."""
        return [w for w in re.split(r"[^0-9a-z]+", self.rest.lower()) if w]

    @property
    def is_label(self) -> bool:
        """Whether a label word (:data:`LABEL_WORDS`) is among the words outside the case name."""
        return any(w in LABEL_WORDS for w in self.words)

    @property
    def modality(self) -> str:
        """The last word outside the case name (``flair``, ``t1ce``, ``imaging``); ``""`` when there is none."""
        return self.words[-1] if self.words else ""


def name_by_key(path: Path, key: re.Pattern) -> NamedFile | None:
    """``path`` named by a ``pair_key``: its first group (the whole match without one) is the case; None: no match."""
    stem = volume_stem(path)
    found = key.search(stem)
    group = 1 if key.groups else 0
    if found is None or not found.group(group):
        return None
    # a space between the two sides keeps a word before the case apart from one after it
    return NamedFile(path, found.group(group), f"{stem[: found.start(group)]} {stem[found.end(group) :]}")


def _name_in_folder(path: Path, folder: str) -> NamedFile:
    """A file of the case folder ``folder``: its name without a leading case name is the rest."""
    stem = volume_stem(path)
    rest = stem[len(folder) :] if stem.lower().startswith(folder.lower()) else stem
    return NamedFile(path, folder, rest)


def _one_case(files: list[NamedFile], modality: str | None, where: str, name: str | None = None) -> VolumeCase:
    """The case of ``files`` (one case's): its one label, if any, and its image (``modality``'s of several).

    Raises:
        ValueError: one line starting with ``where``: two labels, no image, or several images and no
            ``modality`` (listing them), or none or several of ``modality``.
    """
    labels = [f for f in files if f.is_label]
    images = [f for f in files if not f.is_label]
    if len(labels) > 1:
        raise ValueError(
            f"{where}: two label files ({labels[0].path.name}, {labels[1].path.name}); one label volume per case: "
            "move the other out (or, side by side, set data.init_args.pair_key so that each names its own case)"
        )
    if not images:
        raise ValueError(f"{labels[0].path}: a label volume whose case has no image volume beside it")
    for i, first in enumerate(files):  # one name, two formats (case.nii.gz and case.nrrd)
        twin = next((f for f in files[i + 1 :] if f.rest.lower() == first.rest.lower()), None)
        if twin is not None:
            raise ValueError(f"{where}: stored twice ({first.path.name} and {twin.path.name}); keep one file per case")
    image = images[0] if len(images) == 1 and modality is None else _modality_image(images, modality, where)
    return VolumeCase(name or image.case, image.path, labels[0].path if labels else None)


def _modality_image(images: list[NamedFile], modality: str | None, where: str) -> NamedFile:
    """The image of ``modality`` among a case's ``images``, each named by its last word."""
    held = ", ".join(f.modality or f.path.name for f in images)
    if modality is None:
        raise ValueError(f"{where}: images of several modalities ({held}); set data.init_args.modality to one of them")
    chosen = [f for f in images if f.modality == modality.lower()]
    if len(chosen) != 1:
        how = "no image" if not chosen else "several images"
        raise ValueError(
            f"{where}: {how} of data.init_args.modality {modality!r} (its images: {held}); set it to one of them"
        )
    return chosen[0]


def _labelled(
    groups: list[tuple[list[NamedFile], str, str | None]], folder: Path, labelled: bool, modality: str | None,
    skip_unpaired: bool,
) -> list[VolumeCase]:  # fmt: skip
    """The cases of ``groups`` (each case's files, where it is, its name if not the files'). ``labelled``: the cases
    with a label; images without one and labels without an image stop, listed (or, ``skip_unpaired``, are left
    out with a warning); no label at all is refused. Else every case, unlabelled.
    """
    orphans = [f.path for files, _, _ in groups if not any(not f.is_label for f in files) for f in files]
    cases = [
        _one_case(files, modality, where, name) for files, where, name in groups if any(not f.is_label for f in files)
    ]
    if not labelled:
        return [VolumeCase(c.name, c.image) for c in cases]
    kept = [c for c in cases if c.label is not None]
    if not kept:
        example = cases[0].image.name if cases else "none"
        raise ValueError(
            f"{folder}: no case has a label volume (e.g. {example}); a label's name holds one of the words "
            f"{', '.join(LABEL_WORDS)} (or set data.init_args.pair_key)"
        )
    lonely = [c.image for c in cases if c.label is None]
    unpaired = {"images without a label": lonely, "labels without an image": orphans}
    settle_unpaired(str(folder), unpaired, skip_unpaired, base=folder)
    return kept


def _flat_files(folder: Path) -> list[Path]:
    return [p for p in volume_files(folder) if p.suffix.lower() != ".npz"] if folder.is_dir() else []


def holds_flat_volumes(folder: Path) -> bool:
    """Whether ``folder`` holds volume files itself (npz aside: MedSAM2's layout)."""
    # the name first: a stat per file would cost a large 2D image folder that layout: auto looks into
    return folder.is_dir() and any(
        is_volume_file(p) and p.suffix.lower() != ".npz" and not p.name.startswith(".") and p.is_file()
        for p in folder.iterdir()
    )


def _misfit(files: list[Path], key: re.Pattern) -> str | None:
    """Why ``key`` does not pair the files of a flat folder (``""``: it names not every file, or pairs none),
    or None when it names each and gives each label one case with an image."""
    named = [name_by_key(p, key) for p in files]
    if any(n is None for n in named):
        return ""
    labels: dict[str, list[str]] = {}
    images: set[str] = set()
    for n in named:
        assert n is not None
        if n.is_label:
            labels.setdefault(n.case.lower(), []).append(n.path.name)
        else:
            images.add(n.case.lower())
    if not set(labels) & images:  # not one pair: not this naming
        return ""
    for case, names in labels.items():
        if len(names) > 1:
            return f"two label files of one case ({', '.join(names[:2])})"
        if case not in images:
            return f"a label with no image ({names[0]})"
    return None


def flat_naming(folder: Path, pair_key: str | None = None) -> tuple[str, str]:
    """The ``pair_key`` a flat folder's names follow, and how it pairs them (for the log).

    Args:
        folder: the folder of image and label volumes side by side.
        pair_key: the configured one (returned as it is); None: the one of :data:`FLAT_NAMINGS` that fits.

    Raises:
        ValueError: one line naming the folder, when none or several of :data:`FLAT_NAMINGS` fit.
    """
    if pair_key is not None:
        return pair_key, f"by data.init_args.pair_key {pair_key!r}"
    files = _flat_files(folder)
    misfits = {what: _misfit(files, re.compile(key)) for what, key in FLAT_NAMINGS.items()}
    fits = [what for what, why in misfits.items() if why is None]
    option = "set data.init_args.pair_key: a regular expression whose first group is the case name"
    near = next(((what, why) for what, why in misfits.items() if why), None)
    if not fits and near:  # the names read as one naming but for a file or two
        raise ValueError(f"{folder}: the volume files read as {near[0]} but for {near[1]}; move it out or {option}")
    if not fits:
        examples = ", ".join(p.name for p in files[:3])
        raise ValueError(
            f"{folder}: {len(files)} volume files side by side whose names pair no image with a label (e.g. "
            f"{examples}); looked for {', '.join(FLAT_NAMINGS)} (label words: {', '.join(LABEL_WORDS)}); {option}"
        )
    if len(fits) > 1:
        raise ValueError(f"{folder}: the volume file names pair in more than one way ({' or '.join(fits)}); {option}")
    return FLAT_NAMINGS[fits[0]], f"as {fits[0]} (data.init_args.pair_key sets another)"


def flat_cases(
    folder: Path, pair_key: str, modality: str | None = None, labelled: bool = True, skip_unpaired: bool = False
) -> list[VolumeCase]:
    """The cases of a folder of image and label volumes side by side, named by ``pair_key``.

    Args:
        folder: the folder.
        pair_key: a regular expression whose first group is the case name (:func:`flat_naming`).
        modality: which image a case with several reads (the last word of its name outside the case).
        labelled: True: the cases with a label (images without one and labels without an image stop,
            listed, unless ``skip_unpaired``); False: every case, without its label (predict).
        skip_unpaired: leave unpaired files out with a warning listing them instead of stopping.

    Raises:
        ValueError: one line naming the folder or file: no volume, no name matching ``pair_key``, two
            labels of a case, a label without an image, several images and no (or no matching) ``modality``.
    """
    files = _flat_files(folder)
    if not files:
        raise ValueError(f"{folder}: no volume files ({', '.join(VOLUME_SUFFIXES)})")
    key = compile_pair_key(pair_key)
    assert key is not None
    by_case: dict[str, list[NamedFile]] = {}
    unmatched = []
    for path in files:
        named = name_by_key(path, key)
        if named is None:
            unmatched.append(path)
        else:
            by_case.setdefault(named.case.lower(), []).append(named)
    if unmatched and not by_case:
        raise ValueError(f"{folder}: no volume file name matches pair_key {pair_key!r} (e.g. {unmatched[0].name})")
    if unmatched:
        log.warning("%s: %d volume files do not match pair_key %r and are left out (e.g. %s)",
                    folder, len(unmatched), pair_key, unmatched[0].name)  # fmt: skip
    groups = [(named, f"{folder}: case {named[0].case}", None) for named in by_case.values()]
    return _labelled(groups, folder, labelled, modality, skip_unpaired)


def _subfolders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` (hidden ones skipped), sorted by name; none when it is no folder."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def case_folders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that hold volume files (hidden ones skipped), sorted by name."""
    return [p for p in _subfolders(folder) if holds_flat_volumes(p)]


def holds_case_folders(folder: Path) -> bool:
    """Whether a subfolder of ``folder`` holds one case: one label volume and an image beside it."""
    for sub in _subfolders(folder):
        if holds_flat_volumes(sub):
            named = [_name_in_folder(p, sub.name) for p in _flat_files(sub)]
            if sum(n.is_label for n in named) == 1 and len(named) > 1:
                return True
    return False


def folder_cases(
    folder: Path, modality: str | None = None, labelled: bool = True, skip_unpaired: bool = False
) -> list[VolumeCase]:
    """The cases of a folder of case folders, each named by its folder (KiTS' ``case_00000/imaging.nii.gz`` +
    ``segmentation.nii.gz``, BraTS' ``<case>/<case>_flair.nii.gz`` ... + ``<case>_seg.nii.gz``).

    Args:
        folder: the folder of case folders.
        modality: which image a case with several reads: the last word of its name after the case
            name (``flair``, ``t1``, ``t1ce``, ``t2``).
        labelled: as for :func:`flat_cases`.
        skip_unpaired: as for :func:`flat_cases`.

    Raises:
        ValueError: one line naming the case folder: two labels, a label without an image, several
            images and no (or no matching) ``modality``; or naming ``folder`` when it holds no case.
    """
    subfolders = case_folders(folder)
    if not subfolders:
        raise ValueError(f"{folder}: no case folder (a folder per case holding its image and label volumes)")
    groups = [([_name_in_folder(p, sub.name) for p in _flat_files(sub)], str(sub), sub.name) for sub in subfolders]
    return _labelled(groups, folder, labelled, modality, skip_unpaired)


def predict_cases(folder: Path, pair_key: str | None = None, modality: str | None = None) -> list[VolumeCase]:
    """The cases of a predict folder, unlabelled: case folders (their images), volumes named by ``pair_key``
    (or by a fitting :data:`FLAT_NAMINGS`; labels left out), else every volume file by its name.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: as :func:`flat_cases` and :func:`folder_cases`.
    """
    files = volume_files(folder)
    if not files and case_folders(folder):
        return folder_cases(folder, modality, labelled=False)
    flat = _flat_files(folder)
    if pair_key is None and flat:
        try:
            pair_key = flat_naming(folder)[0]
        except ValueError:  # no image and label pair: the names are the cases'
            pair_key = None
    if pair_key is not None and flat and len(flat) == len(files):
        key = compile_pair_key(pair_key)
        if all(name_by_key(p, key) is not None for p in flat):  # type: ignore[arg-type]
            return flat_cases(folder, pair_key, modality, labelled=False)
    return [VolumeCase(case_name(p), p) for p in files]


# --- reading ------------------------------------------------------------------------------------------
def _first_line(error: Exception) -> str:
    # SimpleITK's errors carry the C++ source location over several lines; the last line says what happened
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if "rror" in ln or "annot" in ln), lines[-1] if lines else "")


def _sitk_read(path: Path) -> sitk.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: cannot read volume ({_first_line(e)})") from None


def volume_header(path: Path) -> tuple[tuple[int, int, int], Geometry] | None:
    """A volume file's ``(z, y, x)`` array shape and geometry from its header, without reading its voxels.

    None when the header does not read as a 3D single-channel volume: reading the case names that problem
    (:func:`segtune.data.volumes.read_volume`).
    """
    if path.suffix.lower() == ".npz":
        return _npz_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        return None
    x, y, z = reader.GetSize()
    return (z, y, x), Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))  # type: ignore[arg-type]


def _npz_header(path: Path) -> tuple[tuple[int, int, int], Geometry] | None:
    # the shape from imgs.npy's header inside the zip: loading imgs would read the whole volume a first time
    try:
        with zipfile.ZipFile(path) as archive, archive.open("imgs.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape = read_header(f)[0]
        with np.load(path, allow_pickle=False) as data:
            spacing = tuple(float(v) for v in data["spacing"])  # (x, y, z), as SimpleITK
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if len(shape) != 3 or len(spacing) != 3:
        return None
    return tuple(int(n) for n in shape), Geometry(spacing)  # type: ignore[return-value,arg-type]


def _geometry_of(image: sitk.Image, path: Path) -> Geometry:
    if image.GetDimension() != 3:
        raise ValueError(
            f"{path}: a {image.GetDimension()}D image; segtune reads 3D volumes (split a 4D series into 3D files)"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel; segtune reads single-channel volumes"
        )
    return Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def _read_npz(path: Path, with_label: bool) -> Volume:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("imgs", "spacing") if k not in data.files]
            if missing:
                held = ", ".join(data.files)
                raise ValueError(f"{path}: not a MedSAM2 npz (no {', '.join(missing)}; it holds {held})")
            if with_label and "gts" not in data.files:
                raise ValueError(
                    f"{path}: no gts (the label volume) in this npz; it holds {', '.join(data.files)} (a labelled "
                    "split needs gts; predict reads imgs alone)"
                )
            image = data["imgs"]
            label = data["gts"] if with_label else None
            spacing = tuple(float(v) for v in data["spacing"])  # (x, y, z), as SimpleITK: the reverse of imgs' axes
            origin = tuple(float(v) for v in data["origin"]) if "origin" in data.files else (0.0, 0.0, 0.0)
            identity = Geometry((1.0, 1.0, 1.0)).direction
            direction = tuple(float(v) for v in data["direction"]) if "direction" in data.files else identity
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read npz ({e}; a truncated or damaged file?)") from None
    if image.ndim != 3:
        raise ValueError(f"{path}: imgs has shape {image.shape}; a MedSAM2 volume is (D, H, W)")
    if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
        raise ValueError(f"{path}: spacing and origin need 3 values and direction 9 (x, y, z order)")
    return Volume(image, label, Geometry(spacing, origin, direction))  # type: ignore[arg-type]


def read_volume(case: VolumeCase, label_values: list[int] | None = None) -> Volume:
    """Read a case's image and label and check that they belong together.

    Args:
        case: the case.
        label_values: the label values allowed besides 0 (the classes); None: any.

    Raises:
        FileNotFoundError, ValueError: one line naming the file: unreadable, not 3D, more than one
            channel, image and label of different shapes or geometry, non-integer label values or
            label values that the classes do not list.
    """
    if case.image.suffix.lower() == ".npz":
        volume = _read_npz(case.image, case.label is not None)
        label_path = case.image
    else:
        image = _sitk_read(case.image)
        volume = Volume(_as_stored(image, case.image), None, _geometry_of(image, case.image))
        label_path = case.label
        if case.label is not None:
            label = _sitk_read(case.label)
            label_geometry = _geometry_of(label, case.label)
            volume.label = _as_stored(label, case.label)
            differs = volume.geometry.differs(label_geometry)
            if differs and volume.label.shape == volume.image.shape:
                raise ValueError(
                    f"{case.label}: the label's geometry differs from its image {case.image.name} ({differs}); "
                    "resample the label onto the image grid"
                )
    _check_image(volume.image, case.image)
    if volume.label is not None:
        volume.label = _check_label(volume.label, volume.image.shape, label_path, label_values)
    return volume


def _as_stored(image: sitk.Image, path: Path) -> np.ndarray:
    """The voxels of ``image`` read from ``path``, NIfTI's checked as stored (:mod:`segtune.data.volume_checks`):
    a truncated file stops, and the non-finite voxels the library returned as 0 are NaN again."""
    array = sitk.GetArrayFromImage(image)
    if is_nifti(path):
        found = nonfinite_voxels(path)
        if len(found) and np.issubdtype(array.dtype, np.floating) and found[-1] < array.size:
            array.reshape(-1)[found] = np.nan
    return array


#: Files already warned about in this process (a volume read again each epoch warns once).
_warned: set[tuple[str, str]] = set()


def _warn_once(path: Path, what: str, message: str, *args: object) -> None:
    if (str(path), what) not in _warned:
        _warned.add((str(path), what))
        log.warning(message, path, *args)


def _check_image(image: np.ndarray, path: Path) -> None:
    """Warn (once per file) about non-finite voxels and a constant image; both still train, but not as the
    user expects."""
    values = image
    if np.issubdtype(image.dtype, np.floating):
        finite = np.isfinite(image)
        bad = image.size - int(np.count_nonzero(finite))
        if bad:
            _warn_once(path, "nonfinite", "%s: %d of %d voxels are NaN or infinite; they take the image's lowest "
                       "finite value (mask or fill them to choose another)", bad, image.size)  # fmt: skip
            values = image[finite]
    if not values.size or values.min() == values.max():
        _warn_once(path, "constant", "%s: every voxel is %s: a constant image shows the model nothing "
                   "(a failed conversion or export?)", values.min() if values.size else "NaN")  # fmt: skip


def _check_label(label: np.ndarray, shape: tuple[int, ...], path: Path | None, allowed: list[int] | None) -> np.ndarray:
    if label.shape != shape:
        z, y, x = label.shape if label.ndim == 3 else (0, 0, 0)
        raise ValueError(
            f"{path}: label volume is {x}x{y}x{z} (x, y, z) but its image is {shape[2]}x{shape[1]}x{shape[0]}"
        )
    if not np.issubdtype(label.dtype, np.integer):
        if not np.isfinite(label).all():
            bad = int(np.count_nonzero(~np.isfinite(label)))
            raise ValueError(
                f"{path}: label volume holds {bad} NaN or infinite voxels; labels are class numbers 0, 1, 2, ..."
            )
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise ValueError(f"{path}: label volume holds non-integer values; labels are class numbers 0, 1, 2, ...")
        label = rounded
    values = np.unique(label)
    if values.min() < 0 or values.max() > 65535:
        raise ValueError(f"{path}: label values {values.min()}..{values.max()}; labels are class numbers 0..65535")
    label = label.astype(np.uint8 if values.max() < 256 else np.uint16)
    if allowed is not None:
        unknown = sorted(set(values.tolist()) - {0, *allowed})
        if unknown:
            raise ValueError(
                f"{path}: label values {unknown} are not among the classes {sorted(allowed)} (dataset.json or "
                "data.init_args.categories); list them there"
            )
    return label


def write_volume(array: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write a ``(z, y, x)`` array with ``geometry`` to ``path`` (format from its ending), atomically.

    The file is written under a temporary name with the same ending beside ``path`` and then renamed,
    so a reader never sees half a file and an interrupted write leaves no file.
    """
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    if suffix in (".mhd", ".nhdr", ".npz"):  # a header beside a data file cannot be renamed into place as one
        raise ValueError(f"{path}: write volumes as .nii.gz, .nii, .nrrd or .mha (one file each)")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing))
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetDirection(tuple(float(v) for v in geometry.direction))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=suffix.endswith(".gz") or suffix in (".nrrd", ".mha"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
