"""The CLI as a user runs it: help, every shipped config, fit -> test -> predict."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS

QUICKSTART = CONFIGS / "quickstart.yaml"
ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def _metrics(run: Path) -> dict[str, float]:
    """Last logged value of each column of a CSVLogger run."""
    out: dict[str, float] = {}
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    from segtune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "segtune", "fit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=[c.name for c in ALL_CONFIGS])
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segtune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: segtune.methods." in printed
    assert "class_path: segtune.data." in printed


def test_quickstart_fast_dev_run(run_cli, shapes_root: Path) -> None:
    cwd = run_cli("fit", "--config", QUICKSTART, "--trainer.fast_dev_run", "true", "--data.init_args.root", shapes_root)
    # fast_dev_run logs nothing, but it must have trained on real batches without error
    assert not (cwd / "runs" / "quickstart" / "version_0" / "checkpoints").exists()


def test_fit_test_predict_round_trip(run_cli, shapes_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--config", QUICKSTART, "--data.init_args.root", shapes_root]
    cwd = run_cli("fit", *common, "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1")
    run = cwd / "runs" / "quickstart" / "version_0"
    assert (run / "config.yaml").is_file()
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    assert "Best checkpoint (val_dice=" in capsys.readouterr().out
    fit_metrics = _metrics(run)
    for key in ("val_dice", "val_iou", "val_box_dice", "val_dice/star", "val_dice/cross", "train_loss"):
        assert key in fit_metrics, key
    assert 0.0 <= fit_metrics["val_dice"] <= 1.0

    run_cli("test", *common, "--ckpt_path", best[0])
    test_metrics = _metrics(cwd / "runs" / "quickstart" / "version_1")
    for key in ("test_dice", "test_iou", "test_box_dice"):
        assert 0.0 <= test_metrics[key] <= 1.0, key

    run_cli("validate", *common, "--ckpt_path", best[0])
    # validating the best checkpoint reproduces the val_dice it was selected by
    assert _metrics(cwd / "runs" / "quickstart" / "version_2")["val_dice"] == pytest.approx(
        float(best[0].stem.split("val_dice")[1]), abs=1e-4
    )

    run_cli("predict", *common, "--ckpt_path", best[0])


def test_lora_checkpoint_holds_only_trainable_weights(run_cli, shapes_root: Path) -> None:
    cwd = run_cli(
        "fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
    )  # fmt: skip
    ckpt = torch.load(cwd / "runs/quickstart/version_0/checkpoints/last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys)
    assert not any("base_layer" in k for k in keys)
