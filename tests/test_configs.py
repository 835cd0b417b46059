"""Every shipped config runs as it is, with only its model swapped for a tiny one and its data root
pointed at a small local set (no download, no real data needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from segtune.models.presets import PRESETS
from tests.conftest import CONFIGS, last_metrics

# search_*.yaml are segtune tune's search files, no fit configs (tests/test_tune.py checks the shipped one)
SHIPPED = sorted(
    p
    for p in CONFIGS.glob("*.yaml")
    if p.name not in ("quickstart.yaml", "compare.yaml", "wandb.yaml") and not p.name.startswith("search_")
)
TINY = {
    "SamModel": "sam-tiny",
    "SamHQModel": "samhq-tiny",
    "Sam2Model": "sam2-tiny",
    "Sam3TrackerModel": "sam3tracker-tiny",
    "MobileSamModel": "mobilesam-tiny",
}


def test_the_issue_configs_are_shipped() -> None:
    names = {p.name for p in SHIPPED}
    assert {
        "lora_cataract.yaml", "qlora_retinopathy.yaml", "full_cataract.yaml",
        "lora_sam2_cataract.yaml", "lora_medsam_kvasir.yaml",
        "lora_mobilesam_cataract.yaml", "lora_medsam2_kvasir.yaml",
    } <= names  # fmt: skip


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_header_names_the_data_the_root_points_at(config: Path) -> None:
    text = config.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    root = yaml.safe_load(text)["data"]["init_args"]["root"]
    assert root in header, f"{config.name}: the header comment should describe the dataset at {root}"


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_runs_with_a_tiny_model(
    config: Path, run_cli, shapes_root: Path, masks_root: Path, tmp_path: Path
) -> None:
    settings = yaml.safe_load(config.read_text())
    model = PRESETS[settings["model"]["init_args"]["model"]]
    layout = settings["data"]["init_args"].get("layout")
    root = {"masks": masks_root, "volumes": None}.get(layout, shapes_root)
    extra: list[str] = []
    if layout == "volumes":  # ten small synthetic MRI-like volumes in a Decathlon folder; small batches
        from tests.test_volumes import decathlon

        root = decathlon(tmp_path / "volumes", cases=10)
        extra = ["--data.init_args.batch_size", "2", "--trainer.num_sanity_val_steps", "0"]
    run = run_cli(
        "fit", "--config", config,
        "--model.init_args.model", TINY[model.model_class],
        "--data.init_args.root", root,
        # one process and no fork: the configs' 4 workers only cost start-up time on 2 CPU cores
        "--data.init_args.num_workers", "0", "--data.init_args.persistent_workers", "false",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", *extra,
    )  # fmt: skip
    (folder,) = (run / "runs").glob("*/version_0")
    metrics = last_metrics(folder)
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["val_dice"] <= 1.0
    assert 0.0 <= metrics["val_box_dice"] <= 1.0
    if layout == "volumes":  # scored as volumes: NSD beside the volume Dice
        assert 0.0 <= metrics["val_nsd"] <= 1.0 and "val_slice_dice" in metrics
