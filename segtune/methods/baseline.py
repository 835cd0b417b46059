"""Full fine-tune ("baseline"): train chosen parts of the model, no adapters; and decoder-only training
on a frozen image encoder whose outputs can be cached."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from transformers import PreTrainedModel

from segtune.data.batch import Batch
from segtune.data.images import read_image
from segtune.data.intensity import to_model_range
from segtune.methods.base import SegmentationModule
from segtune.models.embedding_cache import (
    EmbeddingCache,
    cache_key,
    encode_images,
    weights_fingerprint,
)
from segtune.models.sanitise import unwrap
from segtune.preprocessing import preprocess_image

log = logging.getLogger(__name__)

Part = Literal["vision_encoder", "prompt_encoder", "mask_decoder"]
CacheMode = Literal["off", "memory", "disk"]


class FullFinetune(SegmentationModule):
    """Fine-tune the model's weights directly.

    Args:
        model: preset name, local folder or hub id.
        train_parts: which parts train; the others are frozen. The prompt encoder is frozen by
            default, as in MedSAM and lightning-sam: box prompts leave its point and mask embeddings
            without gradient, which DDP refuses unless the strategy is
            ``ddp_find_unused_parameters_true``.
        lr: peak learning rate (full fine-tunes want a small one).
        gradient_clip_val: gradient-norm clipping, on by default for full fine-tunes.
        embedding_cache: with ``vision_encoder`` frozen (not in ``train_parts``), compute each
            image's encoder output once and reuse it in every epoch, in validation and in test:
            ``"memory"`` (host RAM of each process), ``"disk"`` (safetensors files in
            ``embedding_cache_dir``, shared by processes and later runs) or ``"off"``. Keyed by the
            encoder's weights, the preprocessing, the intensity policy, the precision and the image
            file, so a change to any of them recomputes. Refuses training-data augmentations (the
            images must be the same every epoch); prompt jitter is fine. Per image (float32): 4 MiB
            for SAM, 16-24 MiB for SAM-HQ, 84 MiB for SAM2. ``memory`` keeps only what fit
            computes (validate, test and predict alone see each image once). The DataLoader does
            not decode an image the cache holds (training, validation and test datasets; a disk
            cache from an earlier run counts from the first batch): its sample carries masks,
            prompts and sizes, no ``pixel_values``.
        embedding_cache_dir: the ``disk`` cache's folder (default: ``embedding_cache`` in the
            Trainer's ``default_root_dir``, ``runs/embedding_cache``).
        **kwargs: see :class:`~segtune.methods.base.SegmentationModule`.
    """

    def __init__(
        self,
        model: str = "sam-tiny",
        train_parts: list[Part] = ["vision_encoder", "mask_decoder"],  # noqa: B006
        lr: float = 1e-5,
        gradient_clip_val: float | None = 1.0,
        embedding_cache: CacheMode = "off",
        embedding_cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(model=model, lr=lr, gradient_clip_val=gradient_clip_val, **kwargs)
        self.train_parts = list(train_parts)
        if embedding_cache not in ("off", "memory", "disk"):
            raise ValueError(f"model.init_args.embedding_cache must be off, memory or disk, got {embedding_cache!r}")
        self.embedding_cache_mode = embedding_cache
        self.embedding_cache_dir = embedding_cache_dir
        self.embedding_cache: EmbeddingCache | None = None  # made in setup, where the run folder is known
        self._fingerprint: str | None = None
        self._cache_logged = False

    def adapt(self, model: PreTrainedModel, lora_targets: str) -> nn.Module:
        # checked here, not in __init__: the CLI would bury an __init__ error under a config-parsing message
        if self.embedding_cache_mode != "off" and "vision_encoder" in self.train_parts:
            raise ValueError(
                f"embedding_cache: {self.embedding_cache_mode} needs a frozen image encoder: remove vision_encoder "
                "from model.init_args.train_parts or set model.init_args.embedding_cache: off"
            )
        # parameters held by the model itself (Sam3Tracker's no_memory_embedding) belong to no part: frozen
        model.requires_grad_(False)
        for name, child in model.named_children():
            child.requires_grad_(name in self.train_parts)
        return model

    # --- embedding cache -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.embedding_cache_mode == "off" or self._trainer is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and getattr(datamodule, "augmentations", None):
            raise ValueError(
                "embedding_cache needs identical images every epoch: remove data.init_args.augmentations "
                "or set model.init_args.embedding_cache: off"
            )
        # Checkpoint weights are restored after setup: the encoder is fingerprinted at the first step.
        self._fingerprint = None
        if self.embedding_cache is None:
            folder = None
            if self.embedding_cache_mode == "disk":
                folder = Path(self.embedding_cache_dir or Path(self.trainer.default_root_dir) / "embedding_cache")
            self.embedding_cache = EmbeddingCache(self.embedding_cache_mode, folder)

    def forward(self, batch: Batch) -> Any:
        """As the base, with the image encoder's output taken from the cache (computed on a miss)."""
        if self.embedding_cache is None:
            return super().forward(batch)
        return self.forward_encoded(batch, self.encode(batch))

    def encode(self, batch: Batch) -> list[torch.Tensor]:
        """As the base, through the embedding cache when it is on."""
        if self.embedding_cache is None:
            return super().encode(batch)
        cache = self.embedding_cache
        # validate, test and predict see each image once: memory would fill up for nothing (disk helps a rerun)
        store = cache.mode == "disk" or self._trainer is None or self._trainer.state.fn == TrainerFn.FITTING
        paths, keys = self._image_paths(batch), batch.get("image_keys")
        encoded = cache.get_or_compute(
            self._cache_keys(paths, keys), lambda rows: self._pixel_rows(batch, rows), self._encode, store, self.device
        )
        if store:  # the cache now holds every image of the batch: the DataLoader need not decode them again
            for dataset in self._datasets():
                dataset.mark_encoded(paths, keys=keys)
        if not self._cache_logged and cache.bytes_per_image:
            self._cache_logged = True
            if self._trainer is None or self._trainer.is_global_zero:
                self._log_cache_size(cache.bytes_per_image)
        return encoded

    @staticmethod
    def _image_paths(batch: Batch) -> list[str]:
        paths = batch.get("image_paths")
        if not paths:
            raise ValueError("embedding_cache needs the batch's image_paths (a custom dataset must provide image_path)")
        return paths

    def _pixel_rows(self, batch: Batch, rows: list[int]) -> torch.Tensor:
        """The model input of the batch rows whose encoder output the cache lacks."""
        skipped = batch.get("pixels_skipped")
        pixels = batch.get("pixel_values")
        if skipped is None or not skipped[rows].any():
            return pixels if len(rows) == len(pixels) else pixels[rows]
        # not decoded by the DataLoader, yet missing now (its file or cache file changed since it was
        # cached): decoded here, as the dataset decodes it (the cache refuses augmentations)
        keys = batch.get("image_keys") or [""] * len(batch["image_paths"])
        out = []
        for i in rows:
            if not skipped[i]:
                out.append(pixels[i])
                continue
            path, key = batch["image_paths"][i], keys[i]
            log.info("embedding cache: %s %s is no longer cached; decoding it again", path, key)
            # by the dataset that holds it (a volume's slice needs its dataset); a plain image file directly
            decoded = next((px for d in self._datasets() if (px := d.pixels(path, key)) is not None), None)
            if decoded is None and not key:
                image = to_model_range(read_image(Path(path)), self.intensity, path)
                decoded = preprocess_image(image, self.preprocessing)[0]
            if decoded is None:
                raise ValueError(f"{path} {key}: its encoder output left the embedding cache and it is in no dataset")
            out.append(decoded.to(self.device))
        return torch.stack(out)

    def _datasets(self) -> list[Any]:
        """The datasets of this run whose images can skip decoding (predict's automatic masks need the pixels)."""
        datasets = getattr(getattr(self._trainer, "datamodule", None), "datasets", None) or {}
        return [d for stage, d in datasets.items() if stage != "predict" and hasattr(d, "mark_encoded")]

    def _mark_disk_cached(self) -> None:
        """Tell the datasets which images a disk cache already holds (from an earlier run), before they are read."""
        if self.embedding_cache is None or self.embedding_cache.mode != "disk":
            return
        for dataset in self._datasets():
            records = [r for r in dataset.records if r.path.is_file()]  # a missing file fails when read
            paths, keys = [str(r.path) for r in records], [r.image_key for r in records]
            cached = [self.embedding_cache.path(k).is_file() for k in self._cache_keys(paths, keys)]
            hits = [i for i, hit in enumerate(cached) if hit]
            dataset.mark_encoded([paths[i] for i in hits], keys=[keys[i] for i in hits])

    def on_fit_start(self) -> None:
        self._mark_disk_cached()  # checkpoint weights are restored by now, no DataLoader has started

    def on_test_start(self) -> None:
        self._mark_disk_cached()  # after the first batch was read: that one is decoded anyway
        super().on_test_start()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:
            self._mark_disk_cached()

    def _cache_keys(self, paths: list[str], keys: list[str] | None = None) -> list[str]:
        if self._fingerprint is None:
            start = time.perf_counter()
            self._fingerprint = weights_fingerprint(unwrap(self.model).vision_encoder)
            if self._trainer is None or self._trainer.is_global_zero:
                log.info("embedding cache: image encoder fingerprinted in %.1f s", time.perf_counter() - start)
        trainer = self._trainer
        intensity = repr(getattr(getattr(trainer, "datamodule", None), "intensity", None))
        precision = str(trainer.precision) if trainer is not None else ""
        # a volume's slices share its file: the slice (image_keys) is part of each key
        keys = keys or [""] * len(paths)
        return [
            cache_key(self._fingerprint, repr(self.preprocessing), intensity, p, f"{precision}{'|' + k if k else ''}")
            for p, k in zip(paths, keys, strict=True)
        ]

    def _encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        encoder = unwrap(self.model).vision_encoder
        training = encoder.training
        # frozen: train-mode layers (dropout, batch-norm statistics) must not change what is cached
        encoder.eval()
        try:
            with torch.no_grad():
                return encode_images(self.model, pixel_values)
        finally:
            encoder.train(training)

    def _log_cache_size(self, per_image: int) -> None:
        datasets = getattr(getattr(self._trainer, "datamodule", None), "datasets", None) or {}
        images = sum(len(d) for d in datasets.values())  # each DDP process caches about 1/world_size of them
        where = "host memory of each process" if self.embedding_cache.mode == "memory" else self.embedding_cache.folder
        total = f"; about {per_image * images / 2**30:.3g} GiB for the {images} images of this run" if images else ""
        log.info("embedding cache in %s: %.3g MiB per image%s", where, per_image / 2**20, total)

    def untuned(self) -> FullFinetune:
        """As the base; with the embedding cache on, the untuned model shares it and this run's trainer.

        The encoder is frozen, so the untuned model's is the same pretrained one: it reads (and, on
        disk, fills) the same cache entries, and a row the DataLoader did not decode because the cache
        holds it is decoded for it as for this module, never scored from the batch's zero padding.
        """
        module = super().untuned()
        if self.embedding_cache is not None:
            module.embedding_cache = self.embedding_cache
            module._trainer = self._trainer  # for the cache keys (precision, intensity) and the datasets
        return module  # type: ignore[return-value]

    def on_fit_end(self) -> None:
        if self.embedding_cache is not None and self.embedding_cache.mode == "memory":
            self.embedding_cache.clear()  # a test or predict run in the same process does not read them
            for dataset in self._datasets():
                dataset.clear_encoded()

    def on_train_epoch_end(self) -> None:
        cache = self.embedding_cache
        if cache is not None:
            who = f" (process {self.global_rank})" if self.trainer.world_size > 1 else ""
            log.info("embedding cache%s: %d images read from the cache, %d computed", who, cache.hits, cache.misses)
            cache.hits = cache.misses = 0


class DecoderOnly(FullFinetune):
    """Train the mask decoder on a frozen image encoder whose outputs are cached.

    The image encoder runs once per image (and once more per change of weights, preprocessing,
    intensity policy or file), so epochs after the first cost only the decoder.

    Args:
        model: preset name, local folder or hub id.
        train_parts: the parts that train; ``vision_encoder`` is refused. The prompt encoder is frozen
            by default: box prompts leave its mask and point embeddings unused, which DDP refuses
            without ``find_unused_parameters``.
        embedding_cache: ``"memory"``, ``"disk"`` or ``"off"``; see :class:`FullFinetune`.
        lr: peak learning rate (only the small decoder trains: the base default, not the full
            fine-tune's 1e-5).
        **kwargs: see :class:`FullFinetune` and :class:`~segtune.methods.base.SegmentationModule`.
    """

    #: The frozen encoder is the pretrained one, rebuilt from ``model`` when a checkpoint loads: each
    #: checkpoint stores the decoder alone (ViT-B: 16 MB instead of 375 MB, written every epoch).
    trainable_only_checkpoint = True

    def __init__(
        self,
        model: str = "sam-tiny",
        train_parts: list[Part] = ["mask_decoder"],  # noqa: B006
        embedding_cache: CacheMode = "memory",
        lr: float = 1e-4,
        **kwargs,
    ) -> None:
        super().__init__(model=model, train_parts=train_parts, embedding_cache=embedding_cache, lr=lr, **kwargs)

    def adapt(self, model: PreTrainedModel, lora_targets: str) -> nn.Module:
        if "vision_encoder" in self.train_parts:
            raise ValueError(
                "DecoderOnly keeps the image encoder frozen: remove vision_encoder from model.init_args.train_parts "
                "or use segtune.methods.FullFinetune"
            )
        return super().adapt(model, lora_targets)
