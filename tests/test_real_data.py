"""The three real datasets in ../shared/data load and train (skipped where the folder is absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from segtune.data import Preprocessing, SegmentationDataModule
from segtune.data.masks import MaskFormat
from tests.conftest import CONFIGS, SHARED_DATA, last_metrics

PRE = Preprocessing(256, "longest", 64)
BRAIN = SHARED_DATA / "brain-tumor-mri-coco"
FLAKES = SHARED_DATA / "bn-flakes-coco"
KVASIR = SHARED_DATA / "kvasir-seg-200"


def _need(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder} (a fresh clone has no ../shared/data)")


def _count(json_path: Path) -> tuple[int, int]:
    """Images and decodable annotations the json holds."""
    data = json.loads(json_path.read_text())
    usable = [a for a in data["annotations"] if a.get("segmentation")]
    return len(data["images"]), len(usable)


@pytest.mark.parametrize(
    ("root", "splits"), [(BRAIN, ("train", "valid", "test")), (FLAKES, ("valid", "test"))], ids=["brain", "flakes"]
)
def test_coco_sets_images_and_instances_match_the_files(root: Path, splits: tuple[str, ...]) -> None:
    _need(root)
    for split in splits:
        dm = SegmentationDataModule(root, test_split=split, preprocessing=PRE)
        records = dm._records("test").records
        n_images, n_annotations = _count(root / split / "_annotations.coco.json")
        assert len(records) == n_images == len(list((root / split).glob("*.jpg")))
        assert sum(len(r.annotations) for r in records) == n_annotations
        assert all(r.path.is_file() for r in records)
    assert dm.class_names == (["Tumor"] if root == BRAIN else ["Less_Thick_BN", "Thick_BN", "Thin_BN"])


def test_brain_empty_images_are_skipped_for_evaluation() -> None:
    _need(BRAIN)
    dm = SegmentationDataModule(BRAIN, preprocessing=PRE)
    dm.setup("validate")
    # 201 valid images, 127 of them with a tumour polygon
    assert len(dm.datasets["validate"]) == 127
    sample = dm.datasets["validate"][0]
    assert sample["masks"].shape[1:] == (640, 640) and sample["masks"].any()


def test_kvasir_masks_split_by_file() -> None:
    _need(KVASIR)
    dm = SegmentationDataModule(KVASIR, layout="masks", categories=["polyp"], preprocessing=PRE)
    dm.setup("fit")
    dm.setup("test")
    names = [{r.path.name for r in dm.datasets[s].records} for s in ("fit", "validate", "test")]
    assert [len(n) for n in names] == [160, 20, 20]
    assert set().union(*names) == {p.name for p in (KVASIR / "images").iterdir()}
    sample = dm.datasets["test"][0]
    assert sample["masks"].shape[0] == 1 and sample["masks"].float().mean() > 0.01
    # one prompt per polyp: the official boxes list several polyps for some images
    components = SegmentationDataModule(
        KVASIR, layout="masks", mask_format=MaskFormat(instances="components", min_area=64), preprocessing=PRE
    )
    components.setup("test")
    counts = [len(components.datasets["test"][i]["masks"]) for i in range(len(components.datasets["test"]))]
    assert min(counts) >= 1 and max(counts) <= 5


@pytest.mark.parametrize(
    "args",
    [
        ["--data.init_args.root", BRAIN],
        ["--data.init_args.root", FLAKES, "--data.init_args.train_split", "valid"],
        ["--data.init_args.root", KVASIR, "--data.init_args.layout", "masks"],
    ],
    ids=["brain", "flakes", "kvasir"],
)
def test_fit_a_few_steps_on_real_data(args: list, run_cli) -> None:
    _need(args[1])
    run = run_cli(
        "fit", "--config", CONFIGS / "quickstart.yaml", "--data.class_path", "segtune.data.SegmentationDataModule",
        *args, "--data.init_args.batch_size", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
    )  # fmt: skip
    metrics = last_metrics(run / "runs" / "quickstart" / "version_0")
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["val_dice"] <= 1.0
