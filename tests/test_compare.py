"""segtune compare: a 2 x 2 matrix with one failing cell, reports that match each cell's own files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from segtune.cli import main
from tests.conftest import CONFIGS, metrics_rows


def _compare(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *args])
    return exit_info.value.code


def test_matrix_reports_match_the_cells_and_a_failure_is_isolated(
    shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "compare.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_config": str(CONFIGS / "quickstart.yaml"),
                "output": "cmp",
                "models": ["sam-tiny", "sam3tracker-tiny"],
                "methods": {
                    # Sam3Tracker has no fused qkv layer: this cell fails, the others must not care
                    "lora": {"class_path": "segtune.methods.LoRA", "init_args": {"target_modules": r".*\.qkv"}},
                    "full": {"class_path": "segtune.methods.FullFinetune", "init_args": {"lr": 0.0005}},
                },
                "overrides": ["--trainer.limit_train_batches", "2"],
            }
        )
    )
    args = ["--config", str(config), "--epochs", "1", "--data.root", str(shapes_root)]
    assert _compare(*args, "--dry-run") == 0
    listed = capsys.readouterr().out
    assert listed.count("to run") == 4

    assert _compare(*args) == 1  # one cell failed
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    by_cell = {(r["model"], r["method"]): r for r in report}
    assert set(by_cell) == {(m, k) for m in ("sam-tiny", "sam3tracker-tiny") for k in ("lora", "full")}
    failed = by_cell[("sam3tracker-tiny", "lora")]
    assert failed["status"] == "failed" and "matches no layer of Sam3TrackerModel" in failed["error"]
    assert "\n" not in failed["error"]
    for key, row in by_cell.items():
        if key == ("sam3tracker-tiny", "lora"):
            continue
        cell = tmp_path / "cmp" / f"{key[0]}__{key[1]}"
        assert row["status"] == "ok", row["error"]
        tested = [r for r in metrics_rows(cell / "test") if r.get("test_dice")][-1]
        assert row["test_dice"] == pytest.approx(float(tested["test_dice"]))
        assert row["test_iou"] == pytest.approx(float(tested["test_iou"]))
        best = max(float(r["val_dice"]) for r in metrics_rows(cell / "fit") if r.get("val_dice"))
        assert row["best_val_dice"] == pytest.approx(best)
        stats = json.loads((cell / "fit" / "cell_stats.json").read_text())
        assert row["trainable_params"] == stats["trainable_params"] > 0
        assert row["peak_memory_mb"] > 0 and row["train_time_s"] > 0 and row["final_train_loss"] is not None
    assert by_cell[("sam-tiny", "full")]["trainable_params"] == by_cell[("sam-tiny", "full")]["total_params"]
    with open(tmp_path / "cmp" / "report.csv") as f:
        header = next(csv.reader(f))
    columns = ["model", "method", "trainable_params", "total_params", "train_time_s", "time_per_step_s"]
    columns += ["peak_memory_mb", "final_train_loss", "best_val_dice", "test_dice", "test_iou", "status"]
    for column in columns:
        assert column in header
        assert column in (tmp_path / "cmp" / "report.md").read_text()
    assert (tmp_path / "cmp" / "report.png").read_bytes()[:4] == b"\x89PNG"

    # again: finished cells are skipped, the failed one is retried
    capsys.readouterr()
    assert _compare(*args) == 1
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 3 and "sam3tracker-tiny / lora: running" in out


def test_shipped_compare_config_lists_its_cells(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _compare("--config", str(CONFIGS / "compare.yaml"), "--output", str(tmp_path), "--dry-run") == 0
    assert capsys.readouterr().out.count("to run") == 4
