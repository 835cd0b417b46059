"""LightningModules, one per adaptation method, sharing :class:`SegmentationModule`."""

from segtune.methods.base import SegmentationModule
from segtune.methods.baseline import DecoderOnly, FullFinetune
from segtune.methods.lora import LoRA
from segtune.methods.qlora import QLoRA

__all__ = ["DecoderOnly", "FullFinetune", "LoRA", "QLoRA", "SegmentationModule"]
