"""Using a fine-tuned model: predict without prompts (automatic masks), point prompts, ONNX export and
docs/using.md's onnxruntime example, W&B logging in offline mode."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from segtune.amg import AutoMaskConfig, AutoMaskGenerator, crop_boxes, mask_nms
from segtune.models.embedding_cache import embedding_inputs, encode_images
from segtune.models.loading import load_model
from segtune.preprocessing import preprocess_image
from tests.conftest import CONFIGS, ROOT

QUICKSTART = CONFIGS / "quickstart.yaml"
USING = (ROOT / "docs" / "using.md").read_text()  # "Using your model", linked from the README
# no threshold: a random tiny model predicts IoUs near 0.5 and unstable masks
LOOSE = ["--model.init_args.amg.pred_iou_thresh", "-1", "--model.init_args.amg.stability_score_thresh", "-1",
         "--model.init_args.amg.points_per_side", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(quickstart_checkpoint: Path) -> Path:
    return quickstart_checkpoint


def _load_results(gt: Path, predictions: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt)).loadRes(str(predictions))


# --- automatic mask generation ---------------------------------------------------------------------
def test_predict_without_prompts_writes_automatic_masks(run_cli, shapes_root: Path) -> None:
    # the random tiny model (no checkpoint): a two-step fit predicts only empty masks, which are dropped;
    # tests/test_quickstart.py checks what a trained model finds
    cwd = run_cli(
        "predict", "--config", QUICKSTART, "--data.init_args.root", shapes_root,
        "--data.init_args.predict_images", shapes_root / "test", *LOOSE,
    )  # fmt: skip
    out = cwd / "runs/quickstart/version_0/predictions"
    gt = json.loads((shapes_root / "test" / "_annotations.coco.json").read_text())
    results = json.loads((out / "predictions.json").read_text())
    per_image = {image["id"]: [r for r in results if r["image_id"] == image["id"]] for image in gt["images"]}
    # a 4 x 4 grid with nothing filtered: far more masks than prompted prediction's one per object
    assert sum(len(r) for r in per_image.values()) > len(gt["annotations"])
    assert {r["category_id"] for r in results} == {0}  # class-agnostic
    assert all(r["area"] > 0 and "score" in r for r in results)
    for image in gt["images"]:
        stem = Path(image["file_name"]).stem
        mask = cv2.imread(str(out / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (image["height"], image["width"])
        assert 1 <= mask.max() <= len(per_image[image["id"]])  # instance i + 1 (one may hide under better ones)
        assert (out / "overlays" / f"{stem}.jpg").is_file()
    assert len(_load_results(shapes_root / "test" / "_annotations.coco.json", out / "predictions.json").anns)


@pytest.mark.parametrize("name", ["sam-tiny", "sam2-tiny"])
def test_automatic_masks_filter_deduplicate_and_crop(name: str) -> None:
    model, pre, _ = load_model(name)
    model.eval()
    image = np.zeros((96, 128, 3), np.uint8)
    image[20:70, 30:90] = 200
    pixels, resized = preprocess_image(image, pre)
    everything = AutoMaskConfig(points_per_side=4, pred_iou_thresh=-1, stability_score_thresh=-1, mask_nms_thresh=1)
    found = AutoMaskGenerator(model, pre, everything, multimask_output=False)(pixels, resized, (96, 128))
    assert found.masks.shape[1:] == (96, 128) and found.masks.dtype == torch.bool
    assert len(found.masks) <= 16 and torch.all(found.scores[:-1] >= found.scores[1:])  # best first
    assert found.masks.flatten(1).any(1).all()  # empty masks are dropped
    # batching the points changes nothing
    batched = AutoMaskGenerator(model, pre, AutoMaskConfig(**{**vars(everything), "points_per_batch": 3}), False)
    again = batched(pixels, resized, (96, 128))
    assert torch.equal(again.masks, found.masks)
    # NMS removes duplicates: at 0.0 no two kept masks overlap at all
    strict = AutoMaskGenerator(model, pre, AutoMaskConfig(**{**vars(everything), "mask_nms_thresh": 0.0}), False)
    kept = strict(pixels, resized, (96, 128)).masks.float().flatten(1)
    assert len(kept) <= len(found.masks) and torch.all(torch.triu(kept @ kept.T, diagonal=1) == 0)
    # thresholds no mask can pass leave an image without masks, not an error
    none = AutoMaskGenerator(model, pre, AutoMaskConfig(points_per_side=2, pred_iou_thresh=2.0), False)
    assert none(pixels, resized, (96, 128)).masks.shape == (0, 96, 128)
    # crops: run on the original pixels of 1 + 4 crops, and need them
    crops = AutoMaskConfig(**{**vars(everything), "crop_n_layers": 1, "points_per_side": 2})
    cropped = AutoMaskGenerator(model, pre, crops, False)(pixels, resized, (96, 128), image)
    assert cropped.masks.shape[1:] == (96, 128)
    with pytest.raises(ValueError, match="needs the original image"):
        AutoMaskGenerator(model, pre, crops, False)(pixels, resized, (96, 128))


def test_crop_boxes_cover_the_image_with_overlap() -> None:
    boxes = crop_boxes(300, 400, 2, 512 / 1500)
    assert boxes[0] == (0, 0, 400, 300, 0) and len(boxes) == 1 + 4 + 16
    for layer in (1, 2):
        covered = np.zeros((300, 400), int)
        for x0, y0, x1, y1, level in boxes:
            if level == layer:
                covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1 and covered.max() > 1  # every pixel in a crop, neighbours overlap


def test_mask_nms_keeps_the_best_of_overlapping_masks() -> None:
    from pycocotools import mask as mask_utils

    masks = np.zeros((20, 20, 3), np.uint8, order="F")
    masks[2:10, 2:10, 0] = 1
    masks[2:10, 2:11, 1] = 1  # nearly the same as mask 0
    masks[12:18, 12:18, 2] = 1
    rles = mask_utils.encode(masks)
    assert mask_nms(rles, np.array([0.5, 0.9, 0.1]), 0.7) == [1, 2]
    assert mask_nms(rles, np.array([0.5, 0.9, 0.1]), 0.95) == [1, 0, 2]


# --- point prompts ---------------------------------------------------------------------------------
def test_predict_with_point_prompts(run_cli, checkpoint: Path, shapes_root: Path, tmp_path: Path) -> None:
    gt = json.loads((shapes_root / "test" / "_annotations.coco.json").read_text())
    first, second = gt["images"][:2]
    centres = [
        [a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2]
        for a in gt["annotations"]
        if a["image_id"] == first["id"]
    ]
    points = {
        first["file_name"]: [[[x, y, 1]] for x, y in centres],  # one object per point
        Path(second["file_name"]).stem: [[5, 5, 0], [60, 60, 1], [70, 70, 1]],  # one object, a negative point
    }
    (tmp_path / "points.json").write_text(json.dumps(points))
    cwd = run_cli(
        "predict", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--ckpt_path", checkpoint,
        "--data.init_args.predict_images", shapes_root / "test", "--data.init_args.predict_prompts",
        tmp_path / "points.json",
    )  # fmt: skip
    results = json.loads((cwd / "runs/quickstart/version_0/predictions/predictions.json").read_text())
    counts = {image["id"]: sum(r["image_id"] == image["id"] for r in results) for image in gt["images"]}
    assert counts[first["id"]] == len(centres) and counts[second["id"]] == 1
    assert sum(counts.values()) == len(centres) + 1  # images the json does not name get no prompt
    assert {r["category_id"] for r in results} == {1}  # point prompts carry no class: the first


def test_point_prompts_reach_the_model_as_points(shapes_root: Path, tmp_path: Path) -> None:
    from segtune.data.datamodule import SegmentationDataModule

    _, pre, _ = load_model("sam-tiny")
    test = shapes_root / "test"
    names = sorted(p.name for p in test.glob("*.jpg"))
    (tmp_path / "points.json").write_text(json.dumps({names[0]: [[[10, 20, 1]], [[30, 40, 1], [35, 45, 0]]]}))
    dm = SegmentationDataModule(
        shapes_root, predict_images=test, predict_prompts=tmp_path / "points.json", batch_size=2, preprocessing=pre
    )
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert "input_boxes" not in batch
    assert batch["input_points"].shape == (2, 2, 2, 2)  # 2 images, 2 objects, 2 points (padded)
    assert batch["input_labels"][0].tolist() == [[1, -10], [1, 0]]
    assert batch["prompt_valid"].tolist() == [[True, True], [False, False]]
    scale = pre.resized_shape(240, 320)[1] / 320
    assert batch["input_points"][0, 1, 1].tolist() == pytest.approx([35 * scale, 45 * scale])


# --- ONNX ------------------------------------------------------------------------------------------
def _check_onnx(folder: Path, model: torch.nn.Module, size: int) -> None:
    """onnxruntime on CPU against the PyTorch model: embeddings, then IoU scores and mask logits for
    boxes and points, each graph fed the same inputs as PyTorch."""
    import onnxruntime as ort

    spec = json.loads((folder / "onnx_model.json").read_text())
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    encoder = ort.InferenceSession(str(folder / spec["image_encoder"]["file"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in encoder.get_outputs()]
    assert names == list(spec["image_encoder"]["outputs"])
    ours = encoder.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        inputs = embedding_inputs(model, encode_images(model, pixels))
    flat = [t for v in inputs.values() for t in (v if isinstance(v, list) else [v])]
    for a, b in zip(ours, flat, strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=0)
    prompts = {
        "boxes": {"input_boxes": torch.tensor([[[5.0, 5.0, 100.0, 120.0], [50.0, 60.0, 200.0, 220.0]]])},
        "points": {
            "input_points": torch.tensor([[[[30.0, 40.0], [100.0, 100.0]], [[150.0, 150.0], [0.0, 0.0]]]]),
            "input_labels": torch.tensor([[[1, 0], [1, -10]]]),
        },
    }
    multimask = spec["multimask_output"]
    for kind, prompt in prompts.items():
        decoder = ort.InferenceSession(str(folder / spec["decoders"][kind]["file"]), providers=["CPUExecutionProvider"])
        feeds = {
            **dict(zip(names, [t.numpy() for t in flat], strict=True)),
            **{k: v.numpy() for k, v in prompt.items()},
        }
        iou, logits = decoder.run(None, feeds)
        with torch.no_grad():
            ref = model(**inputs, **prompt, multimask_output=multimask)
        np.testing.assert_allclose(iou, ref.iou_scores.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, ref.pred_masks.numpy(), atol=1e-4, rtol=0)


def test_export_onnx_from_the_cli(run_cli, checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from segtune.export import _merged
    from segtune.methods.base import load_method

    with pytest.raises(SystemExit) as exit_info:
        run_cli("export", "--ckpt_path", checkpoint, "--output", "onnx", "--onnx")
    assert exit_info.value.code == 0
    folder = tmp_path / "onnx"
    assert {p.name for p in folder.iterdir()} == {
        "image_encoder.onnx", "decoder_boxes.onnx", "decoder_points.onnx", "onnx_model.json",
    }  # fmt: skip
    spec = json.loads((folder / "onnx_model.json").read_text())
    assert spec["preprocessing"]["image_size"] == 256 and spec["preprocessing"]["resize"] == "longest"
    assert spec["decoders"]["points"]["inputs"]["input_points"] == [1, "N", "P", 2]
    module = load_method(checkpoint)
    merged = _merged(module).eval()
    # the merged LoRA changes the model: an export of the base would not match
    with torch.no_grad():
        base = load_model("sam-tiny")[0].eval()
        x = torch.randn(1, 3, 256, 256)
        assert not torch.allclose(base.get_image_embeddings(x), merged.get_image_embeddings(x), atol=1e-4)
    _check_onnx(folder, merged, 256)


@pytest.mark.parametrize("name", ["sam2-tiny", "samhq-tiny", "sam3tracker-tiny"])
@pytest.mark.parametrize("multimask", [False, True], ids=["1mask", "3masks"])
def test_onnx_matches_pytorch_for_each_family(name: str, multimask: bool, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from segtune.onnx_export import export_onnx

    if name != "sam2-tiny" and not multimask:
        pytest.skip("one setting per family beyond SAM2 keeps the suite short")
    model, pre, _ = load_model(name)
    export_onnx(model, pre, tmp_path, multimask_output=multimask)
    _check_onnx(tmp_path, model.eval(), pre.image_size)


def test_readme_onnxruntime_example_runs(run_cli, checkpoint: Path, shapes_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from segtune.methods.base import load_method
    from segtune.postprocess import logits_to_original

    (snippet,) = re.findall(r"```python\n(.*?)```", USING, flags=re.S)
    code = [ln for ln in snippet.splitlines() if ln.strip() and not ln.startswith(("import ", "from "))]
    assert len(code) <= 16  # "about 15 lines"
    with pytest.raises(SystemExit):
        run_cli("export", "--ckpt_path", checkpoint, "--output", "exported/onnx", "--onnx")
    image = next((shapes_root / "test").glob("*.jpg"))
    shutil.copy(image, tmp_path / "image.jpg")
    scope: dict = {}
    exec(compile(snippet, "docs/using.md", "exec"), scope)  # noqa: S102  (the page's own example, run as written)
    mask, box = scope["mask"], scope["box"]
    assert mask.shape == cv2.imread(str(image)).shape[:2] and mask.dtype == bool
    # the same box through the PyTorch model and segtune's post-processing gives the same mask
    module = load_method(checkpoint)
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    pixels, resized = preprocess_image(rgb, module.preprocessing)
    with torch.no_grad():
        out = module.model(pixel_values=pixels[None], input_boxes=torch.tensor(box, dtype=torch.float32),
                           multimask_output=False)  # fmt: skip
    ref = logits_to_original(out.pred_masks[0, :, 0], module.preprocessing, resized, rgb.shape[:2])[0] > 0
    assert (torch.from_numpy(mask) == ref).float().mean() > 0.999


# --- W&B ---------------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-*.wandb`` file: a 7-byte W&B header, then LevelDB-log
    blocks of 32 KiB whose chunks (7-byte header: crc, length, type) hold protobuf ``Record``s.
    wandb 0.31 keeps config, history and summary of an offline run only there."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_run_has_metrics_config_and_pictures(
    run_cli, shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_cli(
        "fit", "--config", QUICKSTART, "--config", CONFIGS / "wandb.yaml", "--data.init_args.root", shapes_root,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks+=segtune.callbacks.ValidationImages", "--trainer.callbacks.every_n_epochs=1",
    )  # fmt: skip
    wandb.finish()
    (run,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")  # the config's save_dir
    for _ in range(60):  # wandb's core process may still be writing the run's last records
        records = _wandb_records(next(run.glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            logged.update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    assert 0 <= logged["val_dice"] <= 1 and "train_loss" in logged and "val_box_dice" in logged  # metrics
    assert logged["val_images/_type"] == "images/separated"  # the validation grid...
    assert list((run / "files" / "media" / "images").glob("val_images_*.png"))  # ...and its file
    config = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
    resolved = config["config"]  # the whole resolved config, not only the model's arguments
    assert resolved["model"]["class_path"] == "segtune.methods.FullFinetune"
    assert resolved["data"]["class_path"] == "segtune.data.SyntheticShapesDataModule"
    assert resolved["trainer"]["max_epochs"] == 1 and resolved["trainer"]["logger"]["init_args"]["project"] == "segtune"
    # segtune's own files land in the run's folder, beside its checkpoints
    (folder,) = (tmp_path / "runs" / "segtune").iterdir()
    assert (folder / "val_images" / "epoch_000.png").is_file() and list((folder / "checkpoints").glob("*.ckpt"))
