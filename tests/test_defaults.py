"""Defaults a user can see and change: the base config's callbacks show in --print_config, and a
config's own callback list replaces them (each default exactly once, or not at all)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import yaml

from segtune.cli import DEFAULTS, main
from segtune.visualise import validation_grid_height
from tests.conftest import CONFIGS, last_metrics

QUICKSTART = CONFIGS / "quickstart.yaml"
DEFAULT_CALLBACKS = [c["class_path"] for c in yaml.safe_load(DEFAULTS.read_text())["trainer"]["callbacks"]]


def test_every_default_shows_in_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    shown = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert shown == DEFAULT_CALLBACKS and len(shown) == 11
    assert [p["class_path"] for p in printed["trainer"]["plugins"]] == ["segtune.callbacks.AtomicCheckpointIO"]
    assert printed["weights_only"] is True
    assert printed["trainer"]["logger"]["init_args"]["name"] == "quickstart"  # the config's own value wins
    # LightningCLI's automatic optimiser would replace the methods' own (warm-up, cosine, trainable only)
    assert "optimizer" not in printed and "lr_scheduler" not in printed


def test_a_config_changes_and_removes_default_callbacks(run_cli, shapes_root: Path, tmp_path: Path) -> None:
    callbacks = yaml.safe_load(DEFAULTS.read_text())["trainer"]["callbacks"]
    for c in callbacks:
        if c["class_path"].endswith("ValidationImages"):
            c["init_args"]["every_n_epochs"] = 1
        if c["class_path"].endswith("PredictionWriter"):
            c["init_args"]["overlays"] = False
    callbacks = [c for c in callbacks if not c["class_path"].endswith("ReportBestCheckpoint")]  # removed
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    common = ["--config", QUICKSTART, "--config", mine, "--data.init_args.root", shapes_root]
    record = ["--trainer.callbacks+=tests.conftest.RecordCallbacks"]
    cwd = run_cli("fit", *common, *record, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2")
    ran = json.loads((cwd / "callbacks.json").read_text())
    names = [c["class"] for c in ran]
    for name in ("ValidationImages", "PredictionWriter", "BestCheckpoint", "TestReport", "MetricsHistory"):
        assert names.count(name) == 1, (name, names)
    assert "ReportBestCheckpoint" not in names
    assert next(c for c in ran if c["class"] == "ValidationImages")["every_n_epochs"] == 1
    assert next(c for c in ran if c["class"] == "PredictionWriter")["overlays"] is False
    best = next(c for c in ran if c["class"] == "BestCheckpoint")  # the metric comes from the module
    assert (best["monitor"], best["mode"]) == ("val_dice", "max")

    run = cwd / "runs" / "quickstart" / "version_0"
    for epoch in (0, 1):  # every epoch now: image | ground truth | prediction, one row per validation image (4)
        picture = cv2.imread(str(run / "val_images" / f"epoch_{epoch:03d}.png"))
        # 4 rows of 256 px panels with their titles and scores (segtune.visualise.validation_grid)
        assert picture is not None
        assert picture.shape[0] == validation_grid_height(4, 256) and picture.shape[1] >= 3 * 256
    (checkpoint,) = (run / "checkpoints").glob("best-*.ckpt")
    score = float(checkpoint.stem.split("val_dice")[1])
    assert score == pytest.approx(max(float(v) for v in [last_metrics(run)["val_dice"], score]), abs=1e-4)

    run_cli("predict", *common, "--ckpt_path", checkpoint)
    predictions = cwd / "runs" / "quickstart" / "version_1" / "predictions"
    assert len(list((predictions / "masks").glob("*.png"))) == 4 and not (predictions / "overlays").exists()


def test_a_first_fit_warns_about_nothing_of_ours(run_cli, shapes_root: Path) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli("fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1")  # fmt: skip
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    ours = [m for m in messages if "segtune" in m or "Unable to serialize" in m or "is_gradient_checkpointing" in m]
    assert not ours, ours
