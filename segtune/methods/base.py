"""The LightningModule every adaptation method shares: step, loss, metrics, optimiser, checkpoints.

A method (full fine-tune, LoRA, QLoRA) subclasses it and overrides :meth:`load` and/or
:meth:`adapt` only: what differs is how the model is built, never how it is trained or scored.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MetricCollection
from transformers import PreTrainedModel

from segtune.amg import AutoMaskConfig, AutoMaskGenerator
from segtune.click_rounds import ClickScoring, click_curves
from segtune.click_scores import click_score_names, curve_scores
from segtune.click_training import click_training_step
from segtune.data.batch import Batch
from segtune.data.images import read_image
from segtune.data.intensity import IntensityPolicy, to_model_range
from segtune.data.prompts import ClickTraining
from segtune.files import read_checkpoint_file
from segtune.loss import SamLoss
from segtune.metrics import SCORES, EmptyPredictions, segmentation_metrics
from segtune.models.adapters import freeze_unreached
from segtune.models.embedding_cache import embedding_inputs, encode_images
from segtune.models.fast_attention import install_fast_attention
from segtune.models.loading import enable_checkpointing, load_model
from segtune.models.packing import PackedPrompts
from segtune.models.sanitise import Sanitiser
from segtune.postprocess import EmptyTarget, ImagePrediction, InstanceScores, predictions, score_batch
from segtune.preprocessing import Preprocessing
from segtune.propagation import StopRule
from segtune.reports import IMAGE_SCORES, instance_rows
from segtune.volume_scoring import (
    MEMORY_CLICKS,
    StopChoice,
    VolumeScoring,
    case_report_rows,
    check_propagation,
    choose_stop_on,
    evaluate_volumes,
    predict_volumes,
    score_cases,
    update_case_metrics,
    volume_score_names,
)

log = logging.getLogger(__name__)

DEFAULT_AMG = AutoMaskConfig()
DEFAULT_VOLUME_SCORING = VolumeScoring()
DEFAULT_CLICK_SCORING = ClickScoring()


class SegmentationModule(LightningModule):
    """Fine-tunes a SAM-family model on prompted instance masks.

    Args:
        model: preset name (``segtune models`` lists them), local folder or hub id.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        scheduler: ``"cosine"`` decays to 0 over the run; ``"constant"`` keeps ``lr``.
        multimask_output: predict 3 masks per prompt and train the best one (SAM's ambiguity
            handling); evaluation then keeps the mask with the highest predicted IoU.
        mask_loss: ``"focal"`` (SAM) or ``"bce"``.
        mask_weight: weight of the focal/BCE term (SAM: 20).
        dice_weight: weight of the Dice term (SAM: 1).
        iou_weight: weight of the IoU-head MSE (SAM: 1).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        fast_attention: compute the image encoder's attention with its relative-position bias folded
            into one unmasked SDPA call, instead of HF's dense ``(heads, N, N)`` bias (SAM, SAM-HQ,
            MedSAM, SlimSAM; other families have no such bias and are unchanged). Same results
            within float tolerance; see :mod:`segtune.models.fast_attention`.
        gradient_clip_val: clip the gradient norm to this when the Trainer sets no
            ``gradient_clip_val`` of its own (None: no clipping).
        nonfinite_loss: on a NaN or infinite training loss, ``"stop"`` training with a message
            naming the step and the batch's files (the last checkpoint is kept as it was), or
            ``"skip"`` the batch with a warning.
        empty_target: how an instance whose ground truth and prediction are both empty counts in
            Dice and IoU: ``"exclude"`` leaves it out of the means (nnU-Net's convention: there was
            nothing to segment, so it says nothing about the model), ``"one"`` counts it as 1.0.
            A mask predicted on an empty ground truth scores 0 either way.
        amg: automatic mask generation, which ``segtune predict`` runs on ``data.predict_images``
            given without ``data.predict_prompts`` (see :class:`segtune.amg.AutoMaskConfig`).
        volume_scoring: how volumetric data (``layout: volumes``) are scored and predicted: box or
            (SAM2 family) memory propagation, NSD tolerance (see :class:`segtune.volume_scoring.VolumeScoring`).
        clicks: corrective click rounds in validation and test (0: none, as before). Each
            instance starts from its first prompt; each round adds a click where its mask is wrong and calls
            the model with the first prompt, every click so far and the previous mask logits. Dice and IoU
            after each click, the curve's AUC, gain and NoC@85/90 are logged and reported
            (:mod:`segtune.click_rounds`, :mod:`segtune.click_scores`). Volumes: one 3D click per class and
            round, its slice predicted again and propagated from; volume Dice and NSD after each click
            (:mod:`segtune.volume_clicks`; box propagation only).
        click_scoring: where clicks go and whether the previous mask is fed back
            (:class:`segtune.click_rounds.ClickScoring`).
    """

    #: LoRA and QLoRA store only trainable weights; the frozen base is rebuilt from ``model``.
    trainable_only_checkpoint: bool = False
    #: The metric the best checkpoint, the exported adapter and early stopping follow, and its mode.
    monitor: str = "val_dice"
    mode: Literal["min", "max"] = "max"

    def __init__(
        self,
        model: str = "sam-tiny",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        scheduler: Literal["cosine", "constant"] = "cosine",
        multimask_output: bool = False,
        mask_loss: Literal["focal", "bce"] = "focal",
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        fast_attention: bool = True,
        gradient_clip_val: float | None = None,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        empty_target: EmptyTarget = "exclude",
        amg: AutoMaskConfig = DEFAULT_AMG,
        volume_scoring: VolumeScoring = DEFAULT_VOLUME_SCORING,
        clicks: int = 0,
        click_scoring: ClickScoring = DEFAULT_CLICK_SCORING,
    ) -> None:
        super().__init__()
        # AdamW would find these only after the run folder is made, in a message that names no option
        for key, value, ok, need in (
            ("lr", lr, lr > 0, "> 0"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"),
            ("clicks", clicks, isinstance(clicks, int) and clicks >= 0, "an integer >= 0"),
        ):
            if not ok:
                raise ValueError(f"model.init_args.{key} must be {need}, got {value}")
        # amg, volume_scoring and the clicks are how predict and scoring run, not part of the trained model:
        # a checkpoint does not carry them
        self.save_hyperparameters(ignore=["amg", "volume_scoring", "clicks", "click_scoring"])
        self.amg = amg
        self.volume_scoring = volume_scoring
        self.clicks = clicks
        self.click_scoring = click_scoring
        self.stop_choice = StopChoice()
        self.chosen_stop: StopRule | None = None  # box2d: chosen at each validation, kept in checkpoints
        self.automatic_masks = False
        self.model_name = model
        self.loss = SamLoss(mask_loss, mask_weight, dice_weight, iou_weight)
        self.model: nn.Module | None = None
        self.preprocessing: Preprocessing | None = None
        self.class_names: list[str] = []
        self.click_training = ClickTraining()
        # what an evaluation scores: per instance for images; volumes per case and class (set in setup)
        self.evaluation_scores: tuple[str, ...] = SCORES
        self.evaluation_unit = "image"
        self._collapse_warned = False
        self._collapsed_before = False  # the previous validation epoch predicted nothing either
        if self.trainable_only_checkpoint:
            self.strict_loading = False  # frozen weights are rebuilt, not loaded: checked in on_load_checkpoint

    # --- what a method overrides -------------------------------------------------------------
    def load(self) -> tuple[PreTrainedModel, Preprocessing, str]:
        """Load the pretrained model; returns it, its preprocessing and its default LoRA targets."""
        return load_model(self.model_name)

    def adapt(self, model: PreTrainedModel, lora_targets: str) -> nn.Module:
        """Freeze, wrap or quantise ``model`` for the method. The base trains everything."""
        return model

    # --- building ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model once, before the Trainer restores a checkpoint into it."""
        if self.model is not None:
            return
        model, self.preprocessing, targets = self.load()
        # from_pretrained returns eval mode; training runs in train mode (Lightning warns otherwise).
        # TinyViT's BatchNorm keeps the checkpoint's statistics by design (FrozenStatisticsBatchNorm2d).
        model.train()
        if self.hparams.gradient_checkpointing:
            enable_checkpointing(model)
        if self.hparams.fast_attention:
            fused = install_fast_attention(model)
            if fused:
                log.info("fast attention: %d image-encoder attention layers use the folded rel-pos SDPA", fused)
        self.model = self.adapt(model, targets)
        unreached = freeze_unreached(self.model)
        if unreached:
            log.info("frozen: %d parameters segtune's training never reaches (e.g. %s)", len(unreached), unreached[0])
        self.sanitise = Sanitiser(self.model)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        log.info(
            "%s %s: %s trainable of %s parameters (%.2f%%)",
            type(self).__name__, self.model_name, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
        )  # fmt: skip

    def setup(self, stage: str) -> None:
        self.configure_model()
        check_propagation(self)  # e.g. propagation: memory on a SAM: one line before any work
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.class_names = list(getattr(datamodule, "class_names", None) or ["object"])
        self.automatic_masks = stage == "predict" and bool(getattr(datamodule, "automatic_masks", False))
        self.intensity = getattr(datamodule, "intensity", None) or IntensityPolicy()
        # data.init_args.prompts.clicks: training steps after simulated click rounds (segtune.click_training)
        self.click_training = getattr(getattr(datamodule, "prompts", None), "clicks", None) or ClickTraining()
        # volumes are scored per case and class (segtune.volume_scoring), images per instance
        volumetric = bool(getattr(datamodule, "volumetric", False))
        if volumetric and self.clicks and self.volume_scoring.propagation != "box":
            raise ValueError(MEMORY_CLICKS)
        self.evaluation_scores = (
            volume_score_names(self.clicks) if volumetric else (*SCORES, *click_score_names(self.clicks))
        )
        self.evaluation_unit = "case" if volumetric else "image"
        self.val_metrics = self.evaluation_metrics("val_")
        self.test_metrics = self.evaluation_metrics("test_")
        self.val_empty = EmptyPredictions()
        self.test_empty = EmptyPredictions()

    # --- the step --------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Any:
        """Run the model on the inputs its ``forward`` declares; the rest of ``batch`` is metadata."""
        inputs = self.sanitise(batch)
        inputs["multimask_output"] = self.hparams.multimask_output
        return self.model(**inputs)

    def encode(self, batch: Batch) -> list[torch.Tensor]:
        """The image encoder's output for the batch's ``pixel_values``, as :meth:`forward_encoded` takes it
        (:func:`~segtune.models.embedding_cache.encode_images`)."""
        return encode_images(self.model, batch["pixel_values"])

    def forward_encoded(self, batch: Batch, encoded: list[torch.Tensor]) -> Any:
        """:meth:`forward` from the image encoder's output for ``batch`` instead of its pixels.

        Args:
            batch: the batch (its ``pixel_values`` are not read).
            encoded: :func:`~segtune.models.embedding_cache.encode_images` of this module's model on
                the batch's pixels (the embedding cache's entries, or a volume's slices kept while it
                is scored).
        """
        embeddings = embedding_inputs(self.model, encoded)
        # padding prompts are not decoded: each real prompt runs as a one-prompt image (segtune.models.packing)
        packed = PackedPrompts.of(batch.get("prompt_valid"))
        if packed is not None:
            embeddings = {k: packed.images_of(v) for k, v in embeddings.items()}
            batch = {**batch, **packed.prompts(batch)}
        # pixel_values=None: the sanitiser drops it, so the model runs from the embeddings alone
        out = SegmentationModule.forward(self, {**batch, "pixel_values": None, **embeddings})
        return out if packed is None else packed.unpack(out)

    def _loss(self, out: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return self.loss(out.pred_masks, out.iou_scores, batch["low_res_masks"], batch["prompt_valid"])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        if self.click_training.rounds:  # the loss on the prompts of a randomly drawn click round
            out, targets, valid, rounds = click_training_step(self, batch, self.click_training)
            losses = self.loss(out.pred_masks, out.iou_scores, targets, valid)
            self.log("train_click_round", float(rounds), batch_size=len(batch["image_ids"]))
        else:
            losses = self._loss(self(batch), batch)
        if not torch.isfinite(losses["loss"]):
            return self._nonfinite(losses["loss"], batch)
        n = len(batch["image_ids"])
        self.log("train_loss", losses["loss"], prog_bar=True, batch_size=n)
        self.log_dict({f"train_loss/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=n)
        return losses["loss"]

    def _nonfinite(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        where = f"training loss is {loss.item()} at step {self.global_step} (files: {', '.join(batch['file_names'])})"
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(
                f"{where}; training stopped, the last checkpoint is kept. Lower the learning rate, check those "
                "images, or set model.init_args.nonfinite_loss: skip"
            )
        log.warning("%s: batch skipped", where)
        if self.trainer.world_size > 1:
            # every process must run backward in step: a zero loss on the graph adds no gradient
            return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)
        return None  # Lightning skips the optimiser step

    def score(self, batch: Batch) -> tuple[Any, list[ImagePrediction], list[InstanceScores]]:
        """The model's output, masks and per-instance scores for an evaluation batch; nothing logged.

        The one path from a batch to scores: validation, test and the untuned model's scores
        (:mod:`segtune.untuned`) all go through it.
        """
        if not self.clicks:
            out = self(batch)
            predicted = predictions(out, batch, self.preprocessing)
            return out, predicted, score_batch(predicted, batch, self.hparams.empty_target)
        # click rounds re-run the prompt encoder and mask decoder alone: the image is encoded once
        encoded = self.encode(batch)
        out = self.forward_encoded(batch, encoded)
        predicted = predictions(out, batch, self.preprocessing)
        scores = score_batch(predicted, batch, self.hparams.empty_target)
        curves = click_curves(
            self, batch, encoded, out, predicted, self.clicks, self.click_scoring, self.hparams.empty_target
        )
        for image_scores, curve in zip(scores, curves, strict=True):
            image_scores.extra = curve_scores(curve.dice, curve.iou)
        return out, predicted, scores

    def evaluation_metrics(self, prefix: str) -> MetricCollection:
        """The metrics of one evaluation (``val_``, ``test_``, or the untuned model's ``untuned_val_``): each of
        :attr:`evaluation_scores`, overall and per class, on this module's device."""
        return segmentation_metrics(self.class_names, prefix, self.evaluation_scores).to(self.device)

    def score_rows(self, batch: Batch, metrics: MetricCollection | None = None) -> list[dict[str, Any]]:
        """The report rows of an evaluation batch, and the same scores added to ``metrics`` when given; nothing
        logged, none of this module's own metrics or state touched.

        One row per instance (:func:`~segtune.reports.instance_rows`) or, for volumes, per case and class
        (:func:`~segtune.volume_scoring.case_report_rows`), by the paths validation and test take
        (:meth:`score`, :func:`~segtune.volume_scoring.score_cases`): the untuned model's validation pass
        (:mod:`segtune.untuned`) and its rows beside the checkpoint in the test report are made of them.

        Args:
            batch: an evaluation batch (images, or cases: ``"volumes"``).
            metrics: :meth:`evaluation_metrics` to accumulate into.
        """
        if "volumes" in batch:
            cases = score_cases(self, batch)
            names = volume_score_names(self.clicks)
            if metrics is not None:
                update_case_metrics(metrics, cases, scores=names)
            return case_report_rows(cases, self.class_names, names)
        _, predicted, scores = self.score(batch)
        if metrics is not None:
            for i, image_scores in enumerate(scores):
                metrics.update(image_scores.as_dict(), batch["category_ids"][i, : len(image_scores.dice)])
        return self._image_rows(batch, predicted, scores)

    def _image_rows(
        self, batch: Batch, predicted: list[ImagePrediction], scores: list[InstanceScores]
    ) -> list[dict[str, Any]]:
        """The report rows of a scored image batch, one per instance (:func:`~segtune.reports.instance_rows`)."""
        rows = []
        for i, image_scores in enumerate(scores):
            rows += instance_rows(
                int(batch["image_ids"][i]), batch["file_names"][i], image_scores,
                batch["category_ids"][i, : len(image_scores.dice)], predicted[i].scores, self.class_names,
            )  # fmt: skip
        return rows

    def untuned(self) -> SegmentationModule:
        """The same method and ``model`` rebuilt from its pretrained source, with no training, in eval mode.

        LoRA and QLoRA get fresh adapters, which start as the identity (their ``B`` is zero), so the
        model is the base's; full fine-tunes get the pretrained weights. ``self`` is not touched.
        """
        args = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # LightningCLI's _class_path
        module = type(self)(
            **args, amg=self.amg, volume_scoring=self.volume_scoring, clicks=self.clicks,
            click_scoring=self.click_scoring,
        )  # fmt: skip
        module.configure_model()
        module.class_names = list(self.class_names)
        return module.eval()

    def _evaluate(self, batch: Batch, stage: str) -> dict[str, Any]:
        if "volumes" in batch:  # whole cases (layout: volumes): propagated and scored as volumes
            return evaluate_volumes(self, batch, stage)
        out, predicted, scores = self.score(batch)
        n = len(batch["image_ids"])
        self.log(f"{stage}_loss", self._loss(out, batch)["loss"], batch_size=n, sync_dist=True)
        metrics, empty = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_empty")
        for i, image_scores in enumerate(scores):
            metrics.update(image_scores.as_dict(), batch["category_ids"][i, : len(image_scores.dice)])
            empty.update(predicted[i].masks, batch["masks"][i])
        # For callbacks (test report, validation pictures, the untuned comparison): the same scores, never
        # recomputed, and the report rows made of them (as volumes' steps return theirs)
        return {"predictions": predicted, "scores": scores, "report_rows": self._image_rows(batch, predicted, scores),
                "report_scores": (*IMAGE_SCORES, *click_score_names(self.clicks)), "report_unit": "image"}  # fmt: skip

    def _log_metrics(self, stage: str) -> None:
        collection = getattr(self, f"{stage}_metrics")
        values = collection.compute()
        main = {f"{stage}_dice", f"{stage}_iou"}
        self.log_dict({k: v for k, v in values.items() if k in main}, prog_bar=True)
        self.log_dict({k: v for k, v in values.items() if k not in main})
        collection.reset()
        self._check_collapse(stage)

    def _check_collapse(self, stage: str) -> None:
        """Warn once when every prediction is empty while ground truth is not: in test, or in two validation
        epochs in a row (a first empty validation is common early in a run: it is logged, not warned)."""
        empty = getattr(self, f"{stage}_empty")
        counts = {k: int(v) for k, v in empty.compute().items()}
        empty.reset()
        if self.trainer.sanity_checking:
            return
        collapsed = counts["targets"] > 0 and counts["predicted"] == 0
        persisted = stage == "test" or self._collapsed_before
        if stage == "val":
            self._collapsed_before = collapsed
        if not collapsed or self._collapse_warned or not self.trainer.is_global_zero:
            return
        name = {"val": "validation", "test": "test"}[stage]
        what = f"every {name} prediction is empty (0 of {counts['targets']} instances with a ground-truth mask got one)"
        if not persisted:
            log.info(
                "epoch %d: %s; common in the first epochs of a run (a random or new decoder starts near background); "
                "a warning follows if the next validation is empty too", self.current_epoch, what,
            )  # fmt: skip
            return
        self._collapse_warned = True
        log.warning(
            "epoch %d: %s%s: the model predicts background everywhere. Try a larger model.init_args.dice_weight "
            "against mask_weight (an empty mask scores Dice 0), a larger input or crops so objects cover more of it "
            "(albumentations RandomCrop, RandomResizedCrop), or fewer prompts per image "
            "(data.init_args.prompts.max_instances); not repeated for later epochs",
            self.current_epoch, what, "" if stage == "test" else ", as in the validation before",
        )  # fmt: skip

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        chosen = self.stop_choice.finish()
        if chosen is not None and not self.trainer.sanity_checking:
            # box2d: the stop rule chosen on this validation is used from now on and kept in the checkpoint
            self.chosen_stop = chosen
            self.log_dict({f"val_stop_{key}": value for key, value in asdict(chosen).items()})

    def on_test_start(self) -> None:
        self.choose_stop_for_test(self.trainer.datamodule)

    def choose_stop_for_test(self, datamodule: Any) -> None:
        """``box2d`` with ``choose_stop``, no rule chosen yet (the untuned model, or a checkpoint from before):
        choose the stop rule on the validation split of ``datamodule``, never on the test split."""
        scoring = self.volume_scoring
        if not getattr(datamodule, "volumetric", False) or not scoring.chooses_stop:
            return
        if self.chosen_stop is not None:  # chosen on the validation split of the checkpoint's fit
            return
        if "validate" not in datamodule.datasets:
            datamodule.setup("validate")
        self.eval()
        chosen = choose_stop_on(self, datamodule.val_dataloader())
        if chosen is None:
            log.info("box2d: no validation volumes to choose a stop rule on; volume_scoring.stop is used")
            return
        self.chosen_stop = chosen
        log.info("box2d stop rule chosen on the validation split: %s", chosen)

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[ImagePrediction]:
        """Masks at each image's original resolution and their predicted IoU: one per prompt, or, for
        images without prompts, every mask automatic mask generation finds (class -1: none)."""
        if "volumes" in batch:  # whole cases: label volumes propagated from the given prompts
            return predict_volumes(self, batch)
        if self.automatic_masks:
            return self._automatic_masks(batch)
        return [
            ImagePrediction(p.masks.cpu(), p.scores.cpu()) for p in predictions(self(batch), batch, self.preprocessing)
        ]

    def _automatic_masks(self, batch: Batch) -> list[ImagePrediction]:
        generate = AutoMaskGenerator(self.model, self.preprocessing, self.amg, self.hparams.multimask_output)
        out = []
        for i, path in enumerate(batch["image_paths"]):
            # crops are cut from the original pixels, decoded as the dataset decodes them
            image = to_model_range(read_image(Path(path)), self.intensity, path) if self.amg.crop_n_layers else None
            resized = (int(batch["reshaped_sizes"][i, 0]), int(batch["reshaped_sizes"][i, 1]))
            original = (int(batch["original_sizes"][i, 0]), int(batch["original_sizes"][i, 1]))
            found = generate(batch["pixel_values"][i], resized, original, image)
            classes = torch.full((len(found.scores),), -1, dtype=torch.long)
            out.append(ImagePrediction(found.masks.cpu(), found.scores.cpu(), classes))
        return out

    # --- optimiser and checkpoints ---------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        # foreach: one call per operation over all tensors; torch turns it on only for CUDA tensors by
        # default, but it gives the same numbers on CPU and saves ~2 ms a step over the quickstart's 144
        # LoRA tensors
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, foreach=True)
        if self.hparams.scheduler == "constant" and not self.hparams.warmup_steps:
            return optimizer
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup_steps
        cosine = self.hparams.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.chosen_stop is not None:
            checkpoint["volume_stop"] = asdict(self.chosen_stop)
        if self.trainable_only_checkpoint:
            keep = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        if "volume_stop" in checkpoint:  # box2d's stop rule, chosen on the validation split of this fit
            self.chosen_stop = StopRule(**checkpoint["volume_stop"])
            if self.volume_scoring.prompt == "box2d":
                log.info("box2d stop rule chosen on the validation split of the checkpoint's fit: %s", self.chosen_stop)
        if not self.trainable_only_checkpoint:
            return
        own = self.state_dict()
        unexpected = sorted(set(checkpoint["state_dict"]) - set(own))
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(checkpoint["state_dict"]))
        if unexpected or missing:
            raise ValueError(
                f"checkpoint does not match {type(self).__name__}({self.model_name!r}): "
                f"{len(missing)} trainable weights missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )


def load_method(ckpt_path: str | Path) -> SegmentationModule:
    """Rebuild the method module a ``segtune fit`` checkpoint was written by, with its weights.

    The class comes from the checkpoint's ``_class_path`` (written by LightningCLI) and must be an
    already imported subclass of :class:`SegmentationModule`: nothing named in a checkpoint is
    imported or executed. ``SegmentationModule.load_from_checkpoint`` alone would drop the class
    path and build the base class.

    Raises:
        ValueError: the checkpoint names no segtune method.
    """
    checkpoint = read_checkpoint_file(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    module_path, _, name = str(hparams.get("_class_path", "")).rpartition(".")
    cls = getattr(sys.modules.get(module_path), name, None)
    if not (isinstance(cls, type) and issubclass(cls, SegmentationModule)):
        raise ValueError(f"{ckpt_path}: not a segtune checkpoint (method class {hparams.get('_class_path')!r})")
    with warnings.catch_warnings():
        # A LoRA checkpoint holds only trainable weights: Lightning would list every frozen one as
        # missing. on_load_checkpoint has already checked that no trainable weight is missing.
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        module = cls.load_from_checkpoint(ckpt_path, map_location="cpu")
    module.configure_model()
    return module
