"""segtune compare: a 2 x 2 matrix with one failing cell, reports that match each cell's own files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from segtune.cli import main
from segtune.models.loading import load_model
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
            },
            sort_keys=False,  # the methods in this order: lora is each model's first cell
        )
    )
    args = ["--config", str(config), "--epochs", "1", "--data.root", str(shapes_root)]
    assert _compare(*args, "--dry-run") == 0
    listed = capsys.readouterr().out
    assert listed.count("to run") == 4

    assert _compare(*args) == 1  # one cell failed
    everything = json.loads((tmp_path / "cmp" / "report.json").read_text())
    report = [r for r in everything if r["method"] != "(untuned)"]
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
        summary = json.loads((cell / "fit" / "untuned.json").read_text())
        if summary["best_checkpoint_is_untuned"]:  # no epoch beat the untuned model: the cell tested its weights
            best = summary["untuned"]
        assert row["best_val_dice"] == pytest.approx(best)
        assert row["best_val_loss"] == pytest.approx(
            min(float(r["val_loss"]) for r in metrics_rows(cell / "fit") if r.get("val_loss"))
        )
        stats = json.loads((cell / "fit" / "cell_stats.json").read_text())
        assert row["trainable_params"] == stats["trainable_params"] > 0
        assert row["peak_memory_mb"] > 0 and row["train_time_s"] > 0 and row["final_train_loss"] is not None
    # FullFinetune's default parts: the image encoder and the mask decoder (the prompt encoder stays frozen)
    model = load_model("sam-tiny")[0]
    parts = sum(p.numel() for part in (model.vision_encoder, model.mask_decoder) for p in part.parameters())
    assert by_cell[("sam-tiny", "full")]["trainable_params"] == parts < by_cell[("sam-tiny", "full")]["total_params"]
    with open(tmp_path / "cmp" / "report.csv") as f:
        header = next(csv.reader(f))
    columns = ["model", "method", "trainable_params", "total_params", "train_time_s", "time_per_step_s"]
    columns += ["peak_memory_mb", "final_train_loss", "best_val_dice", "test_dice", "test_iou", "status"]
    for column in columns:
        assert column in header
        assert column in (tmp_path / "cmp" / "report.md").read_text()
    assert (tmp_path / "cmp" / "report.png").read_bytes()[:4] == b"\x89PNG"
    # an untuned row before each model's cells: validation Dice from its fits (measured before the first
    # step), test Dice from the one test of the model that also scored the untuned model
    untuned = {r["model"]: r for r in everything if r["method"] == "(untuned)"}
    assert [r["method"] for r in everything][:3] == ["(untuned)", "lora", "full"]
    for model, first in (("sam-tiny", "lora"), ("sam3tracker-tiny", "full")):  # sam3tracker's LoRA cell failed
        fit = tmp_path / "cmp" / f"{model}__{first}" / "fit"
        logged = next(float(r["untuned_val_dice"]) for r in metrics_rows(fit) if r.get("untuned_val_dice"))
        assert untuned[model]["best_val_dice"] == pytest.approx(logged)
        side = json.loads((fit.parent / "test" / "test_metrics.json").read_text())["untuned"]["overall"]
        assert (untuned[model]["test_dice"], untuned[model]["test_iou"]) == pytest.approx((side["dice"], side["iou"]))
        gain = json.loads((fit / "untuned.json").read_text())["difference"]["overall"]
        assert by_cell[(model, first)]["val_dice_gain"] == pytest.approx(gain["mean"])
        assert by_cell[(model, first)]["val_dice_gain_ci95"] == f"[{gain['low']:+.4f}, {gain['high']:+.4f}]"
    assert "untuned" not in json.loads((tmp_path / "cmp" / "sam-tiny__full" / "test" / "test_metrics.json").read_text())
    assert "(untuned)" in (tmp_path / "cmp" / "report.md").read_text()
    # the aggregate over cells: success rate, spread of time, memory and Dice, each cell's best val loss
    aggregate = json.loads((tmp_path / "cmp" / "aggregate.json").read_text())
    ok = [r for r in report if r["status"] == "ok"]
    assert (aggregate["cells"], aggregate["ok"], aggregate["success_rate"]) == (4, 3, 0.75)
    for key in ("train_time_s", "peak_memory_mb", "test_dice", "time_per_step_s"):
        values = [r[key] for r in ok]
        assert aggregate[key] == pytest.approx(
            {"mean": sum(values) / 3, "min": min(values), "max": max(values), "cells": 3}
        ), key
    assert {(c["model"], c["method"]): c["best_val_loss"] for c in aggregate["best_val_loss"]} == {
        key: row["best_val_loss"] for key, row in by_cell.items()
    }
    assert by_cell[("sam3tracker-tiny", "lora")]["best_val_loss"] is None  # it never validated
    assert "3 of 4 cells finished (success rate 75%)" in (tmp_path / "cmp" / "aggregate.md").read_text()

    # again: finished cells are skipped, the failed one is retried
    capsys.readouterr()
    assert _compare(*args) == 1
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 3 and "sam3tracker-tiny / lora: running" in out


def test_shipped_compare_config_lists_its_cells(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _compare("--config", str(CONFIGS / "compare.yaml"), "--output", str(tmp_path), "--dry-run") == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 6 and all("to run" in line for line in listed)
    methods = yaml.safe_load((CONFIGS / "compare.yaml").read_text())["methods"]
    assert {m["class_path"] for m in methods.values()} == {
        "segtune.methods.FullFinetune", "segtune.methods.LoRA", "segtune.methods.QLoRA"
    }  # fmt: skip


def test_filters_pick_cells_and_unknown_arguments_fail_once_before_any_cell(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    shipped = ["--config", str(CONFIGS / "compare.yaml"), "--output", str(tmp_path / "cmp")]
    assert _compare(*shipped, "--dry-run", "--models", "sam2-tiny", "--methods", "lora,qlora") == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listed] == [["sam2-tiny", "lora"], ["sam2-tiny", "qlora"]]

    assert _compare(*shipped, "--dry-run", "--models", "medsam") == 1
    err = capsys.readouterr().err
    assert "no model medsam (it has sam-tiny, sam2-tiny)" in err and len(err.strip().splitlines()) == 1

    # an argument fit does not know: one line, the same with and without --dry-run, and no cell starts
    for dry in (["--dry-run"], []):
        assert _compare(*shipped, *dry, "--trainer.max_epoks", "3") == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--trainer.max_epoks" in err, err
        assert err.startswith("segtune: error: ")
        assert not (tmp_path / "cmp").exists()
    # checked per method: LoRA's rank exists only for the LoRA methods
    assert _compare(*shipped, "--dry-run", "--methods", "lora", "qlora", "--model.init_args.r", "4") == 0
    capsys.readouterr()
    assert _compare(*shipped, "--dry-run", "--model.init_args.r", "4") == 1
    err = capsys.readouterr().err
    assert "method full" in err and "Option 'r' is not accepted" in err and len(err.strip().splitlines()) == 1


def test_a_cell_whose_best_checkpoint_is_the_untuned_model_reports_its_dice(tmp_path: Path) -> None:
    """No epoch beat the untuned model: the cell tests the untuned weights, so its best_val_dice is theirs."""
    import json

    from segtune.compare import untuned_scores

    (tmp_path / "metrics.csv").write_text("epoch,step,untuned_val_dice,val_dice\n0,0,0.5,\n0,9,,0.3\n1,19,,0.4\n")
    summary = {"monitor": "val_dice", "untuned": 0.5, "best": 0.4, "best_checkpoint_is_untuned": True}
    (tmp_path / "untuned.json").write_text(json.dumps(summary))
    scores = untuned_scores(tmp_path)
    assert scores["best_val_dice"] == 0.5 and scores["best_is_untuned"] is True
    (tmp_path / "untuned.json").write_text(json.dumps({**summary, "best": 0.6, "best_checkpoint_is_untuned": False}))
    assert "best_val_dice" not in untuned_scores(tmp_path)  # an epoch's checkpoint: the logged best stays
