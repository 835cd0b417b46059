"""Callbacks every segtune run gets."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel

from segtune.models.adapters import save_adapter

log = logging.getLogger(__name__)


class ReportBestCheckpoint(Callback):
    """Print the best checkpoint's path and score when ``fit`` ends."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if trainer.is_global_zero and isinstance(ckpt, ModelCheckpoint) and ckpt.best_model_path:
            score = f" ({ckpt.monitor}={float(ckpt.best_model_score):.4f})" if ckpt.best_model_score is not None else ""
            print(f"Best checkpoint{score}: {ckpt.best_model_path}")


class ExportBestAdapter(Callback):
    """Write the PEFT adapter of the best checkpoint to ``<run>/adapter/`` (LoRA and QLoRA).

    ModelCheckpoint updates its best score before it saves the new best file, so when a save
    happens with a new best score, the weights in memory are the best ones.
    """

    def __init__(self) -> None:
        self._exported_score: float | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        ckpt = trainer.checkpoint_callback
        model = getattr(pl_module, "model", None)
        if not (isinstance(model, PeftModel) and isinstance(ckpt, ModelCheckpoint) and trainer.is_global_zero):
            return
        if ckpt.best_model_score is None or trainer.log_dir is None:
            return
        score = float(ckpt.best_model_score)
        if score == self._exported_score:
            return
        folder = save_adapter(model, pl_module.preprocessing, Path(trainer.log_dir) / "adapter")
        (folder / "best_checkpoint.txt").write_text(f"{ckpt.best_model_path}\n{ckpt.monitor}={score}\n")
        self._exported_score = score
        log.info("adapter of the best checkpoint (%s=%.4f) written to %s", ckpt.monitor, score, folder)
