"""Callbacks every segtune run gets."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class ReportBestCheckpoint(Callback):
    """Print the best checkpoint's path and score when ``fit`` ends."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if trainer.is_global_zero and isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path:
            score = f" ({ckpt.monitor}={float(ckpt.best_model_score):.4f})" if ckpt.best_model_score is not None else ""
            print(f"Best checkpoint{score}: {ckpt.best_model_path}")
