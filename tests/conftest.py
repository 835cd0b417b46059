"""Shared fixtures: a small synthetic COCO export and an in-process CLI runner."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from segtune.cli import main
from segtune.data.synthetic import write_shapes_coco

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist each worker is one of several processes on the machine: one torch thread
    # each, also for the segtune processes tests start (OMP_NUM_THREADS), or two workers' threads
    # wait for each other on two cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


#: The test files that take longest (`--durations` of the whole suite, 2026-12-08, two workers: 35-165 s each),
#: longest first. Under ``--dist loadfile`` each file runs whole on one worker, in collection order; a long
#: file collected last keeps one worker busy while the other has nothing left (the suite took 489 s so).
LONGEST_FIRST = (
    "test_litemedsam.py", "test_quickstart.py", "test_litemedsam_volumes.py", "test_compare.py", "test_ddp.py",
    "test_tune.py", "test_reliability.py",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Roboflow export: 8 train, 4 valid, 4 test images."""
    return write_shapes_coco(tmp_path_factory.mktemp("shapes"), {"train": 8, "valid": 4, "test": 4}, seed=1)


@pytest.fixture(scope="session")
def quickstart_checkpoint(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last checkpoint of a one-epoch LoRA quickstart fit (``configs/quickstart_lora.yaml``: sam-tiny) on
    ``shapes_root``: trained weights (its best checkpoint may be the untuned model, which one epoch of a
    random model need not beat)."""
    import os

    from segtune.cli import main

    cwd = tmp_path_factory.mktemp("quickstart_fit")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        main(["fit", "--config", str(CONFIGS / "quickstart_lora.yaml"), "--data.init_args.root", str(shapes_root),
              "--trainer.max_epochs", "1"])  # fmt: skip
    finally:
        os.chdir(old)
    return cwd / "runs/quickstart_lora/version_0/checkpoints/last.ckpt"


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


def segtune_script() -> str:
    """The ``segtune`` console script of the environment running the tests (nox's venv, or the user's)."""
    found = shutil.which("segtune", path=str(Path(sys.executable).parent)) or shutil.which("segtune")
    assert found, "the segtune console script is not installed"
    return found


def metrics_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger run's ``metrics.csv``."""
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_metrics(run: Path) -> dict[str, float]:
    """The last logged value of each column of a CSVLogger run's ``metrics.csv``."""
    out: dict[str, float] = {}
    for row in metrics_rows(run):
        out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


class RecordCallbacks(Callback):
    """Test helper: writes the Trainer's callbacks (class name and a few settings, after every
    callback's ``setup``) to ``callbacks.json`` in the working folder when fit starts, and how many
    predictions the Trainer kept to ``predictions_kept.json`` when predict ends."""

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        kept = sum(len(p) for p in trainer.predict_loop.predictions) if trainer.predict_loop.predictions else 0
        Path("predictions_kept.json").write_text(json.dumps(kept))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        settings = ("every_n_epochs", "overlays", "monitor", "mode", "filename")
        rows: list[dict[str, Any]] = [
            {"class": type(c).__name__, **{k: getattr(c, k) for k in settings if hasattr(c, k)}}
            for c in trainer.callbacks
        ]
        Path("callbacks.json").write_text(json.dumps(rows, default=str))
