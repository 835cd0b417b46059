"""A DataModule whose batches carry the extra keys users' collators add (imported by class_path)."""

from __future__ import annotations

from typing import Any

import torch
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
