"""Embedding cache: same losses as without it, each image encoded once, keys that change with every input,
atomic disk files, and a one-line refusal next to augmentations."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import segtune.data.dataset
import segtune.data.records
from segtune.data.intensity import IntensityPolicy
from segtune.models.embedding_cache import (
    EmbeddingCache,
    cache_key,
    embedding_inputs,
    encode_images,
    weights_fingerprint,
)
from segtune.models.loading import load_model
from segtune.preprocessing import Preprocessing
from tests.conftest import CONFIGS, ROOT

QUICKSTART = CONFIGS / "quickstart.yaml"
ENCODERS = {"SamVisionEncoder", "SamHQVisionEncoder", "Sam2VisionModel", "Sam3VisionModel"}
FROZEN_ENCODER = ["--model.class_path", "segtune.methods.FullFinetune",
                  "--model.init_args.train_parts", "[prompt_encoder, mask_decoder]"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny models on a shared 2-core machine: a second intra-op thread only waits for the first
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def count_encoded_images() -> Iterator[list[int]]:
    """Images that went through any SAM-family image encoder inside the block (a global forward hook)."""
    seen = [0]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if type(module).__name__ in ENCODERS:
            seen[0] += len(args[0] if args else kwargs["pixel_values"])

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _fit(run_cli, root: Path, name: str, *extra: str) -> Path:
    run_cli(
        "fit", "--config", QUICKSTART, "--data.class_path", "segtune.data.SegmentationDataModule",
        "--data.init_args.root", root, "--data.init_args.batch_size", "8", *FROZEN_ENCODER,
        "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.name", name,
        "--data.init_args.cache_images", "0",  # the quickstart keeps decoded images: here every decode counts
        *extra,
    )  # fmt: skip
    return Path("runs") / name / "version_0" / "metrics.csv"


def _untuned(metrics: Path) -> list[float]:
    with open(metrics) as f:
        return [float(r["untuned_val_dice"]) for r in csv.DictReader(f) if r.get("untuned_val_dice")]


def _losses(metrics: Path) -> dict[tuple[str, str], float]:
    """Losses and validation scores (Dice, box floor) by step."""
    keys = ("train_loss", "val_loss", "val_dice", "val_box_dice")
    with open(metrics) as f:
        return {(r["step"], k): float(r[k]) for r in csv.DictReader(f) for k in keys if r.get(k)}


@contextmanager
def count_decoded_images(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Images the dataset decoded and turned into pixel_values inside the block (num_workers 0)."""
    seen = [0, 0]
    read, preprocess = segtune.data.records.read_image, segtune.data.dataset.normalise_image

    def counting_read(path: Path):
        seen[0] += 1
        return read(path)

    def counting_preprocess(image, pre):
        seen[1] += 1
        return preprocess(image, pre)

    with monkeypatch.context() as patch:
        patch.setattr(segtune.data.records, "read_image", counting_read)
        patch.setattr(segtune.data.dataset, "normalise_image", counting_preprocess)
        yield seen


# --- through the CLI ---------------------------------------------------------------------------------
def test_cached_fit_has_the_same_losses_and_encodes_each_image_once(
    run_cli, shapes_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 train + 4 validation images, 2 epochs, and the untuned model's validation pass before the first step
    # (segtune.untuned): 28 encoder passes without the cache, 12 with it, the untuned pass filling the cache
    # the first validation epoch reads (the encoder is frozen, so those embeddings are still valid; Sam2's
    # path through the cache is checked, bit for bit, by test_cached_encoder_output_gives_the_same_...).
    # A cached image is not decoded either: 28 decodes without the cache, 12 with it, none when a disk
    # cache already holds every image. The quickstart's box_jitter stays on: prompt jitter is allowed.
    encoded, decoded, losses, untuned = {}, {}, {}, {}
    for mode in ("off", "memory", "disk", "disk-again"):
        with count_encoded_images() as seen, count_decoded_images(monkeypatch) as read:
            metrics = _fit(run_cli, shapes_root, mode, "--model.init_args.embedding_cache", mode.removesuffix("-again"))
        encoded[mode], decoded[mode], losses[mode] = seen[0], tuple(read), _losses(metrics)
        untuned[mode] = _untuned(metrics)
    assert encoded == {"off": 28, "memory": 12, "disk": 12, "disk-again": 0}
    assert decoded == {"off": (28, 28), "memory": (12, 12), "disk": (12, 12), "disk-again": (0, 0)}
    assert len(untuned["off"]) == 1
    assert all(u == pytest.approx(untuned["off"], abs=1e-6) for u in untuned.values()), untuned
    assert len(losses["off"]) == 2 + 2 * 3  # 1 step and 1 validation (loss, Dice, box floor) per epoch
    for mode in ("memory", "disk", "disk-again"):
        assert losses[mode].keys() == losses["off"].keys()
        for k, v in losses["off"].items():
            assert losses[mode][k] == pytest.approx(v, abs=1e-6), (mode, k)
    files = list(Path("runs/embedding_cache").iterdir())
    assert len(files) == 12 and all(f.suffix == ".safetensors" for f in files)  # no temporary file left


def test_disk_cache_recomputes_a_touched_image_and_everything_after_an_intensity_change(
    run_cli, shapes_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    args = ("--model.init_args.embedding_cache", "disk", "--trainer.max_epochs", "1")
    with count_encoded_images() as first:
        _fit(run_cli, root, "first", *args)
    image = next((root / "train").glob("*.jpg"))
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with count_encoded_images() as touched:
        _fit(run_cli, root, "touched", *args)
    with count_encoded_images() as minmax:
        _fit(run_cli, root, "minmax", *args, "--data.init_args.intensity.mode", "minmax")
    assert (first[0], touched[0], minmax[0]) == (12, 1, 12)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.init_args.augmentations", "[{class_path: albumentations.HorizontalFlip}]"],
         "embedding_cache needs identical images every epoch: remove data.init_args.augmentations or set "
         "model.init_args.embedding_cache: off"),
        (["--model.init_args.train_parts", "[vision_encoder, mask_decoder]"],
         "embedding_cache: memory needs a frozen image encoder: remove vision_encoder from "
         "model.init_args.train_parts"),
    ],
    ids=["augmentation", "trained encoder"],
)  # fmt: skip
def test_cache_is_refused_in_one_line(
    extra: list[str], message: str, run_cli, shapes_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, *FROZEN_ENCODER,
                "--model.init_args.embedding_cache", "memory", "--trainer.fast_dev_run", "1", *extra)  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("segtune: error: ") and message in last


def test_decoder_only_trains_from_the_cache_and_refuses_the_encoder() -> None:
    from segtune.methods import DecoderOnly

    module = DecoderOnly("sam-tiny")
    module.configure_model()
    assert module.embedding_cache_mode == "memory"
    assert not any(p.requires_grad for p in module.model.vision_encoder.parameters())
    assert all(p.requires_grad for p in module.model.mask_decoder.parameters())
    assert not any(p.requires_grad for p in module.model.prompt_encoder.parameters())
    with pytest.raises(ValueError, match="DecoderOnly keeps the image encoder frozen"):
        DecoderOnly("sam-tiny", train_parts=["vision_encoder", "mask_decoder"]).configure_model()


def test_decoder_only_checkpoints_hold_the_decoder_and_load_back(run_cli, shapes_root: Path) -> None:
    # the frozen encoder was written into every checkpoint (the ViT-B epoch benchmark: 19% of a cached
    # epoch); it is rebuilt from `model` instead, as LoRA's frozen base is
    from segtune.methods import DecoderOnly
    from segtune.methods.base import load_method

    _fit(run_cli, shapes_root, "decoder", "--model.class_path", "segtune.methods.DecoderOnly",
         "--model.init_args.model", "sam-tiny", "--model.init_args.train_parts", "[mask_decoder]",
         "--model.init_args.lr", "0.01", "--trainer.max_epochs", "1")  # fmt: skip
    ckpt = Path("runs/decoder/version_0/checkpoints/last.ckpt")  # trained weights (best may be the untuned)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and all(k.startswith("model.mask_decoder.") for k in saved), sorted(saved)[:3]
    loaded = load_method(ckpt)
    fresh = DecoderOnly("sam-tiny")
    fresh.configure_model()
    for name, value in loaded.state_dict().items():
        if name in saved:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
        else:  # the encoder and prompt encoder: the pretrained ones
            torch.testing.assert_close(value, fresh.state_dict()[name], rtol=0, atol=0)
    # and the decoder did train (lr 0.01): the checkpoint is not the pretrained decoder
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in saved.items())
    run_cli("test", "--config", QUICKSTART, "--data.class_path", "segtune.data.SegmentationDataModule",
            "--data.init_args.root", shapes_root, "--model.class_path", "segtune.methods.DecoderOnly",
            "--model.init_args.model", "sam-tiny", "--ckpt_path", ckpt)  # fmt: skip


def test_module_keys_follow_the_encoder_weights_and_the_preprocessing(shapes_root: Path) -> None:
    from dataclasses import replace

    from segtune.methods import DecoderOnly

    module = DecoderOnly("sam-tiny")
    module.configure_model()
    paths = [str(next((shapes_root / "train").glob("*.jpg")))]
    base = module._cache_keys(paths)
    assert module._cache_keys(paths) == base
    module.preprocessing = replace(module.preprocessing, image_mean=(0.0, 0.0, 0.0))
    other_preprocessing = module._cache_keys(paths)
    with torch.no_grad():
        next(module.model.vision_encoder.parameters()).view(-1)[0] += 1e-3
    module._fingerprint = None  # what setup does before each stage
    other_weights = module._cache_keys(paths)
    assert len({*base, *other_preprocessing, *other_weights}) == 3


# --- the pieces --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sam-tiny", "samhq-tiny", "sam2-tiny", "sam3tracker-tiny"])
def test_cached_encoder_output_gives_the_same_outputs_and_gradients(name: str) -> None:
    model, pre, _ = load_model(name)
    for part, child in model.named_children():
        child.requires_grad_(part != "vision_encoder")
    pixels = torch.randn(2, 3, pre.image_size, pre.image_size, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[20.0, 30.0, 150.0, 120.0]]] * 2)
    direct = model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
    with torch.no_grad():
        encoded = encode_images(model, pixels)
    cached = model(input_boxes=boxes, multimask_output=False, **embedding_inputs(model, encoded))
    assert torch.equal(direct.pred_masks, cached.pred_masks) and torch.equal(direct.iou_scores, cached.iou_scores)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [
        torch.autograd.grad(out.pred_masks.square().sum(), trainable, allow_unused=True) for out in (direct, cached)
    ]
    # Sam2's conv_s0/conv_s1 and no_memory_embedding train: the cache must not bake them in
    assert sum(g is not None for g in grads[0]) == sum(g is not None for g in grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_fingerprint_follows_every_parameter_and_buffer() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = weights_fingerprint(encoder)
    assert weights_fingerprint(encoder) == before
    with torch.no_grad():
        encoder[0].weight[0, 0, 0, 0] += 1e-6
    after_weight = weights_fingerprint(encoder)
    encoder[1].running_mean[0] += 1e-6
    after_buffer = weights_fingerprint(encoder)
    assert len({before, after_weight, after_buffer}) == 3


def test_key_changes_with_preprocessing_intensity_and_the_file(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x" * 100)
    pre, intensity = repr(Preprocessing(1024)), repr(IntensityPolicy())

    def key(**changed: str) -> str:
        parts = {"fingerprint": "f", "preprocessing_repr": pre, "intensity_repr": intensity, "image_path": image}
        return cache_key(**{**parts, **changed})

    base = key()
    assert key() == base  # stable
    variants = {
        "weights": key(fingerprint="g"),
        "preprocessing": key(preprocessing_repr=repr(Preprocessing(1024, "square"))),
        "intensity": key(intensity_repr=repr(IntensityPolicy("minmax"))),
    }
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    variants["touched"] = key()
    # another file of the same size moved over it, with the old modification time: a new inode
    other = tmp_path / "b.jpg"
    other.write_bytes(b"y" * 100)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, image)
    variants["replaced"] = key()
    image.write_bytes(b"x" * 101)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    variants["resized"] = key()
    assert len({base, *variants.values()}) == 1 + len(variants), variants


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("levels", [1, 2], ids=["tensor", "list"])
def test_cache_computes_only_the_missing_images(mode: str, levels: int, tmp_path: Path) -> None:
    calls: list[int] = []

    def compute(pixels: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        calls.append(len(pixels))
        out = [pixels.mean(1) * (i + 1) for i in range(levels)]
        return out[0] if levels == 1 else out

    pixels = torch.randn(3, 3, 8, 8)
    cache = EmbeddingCache(mode, tmp_path / "cache")
    first = cache.get_or_compute(["a", "b"], pixels[:2], compute)
    mixed = cache.get_or_compute(["a", "c", "b"], pixels[[0, 2, 1]], compute)  # only "c" is new
    assert calls == [2, 1] and (cache.hits, cache.misses) == (2, 3)
    cache.get_or_compute(["once"], pixels[:1], compute, store=False)  # a single pass (test, predict)
    assert len(cache) == 3
    cache.get_or_compute(["once"], pixels[:1], compute, store=False)
    assert calls[-2:] == [1, 1]  # not kept: computed again
    expected = compute(pixels[[0, 2, 1]])
    if levels == 1:
        assert isinstance(first, torch.Tensor) and isinstance(mixed, torch.Tensor)
        first, mixed, expected = [first], [mixed], [expected]
    for a, b, e in zip(first, mixed, expected, strict=True):
        assert torch.equal(b, e) and torch.equal(a, e[[0, 2]])
    # a new instance (a later run, another process) reads the files: nothing to compute
    if mode == "disk":
        calls.clear()
        again = EmbeddingCache("disk", tmp_path / "cache").get_or_compute(["c", "a"], pixels[[2, 0]], compute)
        assert calls == [] and isinstance(again, torch.Tensor) == (levels == 1)
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{k}.safetensors" for k in "abc"]


def test_disk_file_cut_short_is_computed_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache("disk", tmp_path)
    pixels = torch.randn(1, 3, 4, 4)
    cache.get_or_compute(["k"], pixels, lambda p: p * 2)
    cache.path("k").write_bytes(cache.path("k").read_bytes()[:20])  # as a crash mid-copy would leave it
    out = cache.get_or_compute(["k"], pixels, lambda p: p * 2)
    assert torch.equal(out, pixels * 2) and "unreadable embedding cache file" in caplog.text
    assert torch.equal(EmbeddingCache("disk", tmp_path).get_or_compute(["k"], pixels, lambda p: p * 0), pixels * 2)


def test_disk_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a write that fails before the rename leaves neither a partial file under the key's name nor a temporary file
    cache = EmbeddingCache("disk", tmp_path)

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        cache.get_or_compute(["k"], torch.randn(1, 3, 4, 4), lambda p: p)
    assert list(tmp_path.iterdir()) == []


def test_cache_module_is_pure_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, segtune.models.embedding_cache; "
        "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'segtune.data'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, not whichever segtune is installed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, env=env)
    assert out.stdout.strip() == "[]"


def test_cached_rows_join_computed_rows_on_the_batch_device() -> None:
    # "meta" stands in for an accelerator: cached rows live on the CPU, fresh rows where the batch is
    cache = EmbeddingCache("memory")
    cache.get_or_compute(["a"], torch.randn(1, 3, 4, 4), lambda p: p * 2)
    out = cache.get_or_compute(["a", "b"], torch.randn(2, 3, 4, 4, device="meta"), lambda p: p * 2, store=False)
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 4)


# --- cache hits skip the images ------------------------------------------------------------------------
def _dataset(root: Path, stage: str, **kwargs):
    from segtune.data import SegmentationDataModule

    dm = SegmentationDataModule(root, preprocessing=Preprocessing(256, "longest", 64), **kwargs)
    dm.setup(stage)
    return dm, dm.datasets[stage]


@pytest.mark.parametrize("split", ["coco", "masks"])
def test_a_marked_image_is_not_decoded_and_its_sample_is_otherwise_the_same(
    split: str, shapes_root: Path, masks_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # COCO knows the size from its json; the mask folder only from the image file's header
    _, dataset = _dataset(shapes_root, "validate") if split == "coco" else _dataset(masks_root, "fit")
    torch.manual_seed(0)  # training samples jitter their boxes with torch's generator
    full = dataset[0]
    dataset.mark_encoded([full["image_path"]])
    with count_decoded_images(monkeypatch) as read:
        torch.manual_seed(0)
        skipped, other = dataset[0], dataset[1]
    assert read == [1, 1]  # only the unmarked image
    assert "pixel_values" not in skipped and "pixel_values" in other
    assert skipped.keys() == full.keys() - {"pixel_values"}
    for k, v in skipped.items():
        assert torch.equal(v, full[k]) if isinstance(v, torch.Tensor) else v == full[k], k
    dataset.clear_encoded()
    assert "pixel_values" in dataset[0]


def test_persistent_workers_see_images_marked_after_they_started(shapes_root: Path) -> None:
    from segtune.data.batch import collate

    _, dataset = _dataset(shapes_root, "validate")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True,
                                         collate_fn=collate)  # fmt: skip
    first = list(loader)
    assert all("pixel_values" in b and "pixels_skipped" not in b for b in first)
    dataset.mark_encoded(first[0]["image_paths"] + first[1]["image_paths"][:1])
    second = list(loader)
    assert "pixel_values" not in second[0] and second[0]["pixels_skipped"].tolist() == [True, True]
    # a batch mixing both: zero rows where the image was skipped, the others as decoded
    assert second[1]["pixels_skipped"].tolist() == [True, False]
    assert not second[1]["pixel_values"][0].any()
    assert torch.equal(second[1]["pixel_values"][1], first[1]["pixel_values"][1])


def test_a_skipped_image_missing_from_the_cache_is_decoded_in_the_step(shapes_root: Path) -> None:
    # the image was not decoded by the DataLoader, then its cache entry vanished: the step decodes it
    from segtune.data.batch import collate
    from segtune.methods import DecoderOnly

    module = DecoderOnly("sam-tiny")
    module.configure_model()
    module.setup("fit")
    module.embedding_cache = EmbeddingCache("memory")
    _, dataset = _dataset(shapes_root, "validate")
    dataset.pre = module.preprocessing
    decoded = collate([dataset[0], dataset[1]])
    dataset.mark_encoded(decoded["image_paths"][:1])
    mixed = collate([dataset[0], dataset[1]])
    with torch.no_grad():
        expected = module(decoded)
        module.embedding_cache.clear()
        got = module(mixed)
    assert module.embedding_cache.misses == 4  # both images computed, twice
    assert torch.equal(got.pred_masks, expected.pred_masks)


def test_the_untuned_model_beside_a_cached_test_scores_real_pixels(run_cli, shapes_root: Path) -> None:
    # A second `segtune test` on a disk cache skips decoding every test image: the untuned model beside the
    # checkpoint (TestReport untuned=true) had no cache and got the batch's zero padding for them (an error when
    # a whole batch was skipped, silently wrong scores when part of it was). It shares the cache now.
    import json

    _fit(run_cli, shapes_root, "cached", "--model.class_path", "segtune.methods.DecoderOnly",
         "--model.init_args.train_parts", "[mask_decoder]", "--model.init_args.embedding_cache", "disk",
         "--trainer.max_epochs", "1")  # fmt: skip
    ckpt = sorted(Path("runs/cached/version_0/checkpoints").glob("best-*.ckpt"))[-1]
    untuned = []
    for cache in ("disk", "disk", "off"):  # the second run finds every test image in the cache
        run_cli("test", "--config", QUICKSTART, "--data.class_path", "segtune.data.SegmentationDataModule",
                "--data.init_args.root", shapes_root, "--data.init_args.batch_size", "2",
                "--data.init_args.cache_images", "0", "--model.class_path", "segtune.methods.DecoderOnly",
                "--model.init_args.embedding_cache", cache, "--trainer.logger.init_args.name", "cached",
                "--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.untuned=true",
                "--trainer.callbacks.picture=false", "--ckpt_path", ckpt)  # fmt: skip
        report = sorted(Path("runs/cached").glob("version_*/test_metrics.json"), key=lambda p: p.stat().st_mtime)[-1]
        untuned.append(json.loads(report.read_text())["untuned"]["overall"])
    assert untuned[0]["dice"] == pytest.approx(untuned[2]["dice"], abs=1e-6)
    assert untuned[1]["dice"] == pytest.approx(untuned[2]["dice"], abs=1e-6)
    assert untuned[1]["iou"] == pytest.approx(untuned[2]["iou"], abs=1e-6)
