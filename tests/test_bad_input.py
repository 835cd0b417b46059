"""Broken input through the CLI: each case ends in a one-line message (or a logged skip), never a traceback."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CONFIGS

QUICKSTART = CONFIGS / "quickstart.yaml"
JSON = "_annotations.coco.json"


def _edit_json(root: Path, split: str, edit: Callable[[dict], None]) -> None:
    path = root / split / JSON
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _first_image(root: Path, split: str = "valid") -> Path:
    return root / split / json.loads((root / split / JSON).read_text())["images"][0]["file_name"]


def _invalid_json(root: Path) -> list[str]:
    (root / "valid" / JSON).write_text('{"images": [')
    return []


def _missing_image(root: Path) -> list[str]:
    _first_image(root).unlink()
    return []


def _corrupt_image(root: Path) -> list[str]:
    _first_image(root).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return []


def _wrong_size(root: Path) -> list[str]:
    _edit_json(root, "valid", lambda d: d["images"][0].update(width=999))
    return []


def _mask_size(root: Path) -> list[str]:
    for sub in ("images", "masks"):
        (root / "masks_set" / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "masks_set" / "images" / f"x{i}.png")
        mask = np.zeros((40, 50) if i else (30, 50), np.uint8)
        mask[5:20, 5:20] = 255
        Image.fromarray(mask).save(root / "masks_set" / "masks" / f"x{i}.png")
    return ["--data.init_args.root", str(root / "masks_set"), "--data.init_args.layout", "masks",
            "--data.init_args.split_fractions", "[0.5, 0.5, 0.0]"]  # fmt: skip


def _no_data(root: Path) -> list[str]:
    return ["--data.init_args.root", str(root / "nowhere")]


def _unknown_key(root: Path) -> list[str]:
    return ["--model.init_args.learning_rate", "0.1"]


def _missing_model(root: Path) -> list[str]:
    return ["--model.init_args.model", "sam-vit-hueg"]


def _hub_id_offline(root: Path) -> list[str]:
    return ["--model.init_args.model", "some-lab/sam-finetuned"]


def _unwritable_run_folder(root: Path) -> list[str]:
    (root / "a_file").write_text("not a folder")
    # fast_dev_run turns the logger off: a real run, one batch
    return ["--trainer.logger.init_args.save_dir", str(root / "a_file" / "runs"), "--trainer.fast_dev_run", "false",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]  # fmt: skip


def _malformed_points(root: Path) -> list[str]:
    first = _first_image(root, "test")
    (root / "points.json").write_text(json.dumps({first.name: [[10, 20, 1], [30, 40]]}))
    return ["--data.init_args.predict_images", str(root / "test"), "--data.init_args.predict_prompts",
            str(root / "points.json")]  # fmt: skip


CASES = {
    # case: (break the data or build the arguments, exit code, what the last stderr line must say)
    "invalid json": (_invalid_json, 1, "_annotations.coco.json: invalid json"),
    "missing image": (_missing_image, 1, ": image file not found"),
    "corrupt image": (_corrupt_image, 1, ": cannot read image"),
    "image size differs from json": (_wrong_size, 1, "but the json says 999x"),
    "mask size differs from image": (_mask_size, 1, "mask is 50x30 but its image is 50x40"),
    "no data folder": (_no_data, 1, "nowhere: data root folder not found"),
    "unknown config key": (_unknown_key, 2, "learning_rate"),
    "model that does not exist": (_missing_model, 1, "model 'sam-vit-hueg' not found"),
    "hub id without network": (_hub_id_offline, 1, "HF_HUB_OFFLINE=1 reads only the cache"),
    "run folder cannot be written": (_unwritable_run_folder, 1, "the run folder cannot be written"),
    "malformed point prompts": (_malformed_points, 1, "is not a list of [x, y, label] points"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line(
    case: str, shapes_root: Path, tmp_path: Path, run_cli, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # this machine has no network
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    build, code, message = CASES[case]
    extra = build(root)
    command = "predict" if case == "malformed point prompts" else "fit"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(command, "--config", QUICKSTART, "--data.class_path", "segtune.data.SegmentationDataModule",
                "--data.init_args.root", root, "--trainer.fast_dev_run", "1", *extra)  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err[-2000:]
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1]


def test_skippable_problems_are_logged_and_training_goes_on(
    shapes_root: Path, tmp_path: Path, run_cli, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)

    def break_annotations(data: dict) -> None:
        data["annotations"][0]["segmentation"] = []
        data["annotations"][1]["segmentation"] = [[1, 2, 3, 4]]
        data["annotations"][2]["segmentation"] = [[900, 900, 950, 900, 950, 950]]  # outside its image
        data["images"][1]["file_name"] = data["images"][1]["file_name"].upper()

    _edit_json(root, "train", break_annotations)
    with caplog.at_level(logging.INFO, logger="segtune"):
        run_cli("fit", "--config", QUICKSTART, "--data.init_args.root", root, "--trainer.fast_dev_run", "1")
    assert "empty segmentation" in caplog.text and "no polygon with 3 or more points" in caplog.text
    assert "differ from the files only in case" in caplog.text
    assert "1 annotations lie outside their image" in caplog.text


def test_an_evaluation_split_smaller_than_the_process_count_is_refused_in_one_line(shapes_root: Path) -> None:
    from types import SimpleNamespace

    from segtune.data.datamodule import SegmentationDataModule
    from segtune.models.presets import PRESETS

    dm = SegmentationDataModule(shapes_root, preprocessing=PRESETS["sam-tiny"].preprocessing)
    dm.setup("fit")
    images = len(dm.datasets["validate"])
    dm.trainer = SimpleNamespace(world_size=images + 1, global_rank=images)
    expected = rf"{shapes_root}: the validate split has {images} image\(s\) for {images + 1} processes"
    with pytest.raises(ValueError, match=expected):
        dm.val_dataloader()
    dm.trainer = SimpleNamespace(world_size=images, global_rank=images - 1)  # one each: fine
    assert len(list(dm.val_dataloader().sampler)) == 1
