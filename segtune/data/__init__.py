"""Data: COCO exports -> Dataset -> collate -> one Batch type."""

from segtune.data.datamodule import SegmentationDataModule, SyntheticShapesDataModule
from segtune.preprocessing import Preprocessing
from segtune.data.prompts import PromptConfig

__all__ = ["Preprocessing", "PromptConfig", "SegmentationDataModule", "SyntheticShapesDataModule"]
