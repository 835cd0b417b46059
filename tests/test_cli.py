"""The CLI as a user runs it: help, every shipped config, fit -> test -> predict."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from tests.conftest import CONFIGS, ROOT, last_metrics

QUICKSTART = CONFIGS / "quickstart.yaml"
QUICKSTART_LORA = CONFIGS / "quickstart_lora.yaml"
# compare.yaml is not a Trainer config: tests/test_compare.py parses it; wandb.yaml is a logger to add
# to another config: tests/test_use.py runs it with the quickstart
ALL_CONFIGS = sorted(  # search_*.yaml are segtune tune's search spaces, not fit configs
    p
    for p in CONFIGS.glob("*.yaml")
    if p.name not in ("compare.yaml", "wandb.yaml") and not p.name.startswith("search_")
)


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


def test_fit_test_predict_round_trip(run_cli, shapes_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--config", QUICKSTART, "--data.init_args.root", shapes_root]
    cwd = run_cli("fit", *common, "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1")
    run = cwd / "runs" / "quickstart" / "version_0"
    assert (run / "config.yaml").is_file()
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (run / "checkpoints" / "last.ckpt").is_file()
    assert "Best checkpoint (val_dice=" in capsys.readouterr().out
    fit_metrics = last_metrics(run)
    for key in ("val_dice", "val_iou", "val_box_dice", "val_dice/star", "val_dice/cross", "train_loss"):
        assert key in fit_metrics, key
    assert 0.0 <= fit_metrics["val_dice"] <= 1.0

    capsys.readouterr()
    run_cli("test", *common, "--ckpt_path", best[0])
    test_run = cwd / "runs" / "quickstart" / "version_1"
    test_metrics = last_metrics(test_run)
    for key in ("test_dice", "test_iou", "test_box_dice"):
        assert 0.0 <= test_metrics[key] <= 1.0, key
    # the report's means are the logged metrics, per image rows cover the test split
    report = json.loads((test_run / "test_metrics.json").read_text())
    assert report["overall"]["dice"] == pytest.approx(test_metrics["test_dice"], abs=1e-5)
    assert report["overall"]["iou"] == pytest.approx(test_metrics["test_iou"], abs=1e-5)
    assert report["overall"]["box_dice"] == pytest.approx(test_metrics["test_box_dice"], abs=1e-5)
    for name, scores in report["per_class"].items():
        assert scores["dice"] == pytest.approx(test_metrics[f"test_dice/{name}"], abs=1e-5)
    with open(test_run / "test_per_image.csv") as f:
        per_image = list(csv.DictReader(f))
    test_json = json.loads((shapes_root / "test" / "_annotations.coco.json").read_text())
    assert len(per_image) == len(test_json["images"])
    assert sum(int(r["instances"]) for r in per_image) == len(test_json["annotations"])
    out = capsys.readouterr().out
    assert "Test report:" in out and "worst:" in out

    run_cli("validate", *common, "--ckpt_path", best[0])
    # validating the best checkpoint reproduces the val_dice it was selected by
    assert last_metrics(cwd / "runs" / "quickstart" / "version_2")["val_dice"] == pytest.approx(
        float(best[0].stem.split("val_dice")[1]), abs=1e-4
    )

    run_cli("predict", *common, "--ckpt_path", best[0])
    predictions = cwd / "runs" / "quickstart" / "version_3" / "predictions"
    for image in test_json["images"]:
        stem = Path(image["file_name"]).stem
        mask = cv2.imread(str(predictions / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (image["height"], image["width"]) and mask.dtype == np.uint8
        n = sum(a["image_id"] == image["id"] for a in test_json["annotations"])
        assert set(np.unique(mask).tolist()) <= set(range(n + 1))
        assert cv2.imread(str(predictions / "overlays" / f"{stem}.jpg")).shape[:2] == mask.shape
    gt = COCO(str(shapes_root / "test" / "_annotations.coco.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        results = gt.loadRes(str(predictions / "predictions.json"))
    assert len(results.anns) == len(test_json["annotations"])
    assert {a["category_id"] for a in results.anns.values()} <= {c["id"] for c in test_json["categories"]}


def test_lora_checkpoint_holds_only_trainable_weights(run_cli, shapes_root: Path) -> None:
    cwd = run_cli(
        "fit", "--config", QUICKSTART_LORA, "--data.init_args.root", shapes_root,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
    )  # fmt: skip
    ckpt = torch.load(cwd / "runs/quickstart_lora/version_0/checkpoints/last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys)
    assert not any("base_layer" in k for k in keys)


def test_validation_images_reach_tensorboard(run_cli, shapes_root: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd = run_cli(
        "fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", "tb", "--trainer.callbacks+=segtune.callbacks.ValidationImages",
        "--trainer.callbacks.every_n_epochs=1",
    )  # fmt: skip
    events = EventAccumulator(str(cwd / "tb" / "quickstart" / "version_0")).Reload()
    assert "val_images" in events.Tags()["images"]
    assert (cwd / "tb" / "quickstart" / "version_0" / "val_images" / "epoch_000.png").is_file()


def test_predict_keeps_nothing_it_has_written(run_cli, shapes_root: Path) -> None:
    common = ["--config", QUICKSTART, "--data.init_args.root", shapes_root]
    cwd = run_cli("fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1")
    (best,) = (cwd / "runs/quickstart/version_0/checkpoints").glob("best-*.ckpt")
    run_cli("predict", *common, "--ckpt_path", best, "--trainer.callbacks+=tests.conftest.RecordCallbacks")
    assert len(list((cwd / "runs/quickstart/version_1/predictions/masks").glob("*.png"))) == 4  # written...
    assert json.loads((cwd / "predictions_kept.json").read_text()) == 0  # ...and not also held by the Trainer


def test_lightning_optimizer_flags_are_not_offered(capsys: pytest.CaptureFixture[str]) -> None:
    from segtune.cli import main

    # they would replace the method's optimiser (warm-up, cosine decay, frozen parameters left out)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--optimizer", "torch.optim.SGD", "--print_config"])
    assert exit_info.value.code == 2
    assert "optimizer" in capsys.readouterr().err


def test_the_segtune_command_freezes_the_garbage_collector_as_it_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    # interpreter shutdown spent 1-2 s collecting torch's objects (benchmarks/quickstart_fit.py's "exit" phase)
    import segtune.cli

    calls: list[str] = []

    def failing_main() -> None:
        calls.append("main")
        raise SystemExit(3)

    monkeypatch.setattr(segtune.cli, "main", failing_main)
    monkeypatch.setattr(segtune.cli.gc, "freeze", lambda: calls.append("freeze"))
    with pytest.raises(SystemExit) as exit_info:
        segtune.cli.run()
    assert exit_info.value.code == 3 and calls == ["main", "freeze"]  # the exit code is kept
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == {"segtune": "segtune.cli:run"}


def test_segtune_lines_print_once_when_the_root_logger_prints_too(capsys: pytest.CaptureFixture[str]) -> None:
    """A user's ``logging.basicConfig()`` gives the root logger a console handler; segtune's records reach it
    by propagation, so segtune's own handler stays quiet then (the issue's warning was printed twice)."""
    import logging
    import sys

    from segtune.cli import _StderrHandler

    handler = _StderrHandler()
    logger = logging.getLogger("print_once_test")  # outside "segtune", whose handler earlier CLI tests may have added
    logger.addHandler(handler)
    root = logging.StreamHandler(sys.stderr)
    kept = logging.getLogger().handlers[:]  # whatever earlier tests of this process left on the root logger
    logging.getLogger().handlers.clear()
    try:
        logger.warning("alone")
        logging.getLogger().addHandler(root)
        logger.warning("with a root console handler")
    finally:
        logging.getLogger().handlers[:] = kept
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("alone") == 1 and err.count("with a root console handler") == 1
