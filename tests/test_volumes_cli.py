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
    """Three cases of the shared set (linked, not copied) with its dataset.json: one per split."""
    if not HIPPOCAMPUS.is_dir():
        pytest.skip(f"{HIPPOCAMPUS} is absent (the shared data sits beside the project)")
    root = tmp_path / "hippocampus"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        for case in CASES:
            (root / folder / f"{case}.nii.gz").symlink_to(HIPPOCAMPUS / folder / f"{case}.nii.gz")
    shutil.copy(HIPPOCAMPUS / "dataset.json", root)
    return root


def test_fit_test_and_predict_volumes_from_the_shipped_config(hippocampus: Path, run_cli, capsys) -> None:
    tiny = [
        "--config", CONFIGS / "volumes_hippocampus.yaml", "--data.init_args.root", hippocampus,
        "--data.init_args.split_fractions", "[0.34, 0.33, 0.33]", "--data.init_args.batch_size", "4",
    ]  # fmt: skip
    run = run_cli("fit", *tiny, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                  "--trainer.num_sanity_val_steps", "0")  # fmt: skip
    version = run / "runs/volumes_hippocampus/version_0"
    best = next((version / "checkpoints").glob("best-*val_dice*.ckpt"))
    with open(version / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("val_dice")]
    assert logged and {"val_nsd/Anterior", "val_slice_dice/Posterior"} <= set(logged[0])
    capsys.readouterr()
    run_cli("test", *tiny, "--ckpt_path", best)
    printed = capsys.readouterr().out
    assert "nsd" in printed and "slice dice" in printed and "Anterior" in printed and "Posterior" in printed
    report = json.loads((run / "runs/volumes_hippocampus/version_1/test_metrics.json").read_text())
    assert report["unit"] == "case" and set(report["per_class"]) == {"Anterior", "Posterior"}
    assert len(report["per_case"]) == 1 and (run / "runs/volumes_hippocampus/version_1/test_per_case.csv").is_file()
    # predict: one box per object on one slice -> a label volume a viewer overlays on its scan
    source = HIPPOCAMPUS / "imagesTr" / "hippocampus_044.nii.gz"
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / "hippocampus_044.nii.gz")))
    k = int(np.argmax((label == 1).sum(axis=(1, 2))))
    rows, cols = np.flatnonzero((label[k] == 1).any(1)), np.flatnonzero((label[k] == 1).any(0))
    prompts = run / "prompts.json"
    box = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
    prompts.write_text(json.dumps({"hippocampus_044.nii.gz": [{"slice": k, "box": box, "label": 1}]}))
    (run / "scans").mkdir()
    (run / "scans" / source.name).symlink_to(source)
    run_cli("predict", *tiny, "--ckpt_path", best, "--data.init_args.predict_images", run / "scans",
            "--data.init_args.predict_prompts", prompts)  # fmt: skip
    out = run / "runs/volumes_hippocampus/version_2/predictions"
    written, scan = sitk.ReadImage(str(out / "volumes" / source.name)), sitk.ReadImage(str(source))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(written, get)() == pytest.approx(getattr(scan, get)()), get
    assert set(np.unique(sitk.GetArrayFromImage(written)).tolist()) <= {0, 1}
    assert (out / "montages" / "hippocampus_044.png").is_file()
