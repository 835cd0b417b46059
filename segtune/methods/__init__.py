"""LightningModules, one per adaptation method, sharing :class:`SegmentationModule`."""

from segtune.methods.base import SegmentationModule
from segtune.methods.baseline import FullFinetune
from segtune.methods.lora import LoRA
from segtune.methods.qlora import QLoRA

__all__ = ["FullFinetune", "LoRA", "QLoRA", "SegmentationModule"]
