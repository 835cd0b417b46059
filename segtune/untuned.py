"""The untuned model beside a fit's result: the model is scored on the validation split before the first
optimiser step, and the end of fit says what training changed, with its paired bootstrap interval.

A fine-tune can make a good pretrained model worse; nothing else in a run would say so. The
untuned score is measured once, with the same scoring path as every validation epoch
(:meth:`segtune.methods.base.SegmentationModule.score`) and synced across processes like every
metric, and kept as checkpoint state: a resumed run reports the score of its first start and
never scores trained weights as "untuned".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from segtune.callbacks import _gather, _run_folder
from segtune.files import write_atomically
from segtune.metrics import segmentation_metrics
from segtune.paired import paired_rows
from segtune.reports import instance_rows

log = logging.getLogger(__name__)

#: Where a fit writes the comparison (inside its run folder); ``segtune compare`` reads it.
UNTUNED_FILE = "untuned.json"
#: The untuned metrics logged (with their per-class ``/<class>`` forms): the box floor needs no second copy.
LOGGED = ("dice", "iou")
#: What is kept of each validation instance (the predicted IoU is not compared).
ROW_KEYS = ("image_id", "instance", "class", "dice", "iou")
ADVICE = (
    "try a lower model.init_args.lr, fewer epochs or early stopping, a larger or held-out validation split, "
    "or training less of the model (segtune.methods.DecoderOnly or LoRA)"
)


def _rows(pl_module: LightningModule, batch: Any, scores: list) -> list[dict[str, Any]]:
    """The per-instance rows (image, instance, class, dice, iou) of one scored batch: plain values, so
    the checkpoint that keeps them stays loadable with ``weights_only=True``."""
    rows = []
    for i, image_scores in enumerate(scores):
        n = len(image_scores.dice)
        found = instance_rows(
            int(batch["image_ids"][i]), batch["file_names"][i], image_scores, batch["category_ids"][i, :n],
            torch.zeros(n), pl_module.class_names,
        )  # fmt: skip
        rows += [{k: row[k] for k in ROW_KEYS} for row in found]
    return rows


class UntunedScore(Callback):
    """``segtune fit``: score the model on the validation split before its first optimiser step, log it
    as ``untuned_val_dice`` and ``untuned_val_iou`` (and ``/<class>``), and end the fit with a line such
    as ``untuned val_dice 0.9120 -> best 0.9470 (epoch 7): +0.0350 [95% CI +0.0100, +0.0610] over 57
    instances``, or a warning when no epoch beat the untuned model.

    The interval is a seeded bootstrap over the validation instances of the paired difference
    between the best epoch and the untuned model (:func:`segtune.paired.paired_difference`). The
    same numbers go to ``<run>/untuned.json``. The pass costs one validation epoch; with an
    embedding cache it fills the cache the first validation epoch then reads.

    Args:
        seed: the bootstrap's seed.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.untuned: dict[str, Any] | None = None  # {"metrics": {name: value}, "rows": [...]}
        self.best: dict[str, Any] | None = None  # {"epoch", "score", "rows"} of the best checkpoint
        self._current: list[dict[str, Any]] = []  # this validation's instances, on this process
        self._rows: list[dict[str, Any]] = []  # the last validation's instances, of every process

    # --- checkpoint state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"untuned": self.untuned, "best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.untuned = state_dict.get("untuned")
        self.best = state_dict.get("best")

    # --- the untuned pass --------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.untuned is None and trainer.global_step > 0:
            # a checkpoint written without this callback's state: its weights are trained, not untuned
            log.info("untuned score: not known for this run (resumed from a checkpoint that does not hold it)")
            return
        if self.untuned is None:
            self.untuned = self._score(trainer, pl_module)
            if self.untuned is None:
                return
            for logger in trainer.loggers:  # at step 0: the point before the first optimiser step
                logger.log_metrics({**self.untuned["metrics"], "epoch": trainer.current_epoch}, trainer.global_step)
            when = "before the first optimiser step"
        else:
            when = "from this run's first start"
        metrics = self.untuned["metrics"]
        # the progress bar; already synced, the same on every process (sync_dist: no DDP warning)
        pl_module.log_dict(
            {k: metrics[k] for k in ("untuned_val_dice", "untuned_val_iou") if k in metrics},
            prog_bar=True, logger=False, sync_dist=True,
        )  # fmt: skip
        if trainer.is_global_zero:
            shown = ", ".join(f"{k.removeprefix('untuned_')} {metrics[k]:.4f}" for k in sorted(metrics) if "/" not in k)
            counted = sum(row["dice"] is not None for row in self.untuned["rows"])
            log.info("untuned model (%s): %s over %d validation instances", when, shown, counted)

    def _score(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """One validation pass of the model as it is now; ``None`` when there is no validation split."""
        if not hasattr(pl_module, "score"):
            log.warning("untuned score: %s has no score(batch); not measured", type(pl_module).__name__)
            return None
        if getattr(getattr(trainer, "datamodule", None), "volumetric", False):
            # volumes are scored whole, by propagation (segtune.volume_scoring), not instance by instance
            log.info("untuned score: not measured for volumes (`segtune test` without a checkpoint scores the model)")
            return None
        loop = trainer.fit_loop.epoch_loop.val_loop
        if trainer.val_dataloaders is None and trainer.limit_val_batches:
            trainer.validating = True  # as Lightning's fit loop sets its validation data up
            loop.setup_data()
            trainer.training = True
        loaders = trainer.val_dataloaders
        if loaders is None or not sum(trainer.num_val_batches):
            return None
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        metrics = segmentation_metrics(pl_module.class_names, "untuned_val_").to(pl_module.device)
        rows: list[dict[str, Any]] = []
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        # A loader's iterator draws its seed from the global generator: forked, so the training after this
        # pass draws the same shuffles, jitters and augmentations as a run without it.
        cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), trainer.precision_plugin.val_step_context():
                for index, (loader, limit) in enumerate(zip(loaders, trainer.num_val_batches, strict=True)):
                    for batch_idx, batch in enumerate(loader):
                        if batch_idx >= limit:
                            break
                        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=index)
                        _, _, scores = pl_module.score(batch)
                        for i, image_scores in enumerate(scores):
                            metrics.update(image_scores.as_dict(), batch["category_ids"][i, : len(image_scores.dice)])
                        rows += _rows(pl_module, batch, scores)
        finally:
            for module, training in modes.items():
                module.train(training)
        values = metrics.compute()  # synced across processes, as every validation metric
        logged = {
            k: float(v) for k, v in values.items() if k.removeprefix("untuned_val_").split("/")[0] in LOGGED
        }  # fmt: skip
        return {"metrics": logged, "rows": _gather(trainer, rows)}

    # --- the best epoch's instances ------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._current = []

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not trainer.sanity_checking and isinstance(outputs, dict) and "scores" in outputs:
            self._current += _rows(pl_module, batch, outputs["scores"])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._rows = _gather(trainer, self._current)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # ModelCheckpoint updates its best score before it saves the new best file (see
        # ExportBestAdapter): a save with a new best score is the epoch whose instances were just scored.
        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or ckpt.best_model_score is None or not self._rows:
            return
        score = float(ckpt.best_model_score)
        if self.best is not None and score == self.best["score"]:
            return
        self.best = {"epoch": trainer.current_epoch, "score": score, "rows": self._rows}
        # The callbacks' states were collected before this hook: record the new best in this file too.
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    # --- the summary ---------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if not trainer.is_global_zero or self.untuned is None or not isinstance(ckpt, ModelCheckpoint):
            return
        summary = self.summary(ckpt.monitor, ckpt.mode)
        if summary is None:
            return
        print(summary["line"])
        if summary["warning"]:
            log.warning(summary["warning"])
        _write_json(_run_folder(trainer) / UNTUNED_FILE, {k: v for k, v in summary.items() if k != "line"})

    def summary(self, monitor: str | None, mode: str) -> dict[str, Any] | None:
        """The comparison of the best epoch with the untuned model by ``monitor``, or ``None`` when
        the untuned model has no such metric or no epoch was scored."""
        name = (monitor or "").removeprefix("val_")
        untuned = self.untuned["metrics"].get(f"untuned_val_{name}") if self.untuned else None
        if untuned is None or self.best is None:
            return None
        best, epoch = self.best["score"], self.best["epoch"]
        difference = paired_rows(self.untuned["rows"], self.best["rows"], name, self.seed)
        overall = difference["overall"]
        line = f"untuned {monitor} {untuned:.4f} -> best {best:.4f} (epoch {epoch})"
        if overall:
            line += (
                f": {overall['mean']:+.4f} [95% CI {overall['low']:+.4f}, {overall['high']:+.4f}] "
                f"over {overall['instances']} validation instances"
            )
            if overall["low"] <= 0 <= overall["high"]:
                line += " (the interval includes 0: within the noise of this validation split)"
        improved = best > untuned if mode == "max" else best < untuned
        warning = None
        if not improved:
            warning = (
                f"no epoch beat the untuned model: best {monitor} {best:.4f} (epoch {epoch}) against {untuned:.4f} "
                f"untuned, so the best checkpoint is no improvement on the model you started from; {ADVICE}"
            )
        return {
            "monitor": monitor,
            "untuned": untuned,
            "best": best,
            "best_epoch": epoch,
            "improved": improved,
            "difference": difference,
            "untuned_metrics": self.untuned["metrics"],
            "warning": warning,
            "line": line,
        }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` to a temporary file beside ``path`` and rename it: a reader never sees half a file."""
    write_atomically(path, lambda scratch: scratch.write_text(json.dumps(content, indent=2)))
