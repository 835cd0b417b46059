"""3D folders as users keep them: images and labels side by side in one folder (``<case>_image.nrrd`` +
``<case>_label.nrrd``, LiTS' ``volume-<n>`` + ``segmentation-<n>``) and one folder per case (KiTS'
``imaging`` + ``segmentation``, BraTS' ``<case>_<modality>`` + ``<case>_seg``), found by ``layout: auto``.
Every volume is a small phantom the test writes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from segtune.data.layouts import detect_layout
from segtune.data.slices import VolumeOptions
from segtune.data.volumes import flat_naming, read_volume
from tests.conftest import CONFIGS
from tests.test_volumes import datamodule, phantom, write_case

SPLITS = ["train", "valid", "test"]
BRATS = ("flair", "t1", "t1ce", "t2")


def _pairs(folder: Path, names: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    """Write phantom ``(case, image file, label file)`` triples into ``folder``; case -> (image, label) names."""
    for i, (_, image_name, label_name) in enumerate(names):
        image, label = phantom(seed=i)
        write_case(folder / image_name, image + 100 * i)  # each case's own intensities
        write_case(folder / label_name, label)
    return {case: (image_name, label_name) for case, image_name, label_name in names}


def flat_nrrd(root: Path, cases: int = 4) -> dict[str, tuple[str, str]]:
    """The public NRRD sets' naming: ``<case>_image.nrrd`` + ``<case>_label.nrrd`` in one folder."""
    return _pairs(root, [(f"Case{i:02d}", f"Case{i:02d}_image.nrrd", f"Case{i:02d}_label.nrrd") for i in range(cases)])


def lits(root: Path, cases: int = 4) -> dict[str, tuple[str, str]]:
    """LiTS: ``volume-<n>.nii`` + ``segmentation-<n>.nii``."""
    return _pairs(root, [(str(i), f"volume-{i}.nii", f"segmentation-{i}.nii") for i in range(cases)])


def img_seg(root: Path, cases: int = 4) -> dict[str, tuple[str, str]]:
    return _pairs(root, [(f"p{i}", f"p{i}_img.nii.gz", f"p{i}_seg.nii.gz") for i in range(cases)])


def ct_seg(root: Path, cases: int = 4) -> dict[str, tuple[str, str]]:
    return _pairs(root, [(f"liver_{i}", f"liver_{i}_ct.mha", f"liver_{i}_seg.mha") for i in range(cases)])


def plain_and_seg(root: Path, cases: int = 4) -> dict[str, tuple[str, str]]:
    """3D Slicer's export: ``<case>.nrrd`` + ``<case>-label.nrrd``."""
    return _pairs(root, [(f"scan{i}", f"scan{i}.nrrd", f"scan{i}-label.nrrd") for i in range(cases)])


def image_label_prefix(root: Path, cases: int = 4) -> dict[str, tuple[str, str]]:
    return _pairs(root, [(f"{i:03d}", f"image{i:03d}.nii.gz", f"label{i:03d}.nii.gz") for i in range(cases)])


def kits(root: Path, cases: int = 4, unlabelled: int = 0) -> dict[str, tuple[str, str]]:
    """KiTS: ``case_00000/imaging.nii.gz`` + ``segmentation.nii.gz``; ``unlabelled`` more cases with no label."""
    names = [
        (f"case_{i:05d}", f"case_{i:05d}/imaging.nii.gz", f"case_{i:05d}/segmentation.nii.gz") for i in range(cases)
    ]
    found = _pairs(root, names)
    for i in range(cases, cases + unlabelled):  # KiTS19's test cases sit beside the training ones
        write_case(root / f"case_{i:05d}" / "imaging.nii.gz", phantom(seed=i)[0])
    return found


def brats(root: Path, cases: int = 4, modalities: tuple[str, ...] = BRATS) -> dict[str, tuple[str, str]]:
    """BraTS: ``<case>/<case>_<modality>.nii.gz`` (one per modality) + ``<case>_seg.nii.gz``; the flair is paired."""
    names = []
    for i in range(cases):
        case = f"BraTS20_Training_{i:03d}"
        for modality in modalities[1:]:
            write_case(root / case / f"{case}_{modality}.nii.gz", phantom(seed=i)[0])
        names.append((case, f"{case}/{case}_{modalities[0]}.nii.gz", f"{case}/{case}_seg.nii.gz"))
    return _pairs(root, names)


LAYOUTS: dict[str, tuple[Callable[[Path], dict[str, tuple[str, str]]], str, dict]] = {
    "<case>_image.nrrd + <case>_label.nrrd": (flat_nrrd, "flat", {}),
    "LiTS volume-<n> + segmentation-<n>": (lits, "flat", {}),
    "<case>_img + <case>_seg": (img_seg, "flat", {}),
    "<case>_ct + <case>_seg": (ct_seg, "flat", {}),
    "<case> + <case>-label": (plain_and_seg, "flat", {}),
    "image<n> + label<n>": (image_label_prefix, "flat", {}),
    "KiTS case folders": (kits, "cases", {}),
    "BraTS case folders, a chosen modality": (brats, "cases", {"modality": "flair"}),
}


def _read_cases(dm) -> dict[str, tuple[str, str]]:
    """Every case of the three splits: case name -> (image, label) paths relative to the root."""
    found = {}
    for stage in ("fit", "validate", "test"):
        for case in dm.volume_source.cases(stage):
            found[case.name] = (case.image.relative_to(dm.root).as_posix(), case.label.relative_to(dm.root).as_posix())
    return found


@pytest.mark.parametrize("name", LAYOUTS)
def test_auto_finds_each_layout_and_pairs_the_right_files(name: str, tmp_path: Path) -> None:
    write, kind, options = LAYOUTS[name]
    root = tmp_path / "ds"
    expected = write(root)
    assert detect_layout(root, SPLITS).name == "volumes"
    dm = datamodule(root, **options)
    assert dm.layout == "volumes" and dm.volume_source.layout.kind == kind
    assert _read_cases(dm) == expected  # split by case: each case in exactly one split, named as it is
    case = dm.volume_source.cases("fit")[0]
    volume = read_volume(case, [1, 2])
    i = int(case.name[-1])  # the image written for case i (BraTS: its flair, the others differ)
    assert np.array_equal(volume.label, phantom()[1]) and np.allclose(volume.image, phantom(seed=i)[0] + 100 * i)


def test_flat_and_case_folders_in_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    flat_nrrd(root / "train", cases=2)
    lits(root / "valid", cases=1)  # each split folder's names are recognised on their own
    assert "flat: image and label volumes side by side in train/" in detect_layout(root, SPLITS).found
    dm = datamodule(root)
    assert [c.name for c in dm.volume_source.cases("fit")] == ["Case00", "Case01"]
    assert [c.name for c in dm.volume_source.cases("validate")] == ["0"]
    root = tmp_path / "kits"
    for split, cases in (("train", 2), ("valid", 1)):
        kits(root / split, cases)
    assert "cases: one folder per case" in detect_layout(root, SPLITS).found
    assert [c.name for c in datamodule(root).volume_source.cases("fit")] == ["case_00000", "case_00001"]


def test_unlabelled_cases_stop_or_are_skipped_in_training_and_are_predicted(tmp_path: Path, caplog) -> None:
    root = tmp_path / "kits"
    kits(root, cases=2, unlabelled=1)
    with pytest.raises(ValueError) as error:  # by default a case without its label stops, listed
        datamodule(root, split_fractions=(1.0, 0.0, 0.0)).volume_source.cases("fit")
    assert str(error.value).startswith(f"{root}: 1 images without a label (case_00002/imaging.nii.gz)")
    dm = datamodule(root, split_fractions=(1.0, 0.0, 0.0), volumes=VolumeOptions(unpaired="skip"))
    with caplog.at_level(logging.WARNING):
        assert [c.name for c in dm.volume_source.cases("fit")] == ["case_00000", "case_00001"]
    assert "1 images without a label (case_00002/imaging.nii.gz) are left out" in caplog.text
    # predict: case folders without labels, and a flat folder whose labels are left out
    prompt = [{"slice": 5, "box": [4, 4, 30, 24], "label": 1}]
    for folder, key, names in (
        (root, "case_00002", ["case_00000", "case_00001", "case_00002"]),
        (tmp_path / "nrrd", "Case01_image.nrrd", ["Case00", "Case01"]),  # the file's name reads too
    ):
        if folder.name == "nrrd":
            flat_nrrd(folder, cases=2)
        prompts = tmp_path / f"{folder.name}.json"
        prompts.write_text(json.dumps({key: prompt}))
        dm = datamodule(root, predict_images=folder, predict_prompts=prompts, categories=["kidney", "tumour"])
        dm.setup("predict")
        data = dm.datasets["predict"]
        assert data.collate([data[i] for i in range(len(data))])["file_names"] == names
        assert all(data[i]["volume"].label is None for i in range(len(data)))
        assert [len(data[i]["prompts"]) for i in range(len(data))] == [int(n == names[-1]) for n in names]


def test_pair_key_names_the_case_in_flat_and_image_label_folders(tmp_path: Path, caplog) -> None:
    root = tmp_path / "flat"
    # a label word, but no image word: no built-in naming fits, one line says what to set
    _pairs(root, [(f"{i:03d}", f"{i:03d}_t2.nrrd", f"{i:03d}_gt.nrrd") for i in range(2)])
    with pytest.raises(ValueError) as error:
        datamodule(root).volume_source.cases("fit")
    message = str(error.value)
    assert message.startswith(f"{root}: 4 volume files side by side whose names pair no image with a label (e.g. ")
    assert "set data.init_args.pair_key: a regular expression whose first group is the case name" in message
    assert "\n" not in message
    dm = datamodule(root, pair_key=r"^(\d+)_", split_fractions=(1.0, 0.0, 0.0))
    with caplog.at_level(logging.INFO):
        cases = dm.volume_source.cases("fit")
    assert [(c.name, c.image.name, c.label.name) for c in cases] == [  # type: ignore[union-attr]
        ("000", "000_t2.nrrd", "000_gt.nrrd"),
        ("001", "001_t2.nrrd", "001_gt.nrrd"),
    ]
    assert "image and label volumes paired by data.init_args.pair_key '^(\\\\d+)_'" in caplog.text
    # the same option pairs an image folder with a label folder whose names differ
    root = tmp_path / "folders"
    for i in range(2):
        image, label = phantom(seed=i)
        write_case(root / "images" / f"c{i}_image.nrrd", image)
        write_case(root / "labels" / f"c{i}_label.nrrd", label)
    unpaired = r"2 images without a label \(c0_image.nrrd, c1_image.nrrd\) and 2 labels without an image \(c0_label"
    with pytest.raises(ValueError, match=unpaired + r".*paired by file name \(data.init_args.pair_key pairs names"):
        datamodule(root, split_fractions=(1.0, 0.0, 0.0)).volume_source.cases("fit")
    dm = datamodule(root, pair_key="^(.+)_", split_fractions=(1.0, 0.0, 0.0))
    assert [(c.name, c.label.name) for c in dm.volume_source.cases("fit")] == [  # type: ignore[union-attr]
        ("c0", "c0_label.nrrd"),
        ("c1", "c1_label.nrrd"),
    ]


def _error(root: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        datamodule(root, split_fractions=(1.0, 0.0, 0.0), **kwargs).volume_source.cases("fit")
    message = str(error.value)
    assert "\n" not in message
    return message


def test_ambiguous_or_bad_folders_stop_in_one_line_naming_them(tmp_path: Path) -> None:
    root = tmp_path / "brats"
    brats(root, cases=2)
    first = root / "BraTS20_Training_000"
    assert _error(root) == (
        f"{first}: images of several modalities (flair, t1, t1ce, t2); set data.init_args.modality to one of them"
    )
    assert _error(root, modality="t1c").startswith(
        f"{first}: no image of data.init_args.modality 't1c' (its images: flair, t1, t1ce, t2); set it to one"
    )
    assert [
        c.image.name for c in datamodule(root, modality="T1", split_fractions=(1, 0, 0)).volume_source.cases("fit")
    ] == [
        "BraTS20_Training_000_t1.nii.gz",
        "BraTS20_Training_001_t1.nii.gz",
    ]  # t1, not t1ce: the whole last word, any case
    # a case folder holding a label and no image
    root = tmp_path / "kits"
    kits(root, cases=2)
    (root / "case_00001" / "imaging.nii.gz").unlink()
    assert _error(root).startswith(f"{root}: 1 labels without an image (case_00001/segmentation.nii.gz); pair them")
    # two labels of one case in a flat folder
    root = tmp_path / "flat"
    flat_nrrd(root, cases=2)
    write_case(root / "Case01_seg.nrrd", phantom()[1])
    assert _error(root, pair_key="^(Case..)_").startswith(
        f"{root}: case Case01: two label files (Case01_label.nrrd, Case01_seg.nrrd); one label volume per case"
    )
    # a flat folder with labels only
    root = tmp_path / "labels"
    for i in range(2):
        write_case(root / f"c{i}_seg.nrrd", phantom()[1])
    assert _error(root).startswith(f"{root}: 2 volume files side by side whose names pair no image with a label")
    with pytest.raises(ValueError) as error:
        flat_naming(tmp_path / "flat")  # no pair_key: the naming nearly found says which files spoil it
    assert str(error.value).startswith(
        f"{tmp_path / 'flat'}: the volume files read as <case>_image + <case>_label but for two label files of one "
        "case (Case01_label.nrrd, Case01_seg.nrrd); move it out or set data.init_args.pair_key"
    )


@pytest.mark.parametrize("write", [flat_nrrd, kits], ids=["flat-nrrd-pairs", "kits-case-folders"])
def test_fit_trains_on_the_folder_from_the_command_line(write: Callable, tmp_path: Path, run_cli) -> None:
    # the hippocampus config, its model swapped for its family's tiny random one, its layout for auto
    write(tmp_path / "ds", cases=3)
    run = run_cli(
        "fit", "--config", CONFIGS / "volumes_hippocampus.yaml", "--data.init_args.root", tmp_path / "ds",
        "--data.init_args.layout", "auto", "--data.init_args.split_fractions", "[0.34, 0.33, 0.33]",
        "--data.init_args.batch_size", "4", "--model.init_args.model", "mobilesam-tiny",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0",
    )  # fmt: skip
    checkpoint = torch.load(run / "runs/volumes_hippocampus/version_0/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
