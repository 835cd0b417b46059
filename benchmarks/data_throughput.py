"""Images per second the training DataLoader delivers, per worker count, at SAM's 1024 px input.

Measures the whole data path a training step waits for: JPEG decode, intensity policy,
augmentation, prompts, preprocessing to 1024 px, low-resolution targets and collate, on the real
brain-MRI JPEGs (640 x 640) in ../shared/data. Goal: one worker feeds at least 40 images/s.

    python benchmarks/data_throughput.py [--root ../shared/data/brain-tumor-mri-coco] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import albumentations as A
import torch

from segtune.data import Preprocessing, PromptConfig, SegmentationDataModule

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri-coco"
GOAL = 40.0


def measure(root: Path, workers: int, batch_size: int, batches: int) -> float:
    """Images/s over ``batches`` batches after one warm-up batch (worker start-up excluded)."""
    dm = SegmentationDataModule(
        root,
        batch_size=batch_size,
        num_workers=workers,
        prompts=PromptConfig(kind="box+points", positive_points=1, negative_points=1),
        augmentations=[A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.5)],
        preprocessing=Preprocessing(1024, "longest", 256),
    )
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += len(next(loader)["image_ids"])
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    if not args.root.is_dir():
        sys.exit(f"skipped: {args.root} not found (the benchmark needs the real brain-MRI JPEGs)")
    torch.set_num_threads(1)  # the main process only collates; workers are single-threaded too
    rows = [(w, measure(args.root, w, args.batch_size, args.batches)) for w in args.workers]
    base = rows[0][1]
    print(f"data throughput, {args.root.name}, 1024 px input, batch {args.batch_size}, {args.batches} batches")
    print(f"{'workers':>8} {'images/s':>9} {'vs first row':>13} {'goal (1 worker >= 40/s)':>24}")
    for w, rate in rows:
        verdict = ("met" if rate >= GOAL else "MISSED") if w == 1 else ""
        print(f"{w:>8} {rate:>9.1f} {rate / base:>12.2f}x {verdict:>24}")


if __name__ == "__main__":
    main()
