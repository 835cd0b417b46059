"""The untuned model beside a fit's result: the model is scored on the validation split before the first
optimiser step, and the end of fit says what training changed, with its paired bootstrap interval.

A fine-tune can make a good pretrained model worse; nothing else in a run would say so. The
untuned score is measured once, with the same scoring path as every validation epoch
(:meth:`segtune.methods.base.SegmentationModule.score_rows`: instances for images, (case, class)
rows for volumes) and synced across processes like every metric, and kept as checkpoint state: a
resumed run reports the score of its first start and never scores trained weights as "untuned".

The untuned weights are also the first candidate for the best checkpoint
(``best-untuned-val_dice0.2287.ckpt``, :func:`segtune.callbacks.save_as_candidate`): only an epoch
that beats them replaces it, so testing or exporting "the best" never gives less than the model
the fit started from.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from segtune.callbacks import gather, run_folder, save_as_candidate
from segtune.click_scores import click_rounds_of, flatter_than_untuned
from segtune.files import write_atomically
from segtune.paired import paired_rows
from segtune.reports import compared_scores

log = logging.getLogger(__name__)

#: Where a fit writes the comparison (inside its run folder); ``segtune compare`` reads it.
UNTUNED_FILE = "untuned.json"
#: What is kept of each validation row beside its scores (those that depend on the model,
#: :func:`segtune.reports.compared_scores`; the predicted IoU and the box floors are not compared).
ROW_KEYS = ("image_id", "instance", "class")
#: What a row is, by the evaluation's unit: an instance of an image, or a class of a case (volumes).
ROWS = {"image": "validation instances", "case": "validation (case, class) rows"}
#: The untuned model's best-checkpoint file name (without ``.ckpt``), e.g. ``best-untuned-val_dice0.2287``.
UNTUNED_CHECKPOINT = "best-untuned-{monitor}{score:.4f}"
ADVICE = (
    "try a lower model.init_args.lr, fewer epochs or early stopping, a larger or held-out validation split, "
    "or training less of the model (segtune.methods.DecoderOnly or LoRA)"
)


def _kept(rows: list[dict[str, Any]], scores: tuple[str, ...]) -> list[dict[str, Any]]:
    """What is kept of report rows (:data:`ROW_KEYS` and ``scores``), as plain values, so the checkpoint that
    keeps them stays loadable with ``weights_only=True``."""
    return [
        {"image_id": int(row["image_id"]), "instance": int(row["instance"]), "class": str(row["class"]),
         **{s: None if row.get(s) is None else float(row[s]) for s in scores}}
        for row in rows
    ]  # fmt: skip


class UntunedScore(Callback):
    """``segtune fit``: score the model on the validation split before its first optimiser step, log it
    as ``untuned_val_dice`` and ``untuned_val_iou`` (and ``/<class>``; volumes: every volume score but
    the box floor, e.g. ``untuned_val_nsd``), and end the fit with a line such as ``untuned val_dice
    0.9120 -> best 0.9470 (epoch 7): +0.0350 [95% CI +0.0100, +0.0610] over 57 validation instances``
    (volumes: ``over 12 validation (case, class) rows``), or a warning when no epoch beat the untuned
    model.

    The untuned weights are saved as the first best checkpoint of the Trainer's checkpoint callback
    (``best-untuned-val_dice0.9120.ckpt``, :func:`segtune.callbacks.save_as_candidate`): an epoch
    replaces it only by beating it, so when none does, the best checkpoint, ``ckpt_path=best`` and the
    exported adapter are the untuned model, never a worse epoch.

    The interval is a seeded bootstrap over the validation rows of the paired difference between
    the best epoch and the untuned model (:func:`segtune.paired.paired_difference`). The same
    numbers go to ``<run>/untuned.json``. The pass costs one validation epoch and one checkpoint
    write; with an embedding cache it fills the cache the first validation epoch then reads.

    Args:
        seed: the bootstrap's seed.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        # {"metrics": {name: value}, "rows": [...], "unit": "image" | "case", "checkpoint": file name or None}
        self.untuned: dict[str, Any] | None = None
        self.best: dict[str, Any] | None = None  # {"epoch", "score", "rows"} of the best validation epoch
        self._current: list[dict[str, Any]] = []  # this validation's rows, on this process

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
        first = self.untuned is None
        if first:
            self.untuned = self._score(trainer, pl_module)
            if self.untuned is None:
                return
            for logger in trainer.loggers:  # at step 0: the point before the first optimiser step
                logger.log_metrics({**self.untuned["metrics"], "epoch": trainer.current_epoch}, trainer.global_step)
            saved = self._save_as_best(trainer)
        when = "before the first optimiser step" if first else "from this run's first start"
        metrics = self.untuned["metrics"]
        # the progress bar; already synced, the same on every process (sync_dist: no DDP warning)
        pl_module.log_dict(
            {k: metrics[k] for k in ("untuned_val_dice", "untuned_val_iou") if k in metrics},
            prog_bar=True, logger=False, sync_dist=True,
        )  # fmt: skip
        if trainer.is_global_zero:
            shown = ", ".join(f"{k.removeprefix('untuned_')} {v:.4f}" for k, v in metrics.items() if "/" not in k)
            counted = sum(row.get("dice") is not None for row in self.untuned["rows"])
            rows = ROWS[self.untuned.get("unit", "image")]
            log.info("untuned model (%s): %s over %d %s", when, shown, counted, rows)
            if first and saved:
                log.info("untuned model saved as the best checkpoint until an epoch beats it: %s", saved)

    def _save_as_best(self, trainer: Trainer) -> str | None:
        """The untuned weights as the first best file of the Trainer's checkpoint callback, scored by its monitor
        (:func:`segtune.callbacks.save_as_candidate`); its path, or ``None`` when that callback keeps no best
        files or the untuned pass has no such metric (e.g. ``val_loss``)."""
        ckpt = trainer.checkpoint_callback
        assert self.untuned is not None
        self.untuned["checkpoint"] = None
        score = self.untuned["metrics"].get(f"untuned_{ckpt.monitor}") if isinstance(ckpt, ModelCheckpoint) else None
        if score is None:
            return None
        stem = UNTUNED_CHECKPOINT.format(monitor=ckpt.monitor, score=score)
        # named before the save, so that the file's own state says it is the untuned model's
        self.untuned["checkpoint"] = f"{stem}{ckpt.FILE_EXTENSION}"
        saved = save_as_candidate(ckpt, trainer, score, stem)
        if saved is None:
            self.untuned["checkpoint"] = None
        return saved

    def _score(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """One validation pass of the model as it is now; ``None`` when there is no validation split."""
        if not all(hasattr(pl_module, name) for name in ("score_rows", "evaluation_metrics", "evaluation_scores")):
            log.warning("untuned score: %s has no score_rows(batch); not measured", type(pl_module).__name__)
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
        # the validation's own metrics (images: per instance; volumes: per case and class) under another prefix
        metrics = pl_module.evaluation_metrics("untuned_val_")
        scores = compared_scores(pl_module.evaluation_scores)  # the box floors are the same for any model
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
                        rows += _kept(pl_module.score_rows(batch, metrics), scores)
        finally:
            for module, training in modes.items():
                module.train(training)
        values = metrics.compute()  # synced across processes, as every validation metric
        logged = {k: float(v) for k, v in values.items() if k.removeprefix("untuned_val_").split("/")[0] in scores}
        return {"metrics": logged, "rows": gather(trainer, rows), "unit": pl_module.evaluation_unit}

    # --- the best epoch's rows -----------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._current = []

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if trainer.sanity_checking or self.untuned is None or not isinstance(outputs, dict):
            return
        if "report_rows" in outputs:  # the step's own rows (images: per instance; volumes: per case and class)
            self._current += _kept(outputs["report_rows"], compared_scores(outputs["report_scores"]))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the epoch's metrics are logged and before the checkpoint callbacks save (Lightning runs them
        # last): the best epoch so far by the checkpoint's monitor is part of the state the files get.
        if trainer.sanity_checking or self.untuned is None:
            return
        rows = gather(trainer, self._current)  # every process: a collective call
        ckpt = trainer.checkpoint_callback
        current = trainer.callback_metrics.get(ckpt.monitor) if isinstance(ckpt, ModelCheckpoint) else None
        if current is None or not rows or not math.isfinite(float(current)):
            return
        score = float(current)
        if self.best is None or (score > self.best["score"] if ckpt.mode == "max" else score < self.best["score"]):
            self.best = {"epoch": trainer.current_epoch, "score": score, "rows": rows}

    # --- the summary ---------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if not trainer.is_global_zero or self.untuned is None or not isinstance(ckpt, ModelCheckpoint):
            return
        summary = self.summary(ckpt.monitor, ckpt.mode, ckpt.best_model_path)
        if summary is None:
            return
        print(summary["line"])
        if summary["warning"]:
            log.warning(summary["warning"])
        summary["click_warning"] = self.flatter_clicks()
        if summary["click_warning"]:  # model.init_args.clicks during validation: the best epoch's click curve
            log.warning("best epoch: %s", summary["click_warning"])
        _write_json(run_folder(trainer) / UNTUNED_FILE, {k: v for k, v in summary.items() if k != "line"})

    def flatter_clicks(self) -> str | None:
        """A warning when the best epoch gains less Dice from its clicks than the untuned model on the same
        validation instances (``model.init_args.clicks`` > 0; :func:`segtune.click_scores.flatter_than_untuned`)."""
        if not self.untuned or self.best is None or not self.untuned["rows"]:
            return None
        rounds = click_rounds_of(list(self.untuned["rows"][0]))
        if not rounds:
            return None

        def gain(rows: list[dict[str, Any]]) -> float | None:
            values = [r["click_gain"] for r in rows if r.get("click_gain") is not None]
            return sum(values) / len(values) if values else None

        paired = paired_rows(self.untuned["rows"], self.best["rows"], "click_gain", self.seed)
        report = {
            "overall": {"click_gain": gain(self.best["rows"])},
            "untuned": {"overall": {"click_gain": gain(self.untuned["rows"])}, "difference": {"click_gain": paired}},
        }
        return flatter_than_untuned(report, rounds)

    def summary(self, monitor: str | None, mode: str, best_checkpoint: str = "") -> dict[str, Any] | None:
        """The comparison of the best epoch with the untuned model by ``monitor``, or ``None`` when
        the untuned model has no such metric or no epoch was scored.

        Args:
            monitor: the checkpoint's metric (``val_dice``).
            mode: ``"max"`` or ``"min"``.
            best_checkpoint: the checkpoint callback's best file now (the untuned model's when no epoch beat it).
        """
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
                f"over {overall['instances']} {ROWS[self.untuned.get('unit', 'image')]}"
            )
            if overall["low"] <= 0 <= overall["high"]:
                line += " (the interval includes 0: within the noise of this validation split)"
        improved = best > untuned if mode == "max" else best < untuned
        untuned_is_best = bool(best_checkpoint) and Path(best_checkpoint).name == self.untuned.get("checkpoint")
        warning = None
        if not improved:
            kept = (
                f"the best checkpoint is the untuned model ({Path(best_checkpoint).name})" if untuned_is_best
                else "the best checkpoint is no improvement on the model you started from"
            )  # fmt: skip
            warning = (
                f"no epoch beat the untuned model: best {monitor} {best:.4f} (epoch {epoch}) against {untuned:.4f} "
                f"untuned, so {kept}; {ADVICE}"
            )
        return {
            "monitor": monitor,
            "untuned": untuned,
            "best": best,
            "best_epoch": epoch,
            "improved": improved,
            "best_checkpoint": best_checkpoint or None,
            "best_checkpoint_is_untuned": untuned_is_best,
            "unit": self.untuned.get("unit", "image"),
            "difference": difference,
            "untuned_metrics": self.untuned["metrics"],
            "warning": warning,
            "line": line,
        }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` to a temporary file beside ``path`` and rename it: a reader never sees half a file."""
    write_atomically(path, lambda scratch: scratch.write_text(json.dumps(content, indent=2)))
