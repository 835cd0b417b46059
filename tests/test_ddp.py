"""Two processes (DDP over gloo on CPU) fit a SAM2 full fine-tune and test it; test metrics equal a one-process run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from segtune.data.synthetic import write_shapes_coco
from tests.conftest import CONFIGS, last_metrics, metrics_rows, segtune_script


def test_ddp_two_processes_fit_and_test_like_one(tmp_path: Path) -> None:
    segtune = segtune_script()
    # 5 test images: 2 processes cannot split them evenly, so a repeated image would show
    data = write_shapes_coco(tmp_path / "data", {"train": 8, "valid": 3, "test": 5}, seed=3)  # 2 steps per process
    # A SAM2 full fine-tune: before segtune froze the parameters its training never reaches (SAM2's
    # object-score head, the mask-prompt embedding), DDP stopped at the second step waiting for their gradients.
    common = ["--config", str(CONFIGS / "quickstart.yaml"), "--data.init_args.root", str(data),
              "--data.init_args.batch_size", "2", "--model.class_path", "segtune.methods.FullFinetune",
              "--model.init_args.model", "sam2-tiny"]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]

    fit = subprocess.run([segtune, "fit", *common, *ddp, "--trainer.max_epochs", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    best = next((tmp_path / "runs/quickstart/version_0/checkpoints").glob("best-*.ckpt"))
    # the untuned model is scored once (synced), logged once and summed up by one process
    assert fit.stdout.count("untuned val_dice") == 1, fit.stdout[-2000:]
    assert sum(bool(r.get("untuned_val_dice")) for r in metrics_rows(tmp_path / "runs/quickstart/version_0")) == 1
    untuned = ["--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.untuned=true"]

    two = subprocess.run([segtune, "test", *common, *ddp, "--ckpt_path", str(best), *untuned], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([segtune, "test", *common, "--trainer.devices", "1", "--ckpt_path", str(best), *untuned],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    in_two, in_one = (
        last_metrics(tmp_path / "runs/quickstart/version_1"),
        last_metrics(tmp_path / "runs/quickstart/version_2"),
    )
    for key in ("test_dice", "test_iou", "test_box_dice", "test_dice/star", "test_dice/cross"):
        assert in_two[key] == pytest.approx(in_one[key], abs=1e-6), key
    import json

    report = json.loads((tmp_path / "runs/quickstart/version_1/test_metrics.json").read_text())
    assert len(report["per_image"]) == 5  # every test image once, from both processes
    # the untuned model beside the checkpoint: rebuilt in each process, its instances gathered once
    alone = json.loads((tmp_path / "runs/quickstart/version_2/test_metrics.json").read_text())["untuned"]
    assert len(report["untuned"]["per_instance"]) == len(report["per_instance"])
    assert report["untuned"]["overall"] == pytest.approx(alone["overall"])
    assert report["untuned"]["difference"]["dice"]["overall"] == pytest.approx(alone["difference"]["dice"]["overall"])


def test_ddp_with_parameters_without_gradient_stops_in_one_line(tmp_path: Path) -> None:
    # SAM's prompt encoder trained on box prompts: its point embeddings get no gradient
    data = write_shapes_coco(tmp_path / "data", {"train": 8, "valid": 2}, seed=3)
    fit = subprocess.run(
        [segtune_script(), "fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.init_args.root", str(data),
         "--data.init_args.batch_size", "2", "--model.class_path", "segtune.methods.FullFinetune",
         "--model.init_args.train_parts", "[prompt_encoder, mask_decoder]", "--trainer.max_epochs", "1",
         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert fit.returncode != 0
    assert "segtune: error: DDP: some trainable parameters got no gradient" in fit.stderr
    assert "ddp_find_unused_parameters_true" in fit.stderr
    assert "Traceback" not in fit.stderr
