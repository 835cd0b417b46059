"""Images per second of the training DataLoader in epoch 1 and epoch 2, without and with ``cache_images``.

Runs the whole training data path (decode, intensity policy, augmentation, prompts, preprocessing
to SAM's 1024 px input, low-resolution targets, collate) over the full training split of each real
set in ../shared/data: the brain-MRI JPEGs (640 x 640, Roboflow COCO) and Kvasir-SEG (JPEG images
and masks of 99 sizes), with the default intensity policy (8-bit images unchanged) and with
``percentile`` (clipped to each image's percentiles: costlier, and cached with the image). With
the cache, epoch 1 decodes and keeps each image; epoch 2 decodes none.

On a shared machine the speed of one pass drifts by tens of percent, more than decoding costs, so
the two DataLoaders (``num_workers: 0``) run interleaved, a batch of one then the same batch of the
other (which goes first alternates): both see the same machine and do the same work. Rates are
images per CPU second of this process (where all the work is), median of ``--repeats`` runs;
wall-clock rates follow. ``decode`` is the share of a sample's
CPU time spent decoding and applying the intensity policy: the most the cache can save.

    python benchmarks/image_cache.py [--budget 4096] [--limit 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import albumentations as A
import torch
from torch.utils.data import DataLoader

from segtune.data import Preprocessing, PromptConfig, SegmentationDataModule
from segtune.data.batch import collate
from segtune.data.images import read_image
from segtune.data.intensity import IntensityPolicy, to_model_range
from segtune.data.masks import MaskFormat

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KVASIR = {"layout": "masks", "mask_format": MaskFormat(kind="binary", threshold=127)}
# (row name, folder, data options): the percentile rows show a costlier intensity policy, which the cache also skips
SETS = [
    ("brain-mri", "brain-tumor-mri-coco", {}),
    ("kvasir", "kvasir-seg-200", KVASIR),
    ("brain-mri percentile", "brain-tumor-mri-coco", {"intensity": IntensityPolicy("percentile")}),
    ("kvasir percentile", "kvasir-seg-200", {**KVASIR, "intensity": IntensityPolicy("percentile")}),
]


def datamodule(root: Path, options: dict, budget: int, workers: int, batch_size: int) -> SegmentationDataModule:
    """The benchmark's training data: data_throughput.py's prompts and augmentations, at 1024 px."""
    dm = SegmentationDataModule(
        root,
        batch_size=batch_size,
        num_workers=workers,
        cache_images=budget,
        prompts=PromptConfig(kind="box+points", positive_points=1, negative_points=1),
        augmentations=[A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.5)],
        preprocessing=Preprocessing(1024, "longest", 256),
        **options,
    )
    dm.setup("fit")
    return dm


def interleaved(root: Path, options: dict, budget: int, batch_size: int, limit: int) -> dict[str, list[float]]:
    """CPU and wall images/s of epochs 1 and 2, without (``off``) and with (``cache``) the image cache.

    Both loaders shuffle alike and each batch pair starts from the same torch seed, so both do the
    same work (same images, prompts and augmentations) but for the decoding the cache saves.
    """
    datasets = {
        "off": datamodule(root, options, 0, 0, batch_size).datasets["fit"],
        "cache": datamodule(root, options, budget, 0, batch_size).datasets["fit"],
    }
    rates: dict[str, list[float]] = {name: [] for name in datasets}  # [cpu 1, wall 1, cpu 2, wall 2]
    for epoch in range(2):
        iterators = {
            name: iter(
                DataLoader(dataset, batch_size, shuffle=True, collate_fn=collate,
                           generator=torch.Generator().manual_seed(epoch))
            )
            for name, dataset in datasets.items()
        }  # fmt: skip
        cpu, wall, images = ({name: 0.0 for name in datasets} for _ in range(3))
        for step in range(limit or len(next(iter(datasets.values()))) // batch_size + 1):
            for name in sorted(iterators, reverse=step % 2 == 1):
                iterator = iterators[name]
                torch.manual_seed(1000 * epoch + step)
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                batch = next(iterator, None)
                cpu[name] += time.process_time() - start_cpu
                wall[name] += time.perf_counter() - start_wall
                images[name] += len(batch["image_ids"]) if batch is not None else 0
        for name in datasets:
            rates[name] += [images[name] / cpu[name], images[name] / wall[name]]
    return rates


def decode_share(root: Path, options: dict) -> float:
    """Fraction of a training sample's CPU time spent decoding (read_image + intensity policy)."""
    dataset = datamodule(root, options, 0, 0, 1).datasets["fit"]
    for record in dataset.records:  # warm the page cache
        read_image(record.path)
    start = time.process_time()
    for record in dataset.records:
        to_model_range(read_image(record.path), dataset.intensity, record.path)
    decode = time.process_time() - start
    start = time.process_time()
    for i in range(len(dataset)):
        dataset[i]
    return decode / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="the folder holding the real sets")
    parser.add_argument("--budget", type=int, default=4096, help="cache_images in MiB")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="batches per epoch (0: the whole split)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; each cell is their median")
    args = parser.parse_args()
    if not args.shared.is_dir():
        sys.exit(f"skipped: {args.shared} not found (the benchmark needs the real sets)")
    torch.set_num_threads(1)  # as a DataLoader worker: the data path is single-threaded
    print(f"image cache: training DataLoader, 1024 px input, batch {args.batch_size}, budget {args.budget} MiB")
    print("images per CPU-second (wall-clock images/s in brackets), median of", args.repeats, "interleaved runs")
    print(f"{'set':<21} {'n':>4} {'epoch 1 off':>14} {'epoch 1 cache':>14} {'epoch 2 off':>14} "
          f"{'epoch 2 cache':>14} {'cache/off ep2':>14} {'decode':>7}")  # fmt: skip
    for name, folder, options in SETS:
        root = args.shared / folder
        share = decode_share(root, options)  # also reads every file once: the page cache is warm from here on
        n = len(datamodule(root, options, 0, 0, args.batch_size).datasets["fit"])
        runs = [interleaved(root, options, args.budget, args.batch_size, args.limit) for _ in range(args.repeats)]
        cell = {(k, i): statistics.median(r[k][i] for r in runs) for k in ("off", "cache") for i in range(4)}
        shown = [f"{cell[k, i]:.1f} ({cell[k, i + 1]:.1f})" for i in (0, 2) for k in ("off", "cache")]
        gain = statistics.median(r["cache"][2] / r["off"][2] for r in runs)
        print(f"{name:<21} {n:>4} {shown[0]:>14} {shown[1]:>14} {shown[2]:>14} {shown[3]:>14} {gain:>13.2f}x "
              f"{share:>7.0%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
