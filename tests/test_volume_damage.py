"""Nothing silent for volumes: damaged files, NaN voxels, cases that vanish or double, dataset.json and npz
fields, the volume cache's size (issue 35). Every damaged file here is written by the test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from segtune.data.slices import VolumeOptions
from segtune.data.volume_cache import automatic_cache_mib
from segtune.data.volumes import VolumeCase, read_volume
from tests.test_volumes import datamodule, decathlon, phantom, write_case


def _one_line_error(root: Path, stage: str = "fit", **kwargs) -> str:
    dm = datamodule(root, split_fractions=(1.0, 0.0, 0.0), **kwargs)
    with pytest.raises(ValueError) as error:
        dm.setup(stage)
    message = str(error.value)
    assert "\n" not in message
    return message


# --- reading: what SimpleITK does not check -------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_truncated_nifti_stops_naming_the_file(suffix: str, tmp_path: Path) -> None:
    # SimpleITK reads both without an error and fills the missing slices with zeros
    root = decathlon(tmp_path / "ds", cases=2, suffix=suffix)
    bad = root / "imagesTr" / f"case_001{suffix}"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    message = _one_line_error(root)
    assert message.startswith(f"{bad}: ") and "truncated" in message


def test_nan_voxels_of_a_float_nifti_are_found_as_stored(tmp_path: Path, caplog) -> None:
    image, label = phantom()
    image[3, 10, 11] = np.nan
    image[7, 20, 30] = np.inf
    path = write_case(tmp_path / "nan.nii.gz", image)
    with caplog.at_level(logging.WARNING):
        read = read_volume(VolumeCase("nan", path)).image
        read_volume(VolumeCase("nan", path))  # a volume read again (each epoch) warns once
    assert np.isnan(read[3, 10, 11]) and np.isnan(read[7, 20, 30])  # the library alone gives 0 here
    assert np.isfinite(read).sum() == read.size - 2
    lines = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert lines == [f"{path}: 2 of {image.size} voxels are NaN or infinite; they take the image's lowest finite value "
                     "(mask or fill them to choose another)"]  # fmt: skip


def test_nan_in_a_label_and_a_constant_image(tmp_path: Path, caplog) -> None:
    image, label = phantom()
    float_label = label.astype(np.float32)
    float_label[2, 2, 2] = np.nan
    case = VolumeCase("a", write_case(tmp_path / "a.nii.gz", image), write_case(tmp_path / "a_seg.nii", float_label))
    with pytest.raises(ValueError, match=r"a_seg.nii: label volume holds 1 NaN or infinite voxels"):
        read_volume(case)
    flat = write_case(tmp_path / "flat.nrrd", np.zeros_like(image))
    with caplog.at_level(logging.WARNING):
        read_volume(VolumeCase("flat", flat))
    assert f"{flat}: every voxel is 0.0: a constant image shows the model nothing" in caplog.text


def test_npz_without_gts_or_truncated_stops_naming_the_file(tmp_path: Path) -> None:
    image, label = phantom()
    spacing = np.array([0.5, 0.7, 4.0])
    np.savez_compressed(tmp_path / "nogts.npz", imgs=image, spacing=spacing)
    with pytest.raises(ValueError, match=r"nogts.npz: no gts \(the label volume\) in this npz; it holds imgs, spacing"):
        read_volume(VolumeCase("nogts", tmp_path / "nogts.npz", tmp_path / "nogts.npz"))
    assert read_volume(VolumeCase("nogts", tmp_path / "nogts.npz")).label is None  # predict reads imgs alone
    np.savez_compressed(tmp_path / "cut.npz", imgs=image, gts=label, spacing=spacing)
    data = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.npz: cannot read npz \(.*truncated or damaged"):
        read_volume(VolumeCase("cut", tmp_path / "cut.npz", tmp_path / "cut.npz"))


# --- pairing that says what it did ----------------------------------------------------------------------
def test_a_label_without_its_image_stops_listing_it_or_is_skipped(tmp_path: Path, caplog) -> None:
    root = decathlon(tmp_path / "ds", cases=4)
    (root / "imagesTr" / "case_002.nii.gz").unlink()
    message = _one_line_error(root)
    assert message.startswith(f"{root / 'imagesTr'} and {root / 'labelsTr'}: 1 labels without an image (case_002")
    assert "data.init_args.volumes.unpaired: skip" in message
    dm = datamodule(root, split_fractions=(1.0, 0.0, 0.0), volumes=VolumeOptions(unpaired="skip"))
    with caplog.at_level(logging.WARNING):
        names = sorted(c.name for c in dm.volume_source.cases("fit"))
    assert names == ["case_000", "case_001", "case_003"]
    assert "1 labels without an image (case_002.nii.gz) are left out" in caplog.text


def test_one_case_in_two_formats_is_refused_naming_both(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds", cases=2)
    write_case(root / "imagesTr" / "case_001.nrrd", phantom(seed=1)[0])
    message = _one_line_error(root)
    assert message == (f"{root / 'imagesTr'}: case case_001 is stored twice (case_001.nii.gz and case_001.nrrd); "
                       "keep one file per case")  # fmt: skip
    flat = tmp_path / "flat"
    for name in ("a.nii.gz", "a.nrrd"):
        write_case(flat / name, phantom()[0])
    write_case(flat / "a_seg.nii.gz", phantom()[1])
    message = _one_line_error(flat)
    assert "case a: stored twice (a.nii.gz and a.nrrd); keep one file per case" in message


def test_dataset_json_pairs_are_checked_and_its_fields_named(tmp_path: Path, caplog) -> None:
    root = decathlon(tmp_path / "ds", cases=3)
    listed = [
        {"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"} for i in range(5)
    ]
    (root / "dataset.json").write_text(json.dumps({"training": listed, "numTraining": 5}))
    dm = datamodule(root, split_fractions=(1.0, 0.0, 0.0))
    with caplog.at_level(logging.INFO):
        assert len(dm.volume_source.cases("fit")) == 3
        assert dm.volume_source.labels() == {1: "1", 2: "2"}  # no labels field: the values found
    assert "2 pairs of its training list are in neither imagesTr nor labelsTr (e.g. case_003.nii.gz)" in caplog.text
    assert f"{root / 'dataset.json'}: no labels field: the classes are the label values" in caplog.text
    (root / "labelsTr" / "case_001.nii.gz").rename(tmp_path / "elsewhere.nii.gz")  # half a listed pair
    assert "1 images without a label (case_001.nii.gz)" in _one_line_error(root)
    for field, value, says in [
        ("labels", {"0": "background", "1": [1, 2]}, "field 'labels' gives '1': [1, 2]; each class is one label value"),
        ("labels", {"background": 0, "a": 1, "b": 1}, "field 'labels' names label value 1 twice ('a', 'b')"),
        ("training", [{"image": "x.nii.gz"}], "field 'training' entry 0: {'image': 'x.nii.gz'} is not {'image': path"),
        ("numTraining", "five", "field 'numTraining' is 'five'; it counts the training cases"),
    ]:
        (root / "dataset.json").write_text(json.dumps({field: value}))
        assert _one_line_error(root) == f"{root / 'dataset.json'}: {says}" or says in _one_line_error(root)


def test_the_log_counts_cases_without_foreground_per_split(tmp_path: Path, caplog) -> None:
    root = decathlon(tmp_path / "ds", cases=3)
    empty = np.zeros_like(phantom()[1])
    write_case(root / "labelsTr" / "case_001.nii.gz", empty)
    dm = datamodule(root, split_fractions=(1.0, 0.0, 0.0))
    with caplog.at_level(logging.INFO):
        slices = len(_fit_slices(dm, 64))
    assert f"split 'train': {slices} training slices from 2 cases" in caplog.text
    assert "1 of 3 cases have no foreground and add no training slice (case_001.nii.gz)" in caplog.text


# --- a volume cache that needs no setting ---------------------------------------------------------------
def _fit_slices(dm, cache_mib: int | None):
    """The fit split's slice dataset alone (no validation split to set up)."""
    return dm.volume_source.dataset("fit", dm.preprocessing, dm.prompts, None, 0, dm.intensity, cache_mib, None, None)


def test_the_volume_cache_is_sized_from_the_volumes_and_the_memory(tmp_path: Path, caplog) -> None:
    big = [
        VolumeCase(f"b{i}", write_case(tmp_path / f"b{i}.nii.gz", np.zeros((64, 64, 64), np.uint8))) for i in range(2)
    ]
    need = 2 * 64**3 * 5  # bytes: a float32 image and a uint8 label per voxel
    with caplog.at_level(logging.INFO):
        assert automatic_cache_mib(big, "here", available=2**40) == -(-need // 2**20)
        assert automatic_cache_mib(big, "there", available=8 * 2**20) == 2  # a quarter of 8 MiB
    assert "here: volume cache 3 MiB: its 2 cases' normalised volumes, each read once (1024.0 GiB" in caplog.text
    assert "there: volume cache 2 MiB (a quarter of the 8 MiB available) keeps about 1 of its 2 cases" in caplog.text
    root = decathlon(tmp_path / "ds", cases=2)
    dm = datamodule(root, split_fractions=(1.0, 0.0, 0.0), cache_images=None)  # the default
    caplog.clear()
    with caplog.at_level(logging.INFO):
        store = _fit_slices(dm, dm.cache_images).records[0].store
    assert "volume cache 1 MiB: its 2 cases' normalised volumes" in caplog.text
    assert "cache_images is 0" not in caplog.text
    for i in range(len(store)):
        store.get(i)
    assert store.reads == 2 and len(store.kept) == 2  # both kept: a second pass reads nothing
    with pytest.raises(ValueError, match=r"^data.init_args.cache_images must be a budget in MiB >= 0 \(or null"):
        datamodule(root, cache_images=-1)
