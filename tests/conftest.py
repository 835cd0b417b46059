"""Shared fixtures: a small synthetic COCO export and an in-process CLI runner."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from segtune.cli import main
from segtune.data.synthetic import write_shapes_coco

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Roboflow export: 8 train, 4 valid, 4 test images."""
    return write_shapes_coco(tmp_path_factory.mktemp("shapes"), {"train": 8, "valid": 4, "test": 4}, seed=1)


@pytest.fixture(scope="session")
def masks_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image/mask folder set (``images/*.jpg``, ``masks/*.png``, 0/255) with no split folders."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("masks")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        image = rng.integers(0, 120, (96, 128, 3), dtype=np.uint8)
        mask = np.zeros((96, 128), np.uint8)
        y, x = rng.integers(5, 50), rng.integers(5, 70)
        mask[y : y + 30, x : x + 40] = 255
        image[mask > 0] += 100
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    return root


@pytest.fixture
def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run ``segtune`` in-process inside ``tmp_path`` (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> Path:
        main([str(a) for a in args])
        return tmp_path

    return run


@pytest.fixture(autouse=True)
def _quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
