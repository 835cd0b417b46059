"""The callbacks of a segtune run: best checkpoint, adapter export, test report, predictions, pictures.

Every default instance is listed in ``segtune fit --print_config`` (``trainer.callbacks``) and can
be changed or removed there; :mod:`segtune.resume` holds the callbacks that make a resume exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal
from weakref import proxy

import cv2
import numpy as np
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from peft import PeftModel

from segtune.click_scores import click_rounds_of, click_score_names, click_summary, click_table, flatter_than_untuned
from segtune.data.images import read_image
from segtune.data.intensity import IntensityPolicy, to_model_range
from segtune.files import output_folder, read_checkpoint_file, write_atomically
from segtune.models.adapters import save_pretrained
from segtune.reports import (
    IMAGE_SCORES,
    coco_results,
    summarise,
    summary_table,
    untuned_summary,
    untuned_table,
    write_test_report,
)
from segtune.visualise import (
    ScoredImage,
    click_curve_figure,
    figure_to_array,
    instance_index_mask,
    overlay,
    save_figure,
    test_report_figure,
    to_uint8_rgb,
    validation_grid,
)
from segtune.volume_output import write_prediction

log = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the best checkpoint by the method's own metric.

    With ``monitor`` left ``None`` it follows the LightningModule's ``monitor`` and ``mode``
    attributes (``val_dice``, ``max`` for every segtune method), so the metric is named in one
    place. All other arguments are ``ModelCheckpoint``'s.

    Args:
        monitor: the metric to follow; ``None`` takes the module's ``monitor``.
        mode: ``"min"`` or ``"max"``; ``None`` takes the module's ``mode``.
        filename: checkpoint file name; ``None`` names it ``best-epochEE-<metric><value>``, e.g.
            ``best-epoch15-val_dice0.8243.ckpt``.
        **kwargs: see ``lightning.pytorch.callbacks.ModelCheckpoint``.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        filename: str | None = None,
        auto_insert_metric_name: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            monitor=monitor, mode=mode or "max", filename=filename, auto_insert_metric_name=auto_insert_metric_name,
            **kwargs,
        )  # fmt: skip
        self._follow_module = (monitor is None, mode is None)
        self._default_filename = filename is None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        follow_monitor, follow_mode = self._follow_module
        if follow_monitor:
            self.monitor = getattr(pl_module, "monitor", None)
        if follow_mode:
            self.mode = getattr(pl_module, "mode", "max")
            # the worst possible score, as ModelCheckpoint sets it for its mode
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
        if self.monitor and self._default_filename:
            self.filename = f"best-epoch{{epoch:02d}}-{self.monitor}{{{self.monitor}:.4f}}"
        super().setup(trainer, pl_module, stage)


def save_as_candidate(checkpoint: ModelCheckpoint, trainer: Trainer, score: float, stem: str) -> str | None:
    """Save the weights in memory as ``<dirpath>/<stem>.ckpt``, one of ``checkpoint``'s best files with ``score``
    as its monitored value, as if an epoch had scored it: ``best_model_path`` and ``best_model_score`` follow
    it, and only a strictly better score replaces it (with ``save_top_k: 1`` its file is then removed).

    For a model that exists before any epoch (the untuned model, :mod:`segtune.untuned`), so that "the best
    checkpoint" (``Best checkpoint ...``, ``ckpt_path=best``, the exported adapter, ``segtune compare``) is
    never worse than it. Every process calls it (the save is collective).

    Returns:
        The file's path, or ``None`` when ``checkpoint`` keeps no best files (``save_top_k: 0``, no monitor) or
        the score is not finite.
    """
    keeps_best = bool(checkpoint.save_top_k) and checkpoint.monitor is not None and checkpoint.dirpath is not None
    if not keeps_best or not math.isfinite(score):
        return None
    path = os.path.join(checkpoint.dirpath, f"{stem}{checkpoint.FILE_EXTENSION}")
    # ModelCheckpoint's own bookkeeping of a new top-k file (_update_best_and_save), without its file name
    checkpoint.best_k_models[path] = torch.tensor(score)
    k = len(checkpoint.best_k_models) if checkpoint.save_top_k == -1 else checkpoint.save_top_k
    if len(checkpoint.best_k_models) == k:  # the k-th best is the one a better score replaces
        worst = max if checkpoint.mode == "min" else min
        checkpoint.kth_best_model_path = worst(checkpoint.best_k_models, key=checkpoint.best_k_models.get)
        checkpoint.kth_value = checkpoint.best_k_models[checkpoint.kth_best_model_path]
    best = min if checkpoint.mode == "min" else max
    checkpoint.best_model_path = best(checkpoint.best_k_models, key=checkpoint.best_k_models.get)
    checkpoint.best_model_score = checkpoint.best_k_models[checkpoint.best_model_path]
    trainer.save_checkpoint(path, checkpoint.save_weights_only)  # the callbacks' states above are in the file
    if trainer.is_global_zero:
        for logger in trainer.loggers:  # as ModelCheckpoint tells them of each file it saves (W&B's log_model)
            logger.after_save_checkpoint(proxy(checkpoint))
    return path


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
    happens with a new best score, the weights in memory are the best ones. The exported score is
    part of this callback's checkpoint state: after a resume, the adapter is rewritten only when
    a new best appears, never with the current weights of a worse epoch.
    """

    def __init__(self) -> None:
        self._exported_score: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"exported_score": self._exported_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._exported_score = state_dict.get("exported_score")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        ckpt = trainer.checkpoint_callback
        model = getattr(pl_module, "model", None)
        if not (isinstance(model, PeftModel) and isinstance(ckpt, ModelCheckpoint) and trainer.is_global_zero):
            return
        if ckpt.best_model_score is None:
            return
        score = float(ckpt.best_model_score)
        if score == self._exported_score:
            return
        folder = run_folder(trainer) / "adapter"
        # written beside and renamed: a crash while saving leaves the previous best adapter whole
        with output_folder(folder, overwrite=True) as scratch:
            save_pretrained(model, pl_module.preprocessing, scratch)
            (scratch / "best_checkpoint.txt").write_text(f"{ckpt.best_model_path}\n{ckpt.monitor}={score}\n")
        self._exported_score = score
        # The callbacks' states were collected before this hook: record the export in this file too.
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()
        log.info("adapter of the best checkpoint (%s=%.4f) written to %s", ckpt.monitor, score, folder)


def run_folder(trainer: Trainer) -> Path:
    """The run's folder (``runs/<name>/version_N``), or the Trainer's root without a logger.

    ``trainer.log_dir`` is a collective call under DDP (it broadcasts from rank 0), so code that
    runs on rank 0 only would hang on it; this reads the logger directly, as ``log_dir`` does.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(logger.log_dir)
    if isinstance(logger, WandbLogger):  # where ModelCheckpoint puts its checkpoints: <save_dir>/<project>/<run id>
        return Path(logger.save_dir or ".") / str(logger.name) / str(logger.version)
    return Path(logger.save_dir or ".")


def _original_image(trainer: Trainer, path: str) -> np.ndarray:
    """The image file as uint8 RGB, through the data's own intensity policy."""
    policy = getattr(getattr(trainer, "datamodule", None), "intensity", None) or IntensityPolicy()
    return to_uint8_rgb(to_model_range(read_image(Path(path)), policy, path))


def _dataset_of(loaders: Any, index: int) -> Any:
    """The dataset behind the ``index``-th of the Trainer's dataloaders (one or a list)."""
    loader = loaders[index] if isinstance(loaders, (list, tuple)) else loaders
    return getattr(loader, "dataset", None)


def _class_name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def _scored_image(trainer: Trainer, pl_module: LightningModule, image: dict[str, Any]) -> ScoredImage:
    """A :class:`ScoredImage` from what a callback kept of one evaluated image (see :func:`_keep`)."""
    return ScoredImage(
        file_name=image["file_name"],
        image=_original_image(trainer, image["image_path"]),
        target=image["target"],
        predicted=image["predicted"],
        class_ids=image["class_ids"],
        class_names=[_class_name(pl_module.class_names, c) for c in image["class_ids"]],
        dice=image["dice"],
        box_dice=image["box_dice"],
    )


def _keep(batch: Any, i: int, predicted: Any, scores: Any) -> dict[str, Any]:
    """Image ``i`` of an evaluation batch with its prediction and scores, on the CPU, without its pixels."""
    target = batch["masks"][i].cpu().numpy()
    return {
        "file_name": batch["file_names"][i],
        "image_path": batch["image_paths"][i],
        "target": target,
        "predicted": predicted.masks.cpu().numpy(),
        "class_ids": batch["category_ids"][i, : len(target)].tolist(),
        "dice": scores.dice.tolist(),
        "box_dice": scores.box_dice.tolist(),
    }


def gather(trainer: Trainer, items: list) -> list:
    """Every process's ``items`` on every process (a no-op in one process)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return items
    gathered: list[list] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


class TestReport(Callback):
    """``segtune test``: write ``test_metrics.json``, ``test_per_image.csv`` and ``test_report.png``
    into the run folder and print a short table (overall, per class, worst images). The rows are the
    per-instance scores the test metrics were computed from.

    ``test_report.png`` shows the distribution of per-instance Dice per class with the box floor
    marked, and the ``worst_images`` images with the lowest mean Dice with their predictions.

    Args:
        worst_images: how many of the lowest-Dice images the picture shows (0: the Dice
            distribution alone).
        picture: write ``test_report.png`` (``false``: the json and csv files only).
        untuned: also score the untuned model (the same method and ``model`` rebuilt from its
            pretrained source, untrained: :meth:`~segtune.methods.base.SegmentationModule.untuned`)
            on the same batches, and report it beside the checkpoint, per class, with the paired
            difference and its 95% bootstrap interval over instances (volumes: over (case, class)
            rows). Doubles the test time and holds a second model in memory. On the command line:
            ``--trainer.callbacks+=segtune.callbacks.TestReport --trainer.callbacks.untuned=true``
            (of several TestReports, the last one in the list reports; the others do nothing).
    """

    def __init__(self, worst_images: int = 4, picture: bool = True, untuned: bool = False) -> None:
        self.worst_images = worst_images
        self.picture = picture
        self.untuned = untuned
        self._untuned_model: LightningModule | None = None
        self._rng_before_model: torch.Tensor | None = None
        self._active = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # one report per run: a TestReport added with --trainer.callbacks+= replaces the default one
        self._active = [c for c in trainer.callbacks if isinstance(c, TestReport)][-1] is self
        # Callbacks are set up right before the module builds its model: the untuned one is built
        # later from this state, so a random preset gets the same weights (LoRA: the same frozen base).
        self._rng_before_model = torch.get_rng_state() if self._active and self.untuned and stage == "test" else None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng_before_model is None or self._untuned_model is not None:
            return
        if not hasattr(pl_module, "untuned"):
            log.warning("test report: %s cannot rebuild its untuned model; only the checkpoint is reported",
                        type(pl_module).__name__)  # fmt: skip
            return
        with torch.random.fork_rng(devices=[]):  # the run's own random state is left as it was
            torch.set_rng_state(self._rng_before_model)
            self._untuned_model = pl_module.untuned().to(pl_module.device)
        if hasattr(self._untuned_model, "choose_stop_for_test"):  # box2d: the untuned model's own stop rule
            self._untuned_model.choose_stop_for_test(trainer.datamodule)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows: list[dict] = []
        self.untuned_rows: list[dict] = []  # the untuned model's, on the same instances
        self.worst: list[dict[str, Any]] = []  # the worst images so far, with their masks
        self.layout: tuple[tuple[str, ...], str] = (IMAGE_SCORES, "image")  # the rows' scores and unit

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or not isinstance(outputs, dict) or "report_rows" not in outputs:
            return
        # the rows the step made of the scores it computed (images: per instance; volumes: per case and class)
        self.rows += outputs["report_rows"]
        self.layout = (tuple(outputs["report_scores"]), outputs["report_unit"])
        if "scores" in outputs and self.picture and self.worst_images:
            for i, (predicted, scores) in enumerate(zip(outputs["predictions"], outputs["scores"], strict=True)):
                if len(scores.dice):
                    self.worst = self._worst([*self.worst, _keep(batch, i, predicted, scores)])
        if self._untuned_model is not None:  # the same rows of the untuned model, on the same batch
            with trainer.precision_plugin.test_step_context():
                self.untuned_rows += self._untuned_model.score_rows(batch)

    def _worst(self, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Lowest mean instance Dice (the per-image Dice of the report) first; ties by file name.
        return sorted(images, key=lambda im: (float(np.mean(im["dice"])), im["file_name"]))[: self.worst_images]

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        rows = gather(trainer, self.rows)
        untuned_rows = gather(trainer, self.untuned_rows) if self._untuned_model is not None else []
        worst = self._worst(gather(trainer, self.worst)) if self.picture else []
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        if not rows:
            log.warning("test report: no instance was scored, nothing written")
            return
        report = summarise(rows, *self.layout)
        if self._untuned_model is not None:
            report["untuned"] = untuned_summary(untuned_rows, rows, *self.layout)
        rounds = click_rounds_of(self.layout[0])
        if rounds:  # model.init_args.clicks: the Dice curve over the clicks
            report["clicks"] = click_summary(report, rounds)
            report["clicks"]["warning"] = flatter_than_untuned(report, rounds)
        folder = run_folder(trainer)
        json_path, csv_path = write_test_report(report, folder)
        written = f"{json_path}, {csv_path}"
        if self.picture and self.layout[1] == "image":  # its distributions are of instance Dice
            figure = test_report_figure(rows, [_scored_image(trainer, pl_module, im) for im in worst])
            written += f" and {save_figure(figure, folder / 'test_report.png')}"
        clicked = {*click_score_names(rounds), *click_score_names(rounds, "nsd")}  # images' and volumes'
        table = summary_table(report, scores=[s for s in self.layout[0] if s not in clicked])
        table += f"\n\n{untuned_table(report)}" if "untuned" in report else ""
        if rounds:  # the Dice after each click, its curve, and whether fine-tuning flattened it
            table += f"\n\n{click_table(report, rounds)}"
            if self.picture:
                written += f" and {save_figure(click_curve_figure(report['clicks']), folder / 'test_clicks.png')}"
            if report["clicks"]["warning"]:
                log.warning(report["clicks"]["warning"])
        print(f"\n{table}\nTest report: {written}")
        self.worst = []

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._untuned_model = None  # a second model's memory, released


def _imwrite(path: Path, image: np.ndarray) -> None:
    """``cv2.imwrite`` that fails in one line naming the file (OpenCV only returns False: a silent loss)."""
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not be written (disk full, or a folder that cannot be written?)")


class PredictionWriter(BasePredictionWriter):
    """``segtune predict``: per image a mask PNG (instance ``i`` stored as ``i + 1``) and an overlay
    JPEG (contours, class names, predicted IoU); for all images one ``predictions.json`` in COCO
    results format (RLE masks) that ``COCO.loadRes`` reads. Masks of automatic mask generation have
    no class: no name in the overlay, ``category_id`` 0 in the json.

    Args:
        output_dir: where to write; relative paths are inside the run folder.
        overlays: also write the overlay JPEGs (the slowest part).
    """

    def __init__(self, output_dir: str = "predictions", overlays: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.overlays = overlays

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":
            # Everything is written here, batch by batch: the Trainer need not keep every image's
            # full-resolution masks in memory until predict ends (it would, by default).
            trainer.predict_loop.return_predictions = False

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder = run_folder(trainer) / self.output_dir
        (self.folder / "masks").mkdir(parents=True, exist_ok=True)
        if self.overlays:
            (self.folder / "overlays").mkdir(exist_ok=True)
        self.results: list[dict] = []
        self.volumes: list[Path] = []

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: Any, batch_indices: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if "volumes" in batch:  # whole cases: label volumes with their source's geometry, and montages
            self.volumes += [write_prediction(p, self.folder, pl_module.class_names) for p in prediction]
            return
        dataset = _dataset_of(trainer.predict_dataloaders, dataloader_idx)
        names = pl_module.class_names
        for i, predicted in enumerate(prediction):
            masks, scores = predicted.masks.numpy(), predicted.scores.numpy()
            given = predicted.classes if predicted.classes is not None else batch["category_ids"][i, : len(masks)]
            classes = given.tolist()
            stem = Path(batch["file_names"][i]).stem
            _imwrite(self.folder / "masks" / f"{stem}.png", instance_index_mask(masks, scores))
            if self.overlays:
                image = _original_image(trainer, batch["image_paths"][i])
                named = [f"{names[c]} " if 0 <= c < len(names) else "" for c in classes]  # -1: no class
                labels = [f"{name}{s:.2f}" for name, s in zip(named, scores, strict=True)]
                classless = all(c < 0 for c in classes)  # automatic masks: a colour per mask
                drawn = overlay(image, masks, labels, colours=None if classless else classes)
                _imwrite(self.folder / "overlays" / f"{stem}.jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            ids = [dataset.category_id(c) if hasattr(dataset, "category_id") else c + 1 for c in classes]
            self.results += coco_results(batch["image_ids"][i], masks, scores, ids)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = gather(trainer, self.results)
        volumes = gather(trainer, self.volumes)
        if volumes and trainer.is_global_zero:
            print(f"Predictions: {len(volumes)} label volumes written to {self.folder / 'volumes'}, montages to "
                  f"{self.folder / 'montages'}")  # fmt: skip
            return
        if trainer.is_global_zero:
            path = self.folder / "predictions.json"
            path.write_text(json.dumps(results))
            print(f"Predictions: {len(results)} masks written to {self.folder}")


class ValidationImages(Callback):
    """Every ``every_n_epochs``, save a grid of validation images: image | ground truth | prediction.

    The columns have titles; each row shows the image's file name, the classes of its instances
    and their Dice beside the box-floor Dice (the scores the validation metrics use). Written as
    ``<run>/val_images/epoch_EEE.png`` and, when the logger is TensorBoard or W&B, as the
    ``val_images`` image there.

    Args:
        every_n_epochs: how often (0 disables).
        max_images: images in the grid (the first of the validation set, so epochs compare).
        height: height of each panel in pixels.
    """

    def __init__(self, every_n_epochs: int = 5, max_images: int = 6, height: int = 256) -> None:
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images
        self.height = height

    def _due(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return bool(self.every_n_epochs) and not trainer.sanity_checking and epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.images: list[dict[str, Any]] = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._due(trainer) or not trainer.is_global_zero or len(self.images) >= self.max_images:
            return
        if not isinstance(outputs, dict) or "predictions" not in outputs or "scores" not in outputs:
            return
        pairs = list(zip(outputs["predictions"], outputs["scores"], strict=True))
        for i, (predicted, scores) in enumerate(pairs[: self.max_images - len(self.images)]):
            self.images.append(_keep(batch, i, predicted, scores))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.images or not trainer.is_global_zero:
            return
        figure = validation_grid([_scored_image(trainer, pl_module, im) for im in self.images], self.height)
        save_figure(figure, run_folder(trainer) / "val_images" / f"epoch_{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                picture = figure_to_array(figure)
                logger.experiment.add_image("val_images", picture, trainer.global_step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("val_images", [figure_to_array(figure)], step=trainer.global_step)
        self.images = []


class SaveConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in the run folder, and the resolved config in a W&B run's config.

    Lightning logs only the LightningModule's arguments to a logger; a W&B run should also show the
    data, trainer and callback settings it was made with, so the whole resolved config is logged
    under ``config`` (as ``SaveConfigCallback.save_config``'s documentation suggests).
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.log_hyperparams({"config": config})


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside it and rename it into place; load in one line.

    A process killed while saving (``kill -9``, out of memory, a lost node) leaves the previous
    file intact rather than a truncated one that cannot resume. A checkpoint that cannot be loaded
    (damaged, not a checkpoint, pickled objects) stops with one line naming it
    (:func:`segtune.files.read_checkpoint_file`), whichever command loads it.
    """

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():  # a remote (fsspec) path: Lightning's own loading
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint_file(path, weights_only=weights_only is not False)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        def write(scratch: Path) -> None:
            with open(scratch, "wb") as f:
                torch.save(checkpoint, f)

        write_atomically(Path(path), write, fsync=True)
