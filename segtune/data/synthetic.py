"""A small synthetic dataset written as a real Roboflow COCO export, for the quickstart and tests.

Each image is a noisy, shaded background with one to three filled shapes whose boxes do not
overlap. Shapes are stars, triangles, crosses and L-shapes at random rotations: none fills its
bounding box, so predicting the box prompt filled (the "box floor") scores well below what a
trained model reaches.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segtune.data.coco import ANNOTATION_FILE

CATEGORIES = ("star", "cross")


def _star(rng: np.random.Generator) -> np.ndarray:
    points = int(rng.integers(4, 7))
    inner = rng.uniform(0.35, 0.5)
    angles = np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def _triangle(rng: np.random.Generator) -> np.ndarray:
    # Vertices at least 80 degrees apart around the centre: no slivers thinner than a patch.
    gaps = rng.dirichlet([4.0, 4.0, 4.0]) * (2 * math.pi - 3 * math.radians(80)) + math.radians(80)
    angles = rng.uniform(0, 2 * math.pi) + np.cumsum(gaps)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _cross(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0.25, 0.4)
    return np.array(
        [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
    )


def _ell(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0.35, 0.6)
    return np.array([[-1, -1], [-1 + a, -1], [-1 + a, 1 - a], [1, 1 - a], [1, 1], [-1, 1]])


SHAPES = {"star": (_star, _triangle), "cross": (_cross, _ell)}


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # a colour gradient plus noise; the gradient is built from one row and one column (broadcast), which
    # gives the same numbers as full coordinate grids at a fraction of the work
    xs = (np.arange(width) / max(height, width))[None, :, None]
    ys = (np.arange(height) / max(height, width))[:, None, None]
    base = rng.uniform(60, 160, size=3)
    slope = rng.uniform(-50, 50, size=(2, 3))
    img = base + xs * slope[0] + ys * slope[1]
    img += rng.normal(0, 12, size=img.shape)
    return img


# Shape radius as a fraction of the image's shorter side: a shape spans several of a tiny model's
# 16 px patches. Up to MAX_SHAPES per image.
RADIUS = (0.18, 0.3)
MAX_SHAPES = 3
# A shape's colour differs from the background under it by at least this much in some channel:
# an invisible shape teaches nothing and makes the quickstart's score a matter of luck.
MIN_CONTRAST = 60.0


def _draw_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    img = _background(rng, height, width)
    occupied = np.zeros((height, width), dtype=bool)
    shapes: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        for _attempt in range(20):
            cat = int(rng.integers(0, len(CATEGORIES)))
            make = SHAPES[CATEGORIES[cat]][int(rng.integers(0, 2))]
            radius = rng.uniform(*RADIUS) * min(height, width)
            theta = rng.uniform(0, 2 * math.pi)
            rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            pts = make(rng) @ rot.T * radius * rng.uniform(0.7, 1.3, size=2)
            centre = rng.uniform([radius, radius], [width - radius, height - radius])
            pts = pts + centre
            # Boxes (with a margin) do not overlap: each box prompt names one shape. Shapes lie
            # inside the image, as annotations of a clean export do. (Checked before drawing: a
            # rejected attempt costs no full-size mask.)
            (x0, y0), (x1, y1) = np.floor(pts.min(axis=0)).astype(int), np.ceil(pts.max(axis=0)).astype(int)
            if x0 < 0 or y0 < 0 or x1 >= width or y1 >= height:
                continue
            box = (slice(max(0, y0 - 4), y1 + 5), slice(max(0, x0 - 4), x1 + 5))
            if occupied[box].any():
                continue
            layer = Image.new("L", (width, height), 0)
            ImageDraw.Draw(layer).polygon([tuple(p) for p in pts], fill=1)
            mask = np.asarray(layer, dtype=bool)
            if mask.sum() < 50:
                continue
            occupied[box] = True
            colour = rng.uniform(0, 255, size=3)
            while np.abs(colour - img[mask].mean(axis=0)).max() < MIN_CONTRAST:
                colour = rng.uniform(0, 255, size=3)
            texture = rng.normal(0, 10, size=(int(mask.sum()), 3))
            img[mask] = colour + texture
            shapes.append((cat, pts.round(1).ravel().tolist()))
            break
    return np.clip(img, 0, 255).astype(np.uint8), shapes


def write_shapes_coco(
    root: str | Path,
    splits: dict[str, int] | None = None,
    size: tuple[int, int] = (240, 320),
    seed: int = 0,
) -> Path:
    """Write a Roboflow-style COCO export of synthetic shapes under ``root``.

    Args:
        root: folder that receives ``train/ valid/ test/``, each with JPEGs and ``_annotations.coco.json``.
        splits: number of images per split folder.
        size: ``(height, width)`` of every image.
        seed: random seed; the same seed writes the same files.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    splits = splits or {"train": 96, "valid": 24, "test": 24}
    height, width = size
    for split_index, (split, count) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, split_index])
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        # Roboflow adds a parent category 0 that no annotation uses.
        categories = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
            {"id": i + 1, "name": n, "supercategory": "shapes"} for i, n in enumerate(CATEGORIES)
        ]
        images, annotations = [], []
        for i in range(count):
            pixels, shapes = _draw_image(rng, height, width)
            digest = hashlib.md5(pixels.tobytes()).hexdigest()
            name = f"shapes_{split}_{i:04d}_png.rf.{digest}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=95)
            images.append({"id": i, "file_name": name, "height": height, "width": width})
            for cat, poly in shapes:
                xs, ys = poly[0::2], poly[1::2]
                x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
                annotations.append(
                    {
                        "id": len(annotations),
                        "image_id": i,
                        "category_id": cat + 1,
                        "segmentation": [poly],
                        "bbox": [x0, y0, min(width, max(xs)) - x0, min(height, max(ys)) - y0],
                        "area": float(_polygon_area(xs, ys)),
                        "iscrowd": 0,
                    }
                )
        export = {
            "info": {"description": "segtune synthetic shapes", "version": "1"},
            "licenses": [{"id": 1, "name": "CC0 1.0"}],
            "categories": categories,
            "images": images,
            "annotations": annotations,
        }
        (folder / ANNOTATION_FILE).write_text(json.dumps(export))
    return root


def _polygon_area(xs: list[float], ys: list[float]) -> float:
    x, y = np.asarray(xs), np.asarray(ys)
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
