"""Volumes from the command line: fit, test and predict on the shared hippocampus subset (a few cases)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import CONFIGS, SHARED_DATA

HIPPOCAMPUS = SHARED_DATA / "hippocampus-mri-nifti-40"
CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_044")  # uint8, a float32 label, a 358,000 maximum


@pytest.fixture
def hippocampus(tmp_path: Path) -> Path:
    """Three cases of the shared set with its dataset.json, one per split, each cut to its 12 middle
    slices (SimpleITK moves the origin with the cut) so that scoring them stays quick."""
    if not HIPPOCAMPUS.is_dir():
        pytest.skip(f"{HIPPOCAMPUS} is absent (the shared data sits beside the project)")
    root = tmp_path / "hippocampus"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        for case in CASES:
            volume = sitk.ReadImage(str(HIPPOCAMPUS / folder / f"{case}.nii.gz"))
            middle = volume.GetSize()[2] // 2
            sitk.WriteImage(volume[:, :, middle - 6 : middle + 6], str(root / folder / f"{case}.nii.gz"))
    shutil.copy(HIPPOCAMPUS / "dataset.json", root)
    return root


def test_fit_test_and_predict_volumes_from_the_shipped_config(hippocampus: Path, run_cli, capsys) -> None:
    # the config's LiteMedSAM swapped for its family's tiny random model: the volume path is what runs here
    # (LiteMedSAM itself on volumes: the README's measured table; its weights: tests/test_litemedsam.py)
    tiny = [
        "--config", CONFIGS / "volumes_hippocampus.yaml", "--data.init_args.root", hippocampus,
        "--data.init_args.split_fractions", "[0.34, 0.33, 0.33]", "--data.init_args.batch_size", "4",
        "--model.init_args.model", "mobilesam-tiny",
    ]  # fmt: skip
    # validation on volumes (val_dice for the checkpoint) runs in tests/test_configs.py; here it is skipped
    run = run_cli("fit", *tiny, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                  "--trainer.limit_val_batches", "0")  # fmt: skip
    best = run / "runs/volumes_hippocampus/version_0/checkpoints/last.ckpt"
    capsys.readouterr()
    # with 2 corrective 3D clicks per class after propagation (issue 32): volume Dice and NSD after each
    run_cli("test", *tiny, "--ckpt_path", best, "--model.init_args.clicks", "2")
    printed = capsys.readouterr().out
    assert "nsd" in printed and "slice dice" in printed and "Anterior" in printed and "Posterior" in printed
    assert "Dice after" in printed and "2 clicks" in printed and "NSD: all" in printed
    report = json.loads((run / "runs/volumes_hippocampus/version_1/test_metrics.json").read_text())
    assert report["unit"] == "case" and set(report["per_class"]) == {"Anterior", "Posterior"}
    assert len(report["clicks"]["dice_curve"]["overall"]) == 3 and len(report["clicks"]["nsd_curve"]["Anterior"]) == 3
    assert report["clicks"]["dice_curve"]["overall"][0] == report["overall"]["dice"]
    with open(run / "runs/volumes_hippocampus/version_1/test_per_case.csv") as f:
        assert {"dice_click_2", "nsd_click_2", "noc_90", "click_auc"} <= set(next(csv.DictReader(f)))
    assert len(report["per_case"]) == 1
    # predict: one box per object on one slice -> a label volume a viewer overlays on its scan
    source = hippocampus / "imagesTr" / "hippocampus_044.nii.gz"
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(hippocampus / "labelsTr" / "hippocampus_044.nii.gz")))
    k = int(np.argmax((label == 1).sum(axis=(1, 2))))
    rows, cols = np.flatnonzero((label[k] == 1).any(1)), np.flatnonzero((label[k] == 1).any(0))
    prompts = run / "prompts.json"
    box = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
    # a box with a positive and a negative point for the object on that slice (issue 32, point 5)
    points = [[float(cols[len(cols) // 2]) + 0.5, float(rows[len(rows) // 2]) + 0.5, 1], [0.5, 0.5, 0]]
    prompts.write_text(json.dumps({"hippocampus_044.nii.gz": [{"slice": k, "box": box, "label": 1, "points": points}]}))
    (run / "scans").mkdir()
    (run / "scans" / source.name).symlink_to(source)
    run_cli("predict", *tiny, "--ckpt_path", best, "--data.init_args.predict_images", run / "scans",
            "--data.init_args.predict_prompts", prompts)  # fmt: skip
    out = run / "runs/volumes_hippocampus/version_2/predictions"
    written, scan = sitk.ReadImage(str(out / "volumes" / source.name)), sitk.ReadImage(str(source))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(written, get)() == pytest.approx(getattr(scan, get)()), get
    assert scan.GetOrigin() != sitk.ReadImage(str(HIPPOCAMPUS / "imagesTr" / source.name)).GetOrigin()  # the cut's
    assert set(np.unique(sitk.GetArrayFromImage(written)).tolist()) <= {0, 1}
    assert (out / "montages" / "hippocampus_044.png").is_file()
