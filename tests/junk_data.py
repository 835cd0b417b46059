"""Test-only DataModules and callbacks the CLI imports by class_path: leaking keys, NaN batches, a pause."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from segtune.data.batch import collate
from segtune.data.datamodule import SegmentationDataModule


def collate_with_junk(samples: list[Any]) -> dict[str, Any]:
    batch = collate(samples)
    n = batch["pixel_values"].shape[0]
    batch.update(
        attention_mask=torch.ones(n, 4, dtype=torch.long),
        image_mask=torch.ones(n, 8, 8),
        metadata=[{"source": "junk"}] * n,
        labels=torch.zeros(n, 1),
        file_name=list(batch["file_names"]),
    )
    return batch  # original_sizes is already there


class JunkKeysDataModule(SegmentationDataModule):
    """SegmentationDataModule whose training batches also carry attention_mask, labels, metadata..."""

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        loader.collate_fn = collate_with_junk
        return loader


class NaNBatchDataModule(SegmentationDataModule):
    """SegmentationDataModule whose ``nan_batch``-th training batch (counted from 0 over the run) is NaN."""

    def __init__(self, *args: Any, nan_batch: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_batch = nan_batch
        self.seen = 0

    def _collate(self, samples: list[Any]) -> dict[str, Any]:
        batch = collate(samples)
        if self.seen == self.nan_batch:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        self.seen += 1
        return batch

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        loader.collate_fn = self._collate
        return loader


class PauseInEpoch(Callback):
    """Sleep at the first batch of ``epoch`` when ``SEGTUNE_TEST_PAUSE`` names a marker file to write,
    so a test can ``kill -9`` the run mid-epoch."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        marker = os.environ.get("SEGTUNE_TEST_PAUSE")
        if marker and trainer.current_epoch == self.epoch and batch_idx == 1:
            Path(marker).write_text(str(trainer.global_step))
            time.sleep(120)
