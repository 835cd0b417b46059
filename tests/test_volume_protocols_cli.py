"""The 3D prompt protocols from the command line: box2d's stop rule chosen on the validation volumes, kept in
the checkpoint and used by test; every protocol's table with the ceiling and range columns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from segtune.propagation import STOP_GRID, StopRule
from tests.conftest import CONFIGS, metrics_rows
from tests.test_volumes import decathlon

TINY = [
    "--config", CONFIGS / "volumes_hippocampus.yaml", "--model.class_path", "segtune.methods.FullFinetune",
    "--model.init_args.model", "sam-tiny", "--model.init_args.train_parts", "[mask_decoder]",
    "--model.init_args.embedding_cache", "off", "--data.init_args.split_fractions", "[0.34, 0.33, 0.33]",
    "--data.init_args.batch_size", "4", "--trainer.precision", "32-true", "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip
BOX2D = ["--model.init_args.volume_scoring.prompt", "box2d"]


def test_box2d_chooses_its_stop_rule_on_validation_and_test_uses_it(tmp_path: Path, run_cli, caplog) -> None:
    root = decathlon(tmp_path / "ds", cases=3)
    run = run_cli("fit", *TINY, *BOX2D, "--data.init_args.root", root, "--trainer.max_epochs", "1",
                  "--trainer.limit_train_batches", "1")  # fmt: skip
    version = run / "runs/volumes_hippocampus/version_0"
    logged = [r for r in metrics_rows(version) if r.get("val_stop_min_score")]
    assert len(logged) == 1
    # logged as float32: the grid's rule it names
    chosen = StopRule(*(round(float(logged[0][f"val_stop_{k}"]), 4) for k in ("min_score", "min_overlap", "min_area")))
    assert chosen in STOP_GRID
    checkpoint = torch.load(version / "checkpoints/last.ckpt", weights_only=True)
    assert StopRule(**checkpoint["volume_stop"]) == chosen
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segtune"):
        run_cli("test", *TINY, *BOX2D, "--data.init_args.root", root, "--ckpt_path", version / "checkpoints/last.ckpt",
                "--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.untuned=true")  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "stop rule" in r.getMessage()]
    assert said and f"min_score {chosen.min_score}" in said[0]  # it says which rule it scores with
    # the untuned model beside it chooses its own rule on the validation split, not the checkpoint's
    assert sum("stop rule chosen on the validation split:" in m for m in said) == 1
    report = json.loads((run / "runs/volumes_hippocampus/version_1/test_metrics.json").read_text())
    for name in ("ceiling_dice", "ceiling_nsd", "outside_slices", "empty_slices"):
        assert name in report["overall"]
    # box3d on the same checkpoint: nothing predicted outside each object's range
    run_cli("test", *TINY, "--data.init_args.root", root, "--ckpt_path", version / "checkpoints/last.ckpt")
    report = json.loads((run / "runs/volumes_hippocampus/version_2/test_metrics.json").read_text())
    assert report["overall"]["outside_slices"] == 0


def test_box2d_on_the_untuned_model_chooses_its_stop_rule_on_the_validation_split(
    tmp_path: Path, run_cli, caplog
) -> None:
    root = decathlon(tmp_path / "ds", cases=3)
    with caplog.at_level(logging.INFO, logger="segtune"):
        run_cli("test", *TINY, *BOX2D, "--data.init_args.root", root)
    said = [r.getMessage() for r in caplog.records if "stop rule chosen on the validation split" in r.getMessage()]
    assert len(said) == 1
    # the test split's case is scored after the choice; the validation split's case chose it
    report = json.loads((tmp_path / "runs/volumes_hippocampus/version_0/test_metrics.json").read_text())
    assert len(report["per_case"]) == 1
