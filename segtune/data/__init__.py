"""Data: COCO exports -> Dataset -> collate -> one Batch type."""

from segtune.data.datamodule import SegmentationDataModule, SyntheticShapesDataModule
from segtune.data.prompts import PromptConfig
from segtune.preprocessing import Preprocessing

__all__ = ["Preprocessing", "PromptConfig", "SegmentationDataModule", "SyntheticShapesDataModule"]
