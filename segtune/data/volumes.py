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
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

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
        kind: ``"decathlon"``, ``"folders"`` or ``"npz"`` (module docstring).
        found: what was found, for the log.
        image_dir: folders: the image folder's name.
        label_dir: folders: the label folder's name.
    """

    kind: Literal["decathlon", "folders", "npz"]
    found: str
    image_dir: str = "images"
    label_dir: str = "labels"


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
    return None


def pair_cases(image_dir: Path, label_dir: Path | None, require_labels: bool = True) -> list[VolumeCase]:
    """Pair the volumes of ``image_dir`` with the label files of ``label_dir`` by case name.

    Raises:
        ValueError: one line naming the file, for an image without a label (when ``require_labels``),
            a second channel (``_0001``: segtune reads one channel) or no volume at all.
    """
    images = volume_files(image_dir)
    if not images:
        raise ValueError(f"{image_dir}: no volume files ({', '.join(VOLUME_SUFFIXES)})")
    labels = {case_name(p).lower(): p for p in volume_files(label_dir)} if label_dir is not None else {}
    cases = []
    for path in images:
        channel = _CHANNEL.search(volume_stem(path))
        if channel and channel.group(1) != "0000":
            raise ValueError(
                f"{path}: image channel {channel.group(1)}: segtune reads single-channel volumes (channel 0000 only); "
                "move the other channels out of the folder"
            )
        name = case_name(path)
        label = labels.get(name.lower())
        if label is None and require_labels:
            raise ValueError(f"{path}: no label volume named {name} in {label_dir}")
        cases.append(VolumeCase(name, path, label))
    return cases


def npz_cases(folder: Path) -> list[VolumeCase]:
    """The MedSAM2 npz files of ``folder`` as cases (each its own label file)."""
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() == ".npz" and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no .npz files")
    return [VolumeCase(p.stem, p, p) for p in files]


def dataset_json_labels(path: Path) -> dict[int, str] | None:
    """The classes a Decathlon or nnU-Net ``dataset.json`` lists, label value -> name (background left out).

    Decathlon writes ``{"0": "background", "1": "Anterior"}``, nnU-Net v2 ``{"background": 0,
    "Anterior": 1}``; both read. None when the file is absent.

    Raises:
        ValueError: naming the file when it is not json or its ``labels`` are neither form.
    """
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())["labels"]
        if all(isinstance(v, int) for v in labels.values()):  # nnU-Net v2: name -> value
            pairs = {int(v): str(k) for k, v in labels.items()}
        else:
            pairs = {int(k): str(v) for k, v in labels.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: cannot read the labels of dataset.json ({type(e).__name__}: {e})") from None
    return {v: name for v, name in sorted(pairs.items()) if v != 0}


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
            image = data["imgs"]
            label = data["gts"] if with_label and "gts" in data.files else None
            spacing = tuple(float(v) for v in data["spacing"])  # (x, y, z), as SimpleITK: the reverse of imgs' axes
            origin = tuple(float(v) for v in data["origin"]) if "origin" in data.files else (0.0, 0.0, 0.0)
            identity = Geometry((1.0, 1.0, 1.0)).direction
            direction = tuple(float(v) for v in data["direction"]) if "direction" in data.files else identity
    except (OSError, EOFError, ValueError) as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read npz ({e})") from None
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
        volume = Volume(sitk.GetArrayFromImage(image), None, _geometry_of(image, case.image))
        label_path = case.label
        if case.label is not None:
            label = _sitk_read(case.label)
            label_geometry = _geometry_of(label, case.label)
            volume.label = sitk.GetArrayFromImage(label)
            differs = volume.geometry.differs(label_geometry)
            if differs and volume.label.shape == volume.image.shape:
                raise ValueError(
                    f"{case.label}: the label's geometry differs from its image {case.image.name} ({differs}); "
                    "resample the label onto the image grid"
                )
    if volume.label is not None:
        volume.label = _check_label(volume.label, volume.image.shape, label_path, label_values)
    return volume


def _check_label(label: np.ndarray, shape: tuple[int, ...], path: Path | None, allowed: list[int] | None) -> np.ndarray:
    if label.shape != shape:
        z, y, x = label.shape if label.ndim == 3 else (0, 0, 0)
        raise ValueError(
            f"{path}: label volume is {x}x{y}x{z} (x, y, z) but its image is {shape[2]}x{shape[1]}x{shape[0]}"
        )
    if not np.issubdtype(label.dtype, np.integer):
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
