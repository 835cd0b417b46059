"""A user's first run on their own folder: `layout: auto` through the CLI, the defaults a config may
leave out (max_epochs, precision), and the warning for a model that predicts nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from segtune.cli import default_precision, main
from segtune.methods.base import SegmentationModule
from tests.conftest import CONFIGS
from tests.test_layouts import _labelme_folder

QUICKSTART = CONFIGS / "quickstart.yaml"


def test_fit_on_a_labelme_folder_through_layout_auto(run_cli, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "cells"
    _labelme_folder(data, 10)
    with caplog.at_level(logging.INFO, logger="segtune"):
        cwd = run_cli(
            "fit", "--config", QUICKSTART, "--data.class_path", "segtune.data.SegmentationDataModule",
            "--data.init_args.root", data, "--trainer.accelerator", "auto", "--trainer.precision", "null",
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0",
        )  # fmt: skip
    assert "layout labelme (found LabelMe jsons beside the images (split by file))" in caplog.text
    saved = yaml.safe_load((cwd / "runs" / "quickstart" / "version_0" / "config.yaml").read_text())
    assert saved["data"]["init_args"]["layout"] == "auto"
    # no precision in the config: resolved, logged, and recorded in the run's config
    expected, _ = default_precision("auto")
    assert f"precision {expected} (" in caplog.text and saved["trainer"]["precision"] == expected
    assert any((cwd / "runs" / "quickstart" / "version_0" / "checkpoints").glob("best-*.ckpt"))


def test_default_precision_is_bf16_mixed_only_on_a_bf16_gpu_or_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert default_precision("auto") == ("32-true", "a CPU without native bf16")
    assert default_precision("cpu") == ("32-true", "accelerator cpu, no native bf16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # e.g. AMD EPYC (Zen 4)
    assert default_precision("auto") == ("bf16-mixed", "the CPU computes bf16 natively (avx512_bf16)")
    assert default_precision("cpu") == ("bf16-mixed", "the CPU computes bf16 natively (avx512_bf16)")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake A100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert default_precision("auto") == ("32-true", "no CUDA GPU with bf16")  # emulated bf16 is not enough
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert default_precision("auto") == ("bf16-mixed", "Fake A100 supports bf16")
    assert default_precision("gpu")[0] == "bf16-mixed"
    assert default_precision("cpu") == ("32-true", "accelerator cpu, no native bf16")
    assert default_precision("mps") == ("32-true", "accelerator mps")


def test_max_epochs_and_precision_defaults_show_in_print_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mine.yaml"  # what a user writes first: a model and a folder, no trainer section
    config.write_text(
        "model: {class_path: segtune.methods.LoRA, init_args: {model: sam-tiny}}\n"
        f"data: {{class_path: segtune.data.SegmentationDataModule, init_args: {{root: {tmp_path}}}}}\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 30 and printed["trainer"]["precision"] is None  # not Lightning's 1000
    assert printed["data"]["init_args"]["layout"] == "auto"
    assert printed["model"]["init_args"]["empty_target"] == "exclude"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICKSTART), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_epochs"] == 16  # a config's own value wins


def test_a_model_that_predicts_only_background_is_warned_about_once(
    run_cli, shapes_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    forward = SegmentationModule.forward

    def steered(self, batch):
        # every logit far below 0: empty masks in the sanity check and every epoch
        out = forward(self, batch)
        out.pred_masks = out.pred_masks * 0 - 1e4  # still on the graph
        return out

    monkeypatch.setattr(SegmentationModule, "forward", steered)
    with caplog.at_level(logging.INFO, logger="segtune"):
        run_cli("fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--trainer.max_epochs", "3",
                "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")  # fmt: skip
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "prediction is empty" in r.getMessage()]
    warnings = [m for level, m in said if level == logging.WARNING]
    # not for the sanity check; epoch 0 is logged only (a first empty validation is common), epoch 1 is the
    # second empty validation in a row: warned, once (not again for epoch 2)
    assert [(level, m.split(":")[0]) for level, m in said] == [(logging.INFO, "epoch 0"), (logging.WARNING, "epoch 1")]
    assert "common in the first epochs" in said[0][1]
    assert warnings[0].startswith("epoch 1: every validation prediction is empty (0 of ")
    assert "as in the validation before" in warnings[0]
    for advice in ("dice_weight", "RandomCrop", "prompts.max_instances"):
        assert advice in warnings[0]
