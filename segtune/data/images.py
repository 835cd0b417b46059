"""Reading image and mask files: every supported format, bit depth and file-name case.

PNG and TIFF go through OpenCV because Pillow silently reduces 16-bit colour files to 8 bits;
JPEG and BMP go through OpenCV because it decodes them about twice as fast; GIF and anything
OpenCV cannot read go through Pillow. Masks are read with Pillow so palette images keep their
indices (the class values) instead of being expanded to colours.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
_CV2_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Decoding is the dataset's own work: keep OpenCV to one thread so DataLoader workers do not
# oversubscribe the cores (each worker is already one process).
cv2.setNumThreads(1)


class FolderIndex:
    """The files of one folder, to resolve names the way a case-insensitive file system would.

    Exports made on Windows or macOS often name ``x.JPG`` in the json and store ``x.jpg``; Linux
    cannot open it. A name that matches only when case is ignored resolves with a warning; a name
    that matches several files only when case is ignored is an error.

    Args:
        folder: the folder to index (listed once).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            names = [p.name for p in self.folder.iterdir() if p.is_file()]
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.folder}: folder not found") from None
        self.exact = set(names)
        self.lower: dict[str, list[str]] = {}
        for name in names:
            self.lower.setdefault(name.lower(), []).append(name)
        self.case_fixed: list[tuple[str, str]] = []
        self._subfolders: dict[Path, FolderIndex] = {}

    def resolve(self, name: str) -> Path:
        """The path of ``name`` in the folder, matching case-insensitively when it must.

        Raises:
            FileNotFoundError: naming the file when nothing matches, or when only several
                case-variants match.
        """
        if name in self.exact:
            return self.folder / name
        if "/" in name or "\\" in name:  # a json may give a path below the folder
            path = self.folder / name
            if path.is_file():
                return path
            if path.parent not in self._subfolders:
                self._subfolders[path.parent] = FolderIndex(path.parent)
            sub = self._subfolders[path.parent]
            resolved = sub.resolve(path.name)
            self.case_fixed.extend(sub.case_fixed)
            sub.case_fixed = []
            return resolved
        matches = self.lower.get(name.lower(), [])
        if len(matches) == 1:
            self.case_fixed.append((name, matches[0]))
            return self.folder / matches[0]
        if matches:
            raise FileNotFoundError(
                f"{self.folder / name}: image file not found; several files differ from it only in case: "
                f"{', '.join(sorted(matches))}"
            )
        raise FileNotFoundError(f"{self.folder / name}: image file not found")

    def report_case_fixes(self) -> None:
        """Warn once about the names that resolved only case-insensitively."""
        if self.case_fixed:
            examples = ", ".join(f"{a} -> {b}" for a, b in self.case_fixed[:3])
            log.warning(
                "%s: %d file names differ from the files only in case and were resolved case-insensitively (%s)",
                self.folder, len(self.case_fixed), examples,
            )  # fmt: skip
            self.case_fixed = []


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` (supported suffixes, any case), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for path in files:
        check_name(path)
    return files


def check_name(path: Path) -> None:
    """Refuse a file name that is not valid UTF-8: reports, json and csv files could not name it.

    Raises:
        ValueError: naming the file (its undecodable bytes written as ``\\xNN``).
    """
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ValueError(f"{shown}: the file name is not valid UTF-8; rename the file (e.g. to ASCII)") from None


def _cv2_read(path: Path) -> np.ndarray | None:
    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode also handles non-ASCII paths
    if data.size == 0:
        return None
    # IMREAD_UNCHANGED keeps 16-bit and float data, grayscale as 2-D, and ignores EXIF orientation
    # (as Pillow and the json's width/height do).
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def _pil_read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.seek(0)  # first frame of a GIF or multi-page TIFF
        mode = im.mode
        if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
            return np.asarray(im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB"))
        if mode == "1":
            return np.asarray(im.convert("L"))
        if mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to ``[H, W]`` or ``[H, W, C]`` in its stored dtype (uint8, uint16, float...).

    Raises:
        FileNotFoundError, ValueError: one line naming the file.
    """
    path = Path(path)
    try:
        image = _cv2_read(path) if path.suffix.lower() in _CV2_SUFFIXES else None
        if image is None:
            image = _pil_read(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return image


def image_size(path: Path) -> tuple[int, int]:
    """The ``(height, width)`` of an image file, read from its header without decoding the pixels.

    Pillow opens files lazily, so this reads a few bytes; a file Pillow cannot open (a float TIFF
    that only OpenCV reads) is decoded instead.

    Raises:
        FileNotFoundError, ValueError: one line naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.height, im.width  # the first frame's size, as read_image decodes it
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return read_image(path).shape[:2]


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask file to ``[H, W]`` (palette indices kept) or ``[H, W, C]`` values.

    Raises:
        FileNotFoundError, ValueError: one line naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.mode == "P":
                palette = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
                indices = np.asarray(im)
                used = palette[np.unique(indices)] if len(palette) else palette
                # A grey palette (as Pillow writes a 0/255 mask into a GIF) means grey levels; a
                # colour palette (VOC-style) means the indices are the class values.
                if len(used) and (used == used[:, :1]).all():
                    return palette[:, 0].astype(np.uint8)[indices]
                return indices
            if im.mode == "1":
                return np.asarray(im.convert("L"))
            if im.mode in ("L", "I", "F"):
                return np.asarray(im)
            if im.mode.startswith("I;16"):
                return np.asarray(im).astype(np.uint16)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass  # OpenCV may still read it (float TIFF); read_image names the file if it cannot
    return read_image(path)
