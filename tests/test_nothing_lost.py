"""Nothing lost, nothing silent: damaged checkpoints, occupied output folders, prompts, masks and configs that
would train nothing. Each case ends in one line naming the file (or a logged warning), and leaves every file as
it was."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import CONFIGS

QUICKSTART = CONFIGS / "quickstart.yaml"
QUICKSTART_LORA = CONFIGS / "quickstart_lora.yaml"


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: its bytes and its modification time (ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def _exit_code(run_cli, *args: object) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    return exit_info.value.code


# --- lost: must never happen ------------------------------------------------------------------------
def test_resume_from_a_damaged_last_ckpt_changes_nothing(
    quickstart_checkpoint: Path, shapes_root: Path, run_cli, tmp_path: Path, capsys
) -> None:
    shutil.copytree(quickstart_checkpoint.parents[3], tmp_path / "runs")  # runs/quickstart_lora/version_0 of a real fit
    run = tmp_path / "runs/quickstart_lora/version_0"
    last = run / "checkpoints/last.ckpt"
    os.truncate(last, last.stat().st_size // 2)  # a killed copy
    before = _snapshot(tmp_path / "runs")
    assert "metrics.csv" in str(list(before)) and "config.yaml" in str(list(before))
    resume = ["fit", "--config", QUICKSTART_LORA, "--data.init_args.root", shapes_root, "--ckpt_path", "last"]
    assert _exit_code(run_cli, *resume) == 1
    err = _last_error(capsys)
    damaged = Path("runs/quickstart_lora/version_0/checkpoints/last.ckpt")
    assert err.startswith(f"segtune: error: {damaged}: not a readable")
    assert "Nothing was changed" in err and "best-" in err  # what else it can resume from
    assert _snapshot(tmp_path / "runs") == before  # every file as it was, no new version folder


def _damaged(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:600_000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    else:  # pickled objects beyond tensors and plain values
        checkpoint = torch.load(good, weights_only=True)
        checkpoint["planted"] = datetime.datetime(2026, 1, 1)
        torch.save(checkpoint, path)
    return path


DAMAGED = {
    # kind: (command, what the line must say)
    "truncated": ("test", "not a readable PyTorch checkpoint"),
    "empty": ("validate", "the checkpoint file is empty"),
    "text": ("predict", "not a readable PyTorch checkpoint"),
    "pickled": ("export", "holds pickled Python objects beyond tensors and plain values (Unsupported global"),
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_checkpoint_is_one_line_naming_it_before_any_run_folder(
    kind: str, quickstart_checkpoint: Path, shapes_root: Path, run_cli, tmp_path: Path, capsys
) -> None:
    command, message = DAMAGED[kind]
    ckpt = _damaged(kind, quickstart_checkpoint, tmp_path)
    if command == "export":
        args = ["export", "--ckpt_path", ckpt, "--output", tmp_path / "out"]
    else:
        args = [command, "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--ckpt_path", ckpt]
    assert _exit_code(run_cli, *args) == 1
    err = _last_error(capsys)
    assert err.startswith(f"segtune: error: {ckpt}: {message}"), err
    assert "\x1b[" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_export_refuses_a_folder_that_holds_files_and_overwrite_keeps_the_rest(
    quickstart_checkpoint: Path, run_cli, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "model"
    (out / "_adapter").mkdir(parents=True)
    (out / "_adapter" / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_text("the user's own model")
    before = _snapshot(out)
    export = ["export", "--ckpt_path", quickstart_checkpoint, "--output", out, "--merge"]
    assert _exit_code(run_cli, *export) == 1
    err = _last_error(capsys)
    assert err.startswith(f"segtune: error: {out}: the folder already holds 2 files") and "--overwrite" in err
    assert _snapshot(out) == before

    assert _exit_code(run_cli, *export, "--overwrite") == 0
    assert (out / "_adapter" / "notes.txt").read_text() == "mine"  # not the export's scratch space any more
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"][0]
    assert (out / "config.json").is_file() and (out / "preprocessor_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no scratch or old folder left beside it

    (tmp_path / "a_file").write_text("x")
    for output, message in (
        (tmp_path / "a_file", "is a file, not a folder"),
        (tmp_path / "a_file" / "sub", "is a file"),
    ):
        assert _exit_code(run_cli, "export", "--ckpt_path", quickstart_checkpoint, "--output", output) == 1
        assert message in _last_error(capsys)


def test_convert_refuses_an_existing_model_folder_and_names_export_for_a_segtune_checkpoint(
    quickstart_checkpoint: Path, run_cli, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    assert _exit_code(run_cli, "convert", "--checkpoint", tmp_path / "any.pth", "--output", out) == 1
    assert "the folder already holds 1 files" in _last_error(capsys)
    assert _snapshot(out) == before

    (tmp_path / "empty.pth").write_bytes(b"")
    assert _exit_code(run_cli, "convert", "--checkpoint", tmp_path / "empty.pth", "--output", tmp_path / "new") == 1
    assert _last_error(capsys).startswith(f"segtune: error: {tmp_path / 'empty.pth'}: the checkpoint file is empty")
    assert _exit_code(run_cli, "convert", "--checkpoint", quickstart_checkpoint, "--output", tmp_path / "new") == 1
    assert "a checkpoint written by segtune fit, not a native one: `segtune export" in _last_error(capsys)
    assert not (tmp_path / "new").exists()


def test_output_folder_is_all_old_or_all_new(tmp_path: Path) -> None:
    from segtune.files import output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "keep.txt").write_text("kept")
    with pytest.raises(OSError, match="disk full"), output_folder(out, overwrite=True) as scratch:
        (scratch / "a.txt").write_text("new a")
        raise OSError("disk full")  # a crash halfway
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "old a", "keep.txt": "kept"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with output_folder(out, overwrite=True) as scratch:
        (scratch / "a.txt").write_text("new a")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "new a", "keep.txt": "kept"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- silent: refused in one line, or a logged warning -------------------------------------------------
@pytest.fixture
def predict_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(folder / f"{name}.png")
    return folder


BAD_PROMPTS = {
    # case: (json text, what the error says)
    "NaN box": ('{"a": [[1, 2, NaN, 20]]}', "not a finite number"),
    "Infinity box": ('{"a": [[1, 2, Infinity, 20]]}', "not a finite number"),
    "negative box": ('{"a": [[-5, 2, 10, 20]]}', "negative coordinate"),
    "box outside": ('{"a": [[70, 2, 90, 20]]}', "lies outside the 60x40 image"),
    "point outside": ('{"a": [[10, 45, 1]]}', "lies outside the 60x40 image"),
    "negative point": ('{"a": [[-1, 5, 1]]}', "negative coordinate"),
    "NaN point": ('{"a": [[NaN, 5, 1]]}', "not a finite number"),
    "no key names an image": ('{"c.png": [[1, 2, 10, 20]]}', "none of its 1 entries names an image"),
}


@pytest.mark.parametrize("case", BAD_PROMPTS)
def test_predict_prompts_are_checked_against_the_images(case: str, predict_folder: Path, tmp_path: Path) -> None:
    from segtune.data.boxes import boxes_records, is_points_json, points_records
    from segtune.data.coco import read_json

    text, message = BAD_PROMPTS[case]
    path = tmp_path / "prompts.json"
    path.write_text(text)
    data = read_json(path)
    with pytest.raises(ValueError, match=message) as info:
        points_records(path, predict_folder, data) if is_points_json(data) else boxes_records(
            path, predict_folder, ["object"], data
        )
    assert str(info.value).startswith(str(path))


def test_prompt_keys_that_name_no_image_are_logged(predict_folder: Path, tmp_path: Path, caplog) -> None:
    from segtune.data.boxes import boxes_records

    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"a": [[1, 2, 10, 20]], "typo.png": [[1, 2, 10, 20]]}))
    with caplog.at_level(logging.WARNING, logger="segtune"):
        found = boxes_records(path, predict_folder, ["object"])
    assert [len(r.boxes) for r in found.records] == [1, 0]
    assert "1 entries name no image" in caplog.text and "'typo.png'" in caplog.text


def test_coco_annotations_that_would_decode_wrong_are_skipped_or_refused(tmp_path: Path, caplog) -> None:
    from pycocotools import mask as mask_utils

    from segtune.data.coco import coco_records, load_coco

    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "x.png")
    square = np.zeros((10, 12), np.uint8, order="F")
    square[2:6, 3:8] = 1
    good_rle = mask_utils.encode(square)
    good_rle["counts"] = good_rle["counts"].decode()
    bad_rle = dict(good_rle, counts=good_rle["counts"][:-2])  # runs no longer sum to 10 x 12
    polygon = [1, 1, 8, 1, 8, 8, 1, 8]
    anns = [
        {"id": 1, "image_id": 0, "category_id": 1, "segmentation": [polygon]},
        {"id": 2, "image_id": 0, "category_id": 1, "segmentation": [polygon + [4]]},  # odd coordinates
        {"id": 3, "image_id": 0, "category_id": 1, "segmentation": good_rle},
        {"id": 4, "image_id": 0, "category_id": 1, "segmentation": bad_rle},
        {"id": 5, "image_id": 0, "category_id": 1, "segmentation": {"size": [10, 12], "counts": [50, 10, 10]}},
        {"id": 6, "image_id": 0, "category_id": 9, "segmentation": [polygon]},  # no such category
    ]
    data = {
        "images": [{"id": 0, "file_name": "x.png", "height": 10, "width": 12}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "cell"}],
    }
    json_path = tmp_path / "annotations.json"
    with caplog.at_level(logging.WARNING, logger="segtune"):
        coco = load_coco(json_path, json.loads(json.dumps(data)))
        found = coco_records(coco, json_path, tmp_path, ["cell"])
    assert [a["id"] for a in found.records[0].annotations] == [1, 3]
    assert "annotation 2 skipped: a polygon has an odd number of coordinates (9)" in caplog.text
    assert "annotation 4 skipped: RLE counts sum to" in caplog.text and "annotation 5 skipped" in caplog.text
    assert "category ids [9] (annotation ids [6])" in caplog.text

    data["images"].append({"id": 0, "file_name": "y.png", "height": 10, "width": 12})
    with pytest.raises(ValueError, match=r"annotations.json: images x.png and y.png have the same id 0"):
        load_coco(json_path, data)


def test_colour_masks_are_refused_and_grey_rgb_masks_read(tmp_path: Path) -> None:
    from segtune.data.masks import MaskFormat, read_instances

    colour = np.zeros((20, 20, 3), np.uint8)
    colour[2:8, 2:8] = (90, 0, 0)  # dark red: below the threshold in every channel
    colour[10:16, 10:16] = (0, 90, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    for kind in ("binary", "index"):
        with pytest.raises(ValueError, match=r"colour.png: a colour mask \(72 coloured pixels\)"):
            read_instances(tmp_path / "colour.png", MaskFormat(kind=kind), (20, 20))
    grey = np.zeros((20, 20, 3), np.uint8)
    grey[2:8, 2:8] = 255
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=70)
    masks, _ = read_instances(tmp_path / "grey.jpg", MaskFormat(), (20, 20))
    assert len(masks) == 1 and abs(int(masks[0].sum()) - 36) <= 6


def test_a_split_whose_masks_are_all_empty_is_refused(tmp_path: Path) -> None:
    from segtune.data.datamodule import SegmentationDataModule
    from segtune.models.presets import PRESETS

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 80, np.uint8)).save(tmp_path / "images" / f"c{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "masks" / f"c{i}.png")
    dm = SegmentationDataModule(
        tmp_path, layout="masks", split_fractions=(0.5, 0.5, 0.0), preprocessing=PRESETS["sam-tiny"].preprocessing
    )
    with pytest.raises(ValueError, match=r"masks: every one of the 2 mask files of split 'train' is empty"):
        dm.setup("fit")


def test_a_file_name_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    from segtune.data.images import image_files

    name = os.fsdecode(b"caf\xe9.png")
    try:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not store non-UTF-8 names")
    with pytest.raises(ValueError, match=r"caf\\xe9.png: the file name is not valid UTF-8; rename the file"):
        image_files(tmp_path)


# --- configs that would train nothing, and messages that hid the real one --------------------------
CONFIG_CASES = {
    # case: (arguments, what the line must say)
    "max_instances 0": (["--data.init_args.prompts.max_instances", "0"], "prompts.max_instances must be >= 1"),
    "negative box_jitter": (["--data.init_args.prompts.box_jitter", "-0.1"], "prompts.box_jitter must be >= 0"),
    "max_epochs 0": (["--trainer.max_epochs", "0"], "trainer.max_epochs is 0: fit would train nothing"),
    "negative lr": (["--model.init_args.lr", "-1"], "model.init_args.lr must be > 0, got -1.0"),
    "window inside a union": (
        ["--data.init_args.intensity", '{"mode": "window", "window": [500, -100]}'],
        "data.init_args.intensity: mode 'window' needs window: [low, high] with high > low, got (500.0, -100.0)",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_configs_that_train_nothing_stop_naming_the_option(
    case: str, shapes_root: Path, run_cli, tmp_path: Path, capsys
) -> None:
    extra, message = CONFIG_CASES[case]
    code = _exit_code(run_cli, "fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, *extra)
    assert code == 1
    err = _last_error(capsys)
    assert err.startswith("segtune: error: ") and message in err, err
    assert not (tmp_path / "runs").exists()  # stopped before a run folder was made


def test_compare_checks_every_model_before_any_cell(tmp_path: Path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    from segtune.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # this machine has no network
    config = tmp_path / "compare.yaml"
    config.write_text(
        f"base_config: {QUICKSTART}\noutput: {tmp_path / 'cmp'}\nmodels: [sam-tiny, sam-tinny]\n"
        "methods:\n  lora:\n    class_path: segtune.methods.LoRA\n"
    )
    for dry in (["--dry-run"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", "--config", str(config), *dry])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"segtune: error: {config}: models:")
        assert "sam-tinny" in err
        assert not (tmp_path / "cmp").exists()  # no cell trained
