"""Image-encoder outputs computed once per image and reused while the encoder is frozen.

When only the prompt encoder and mask decoder train, the image encoder (most of SAM's compute)
maps the same image to the same features every epoch. :class:`EmbeddingCache` keeps those
features in host memory or in safetensors files, keyed by :func:`cache_key`: a hash of the
encoder's weights (:func:`weights_fingerprint`), the preprocessing, the intensity policy and the
image file's identity, so changing any of them computes new features instead of reusing stale ones.

What is cached is the **vision encoder's own output**, not what ``get_image_embeddings`` returns:
Sam2-family ``get_image_embeddings`` passes the features through the mask decoder's ``conv_s0`` /
``conv_s1`` and adds ``no_memory_embedding``, all of which train. :func:`encode_images` returns the
frozen part and :func:`embedding_inputs` applies the trainable rest on every step, with gradients,
exactly as the model's ``forward`` would from ``pixel_values``.

Per-image sizes (float32, at the presets' input size): SAM / MedSAM 4 MiB; SAM-HQ 16-24 MiB (the
embedding plus the first global-attention block's features, the only intermediate one its decoder
reads); SAM2 84 MiB and Sam3Tracker 108 MiB (every FPN level at 256 channels, the largest at a
quarter of the input size, before ``conv_s0`` shrinks it). Pure torch: no Lightning, no ``segtune.data``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from segtune.models.sanitise import forward_parameters, unwrap

log = logging.getLogger(__name__)

#: Part of every key: bump it when what is cached, or how images become ``pixel_values``, changes,
#: so disk caches written by an older segtune are not read as current.
CACHE_FORMAT = "segtune-embeddings-1"

Encoded = torch.Tensor | list[torch.Tensor]


def weights_fingerprint(module: nn.Module) -> str:
    """A sha256 of ``module``'s class, config, parameters and buffers (names, dtypes, shapes and bytes).

    Cost: one pass over the weights (a copy to host memory first for weights on an accelerator);
    sha256 runs at roughly 0.5-2 GB/s on one core, so about 0.2-0.7 s for ViT-B's 360 MB and
    1.5-5 s for ViT-H's 2.5 GB. Compute it once per stage, not per step.

    Args:
        module: the image encoder.
    """
    digest = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        # the same weights under another window size or attention layout give other features
        digest.update(config.to_json_string().encode())
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        # uint8 view: numpy has no bfloat16, and the bytes are what identifies the weights anyway
        digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def cache_key(
    fingerprint: str, preprocessing_repr: str, intensity_repr: str, image_path: str | Path, extra: str = ""
) -> str:
    """The cache key of one image: a sha256 over everything its encoder features depend on.

    The file is identified by its resolved path, size, modification time (ns) and inode, read with
    one ``stat`` call, not by hashing its content: the training step has only the path (the bytes
    were read in a DataLoader worker), and re-reading every file on every step would cost more than
    the cache saves on small encoders. Any write, touch, or replacement by another file (``mv``,
    ``rsync``) changes the key; only an in-place rewrite that keeps the size and restores the old
    modification time (``cp -p`` over the file) would go unnoticed.

    Args:
        fingerprint: :func:`weights_fingerprint` of the image encoder.
        preprocessing_repr: ``repr`` of the model's preprocessing (input size, resize, normalisation).
        intensity_repr: ``repr`` of the intensity policy that maps the decoded image to [0, 1].
        image_path: the image file.
        extra: anything else the features depend on (e.g. the Trainer's precision).

    Raises:
        FileNotFoundError: the image file is gone.
    """
    path = Path(image_path).resolve()
    stat = path.stat()
    parts = [
        CACHE_FORMAT, fingerprint, preprocessing_repr, intensity_repr, str(path),
        stat.st_size, stat.st_mtime_ns, stat.st_ino, extra,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    # a contiguous CPU copy of one image's row: no view keeping the batch alive, and safetensors
    # writes only contiguous tensors (encoder outputs are often permuted views)
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


class EmbeddingCache:
    """Per-image encoder outputs, in host memory or in one safetensors file per image.

    ``memory`` keeps CPU copies, not accelerator copies: accelerator memory is what training runs
    out of, while moving a cached SAM embedding (4 MiB) to the GPU takes well under a millisecond
    against tens of milliseconds to recompute it. ``disk`` reads the file on every use (the OS
    page cache keeps hot files in memory) and writes each file under a temporary name first, then
    renames it with ``os.replace``: a reader (another DDP process, a later run) sees the whole file
    or none, and two processes writing the same key leave identical files. An unreadable file
    (say, cut short by a crash) counts as a miss and is rewritten.

    Under DDP each process caches the images it is given. Training reshuffles which process gets
    which image every epoch, so a memory cache fills up on every process over several epochs; a
    disk folder that all processes of a node share gives every process every cached image.

    Args:
        mode: ``"memory"`` or ``"disk"``.
        folder: where ``disk`` writes ``<key>.safetensors`` (created on first write).
    """

    def __init__(self, mode: Literal["memory", "disk"], folder: str | Path | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"embedding cache mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and folder is None:
            raise ValueError("embedding cache mode 'disk' needs a folder")
        self.mode = mode
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, tuple[bool, tuple[torch.Tensor, ...]]] = {}
        self.hits = 0
        self.misses = 0
        self.bytes_per_image: int | None = None

    def __len__(self) -> int:
        """Images held in memory (``memory``) or files in the folder (``disk``)."""
        if self.mode == "memory":
            return len(self._memory)
        return len(list(self.folder.glob("*.safetensors"))) if self.folder.is_dir() else 0

    def path(self, key: str) -> Path:
        """The file of ``key`` in ``disk`` mode."""
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def get_or_compute(
        self,
        keys: Sequence[str],
        pixel_values: torch.Tensor | Callable[[list[int]], torch.Tensor],
        compute: Callable[[torch.Tensor], Encoded],
        store: bool = True,
        device: torch.device | str | None = None,
    ) -> Encoded:
        """The encoder outputs of a batch: cached images are read, only the others are computed.

        Args:
            keys: one :func:`cache_key` per image of the batch.
            pixel_values: ``[B, 3, S, S]`` model input (rows of cached images are not used), or a
                function giving the ``[b, 3, S, S]`` rows of the batch indices it is passed, called
                only for the missing images (a batch whose images were not decoded).
            compute: maps ``[b, 3, S, S]`` to one ``[b, ...]`` tensor or a list of them (several
                feature levels); called once per batch, on the missing rows only, and not at all
                when every image is cached.
            store: keep what is computed (False: a single pass that would only fill memory).
            device: where the result goes (default: ``pixel_values``'s device, else the CPU).

        Returns:
            What ``compute`` returns, for the whole batch.
        """
        tensor = isinstance(pixel_values, torch.Tensor)
        if tensor and len(keys) != len(pixel_values):
            raise ValueError(f"embedding cache: {len(keys)} keys for a batch of {len(pixel_values)} images")
        found = [self._read(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            if not tensor:
                rows = pixel_values(missing)
            else:
                rows = pixel_values if len(missing) == len(keys) else pixel_values[missing]
            computed = compute(rows)
            single = isinstance(computed, torch.Tensor)
            levels = (computed,) if single else tuple(computed)
            for j, i in enumerate(missing):
                found[i] = (single, tuple(level[j] for level in levels))  # the batch uses the computed rows as they are
                if store:
                    self._write(keys[i], (single, tuple(_compact(level[j]) for level in levels)))
            if self.bytes_per_image is None:
                self.bytes_per_image = sum(t.numel() * t.element_size() for t in found[missing[0]][1])
        single = found[0][0]
        device = device if device is not None else pixel_values.device if tensor else "cpu"
        batched = []
        for level in range(len(found[0][1])):
            # a freshly computed row sets the dtype, so a batch never mixes dtypes
            dtype = found[missing[0]][1][level].dtype if missing else found[0][1][level].dtype
            batched.append(torch.stack([entry[1][level].to(device, dtype, non_blocking=True) for entry in found]))
        return batched[0] if single else batched

    def _read(self, key: str) -> tuple[bool, tuple[torch.Tensor, ...]] | None:
        if self.mode == "memory":
            return self._memory.get(key)
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                single = (f.metadata() or {}).get("single") == "1"
                return single, tuple(f.get_tensor(str(i)) for i in range(len(f.keys())))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            log.warning("%s: unreadable embedding cache file (%s); computing it again", path, e)
            return None

    def _write(self, key: str, entry: tuple[bool, tuple[torch.Tensor, ...]]) -> None:
        if self.mode == "memory":
            self._memory[key] = entry
            return
        single, tensors = entry
        data = save({str(i): t for i, t in enumerate(tensors)}, metadata={"single": "1" if single else "0"})
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        """Forget the memory entries (files on disk stay; their keys make stale ones unreachable)."""
        self._memory.clear()


# --- what to cache for each model family --------------------------------------------------------
def _family(model: nn.Module) -> Literal["sam", "samhq", "sam2"]:
    if hasattr(model, "no_memory_embedding") and hasattr(getattr(model, "mask_decoder", None), "conv_s0"):
        return "sam2"  # Sam2, Sam3Tracker, EdgeTAM: multi-level FPN features
    params = forward_parameters(model)
    if "image_embeddings" not in params:
        raise ValueError(
            f"{type(model).__name__}.forward takes no image_embeddings: the embedding cache cannot feed it"
        )
    return "samhq" if "intermediate_embeddings" in params else "sam"


def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The frozen image encoder's output for ``pixel_values``: what the cache stores, batch first.

    Sam: ``[embedding]``. SamHQ: ``[embedding, first global-attention block's features]``.
    Sam2 family: every FPN level as the vision encoder returns it (``[B, C, H, W]``), before the
    mask decoder's trainable ``conv_s0``/``conv_s1``.

    Args:
        model: a SAM-family model (PEFT or compile wrappers are looked through).
        pixel_values: ``[B, 3, S, S]``.
    """
    model = unwrap(model)
    family = _family(model)
    if family == "sam2":
        return list(model.vision_encoder(pixel_values, return_dict=True).fpn_hidden_states)
    out = model.vision_encoder(pixel_values)
    if family == "samhq" and out.intermediate_embeddings:
        return [out.last_hidden_state, out.intermediate_embeddings[0]]  # the decoder reads only the first
    return [out.last_hidden_state]


def embedding_inputs(model: nn.Module, encoded: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments that make ``model.forward`` do, from :func:`encode_images`'s output, what it
    does from ``pixel_values``, applying the trainable steps between encoder and decoder.

    Args:
        model: the model ``encoded`` came from.
        encoded: :func:`encode_images`'s output (or the cache's copy of it).
    """
    model = unwrap(model)
    family = _family(model)
    if family == "sam":
        return {"image_embeddings": encoded[0]}
    if family == "samhq":
        return {"image_embeddings": encoded[0], "intermediate_embeddings": list(encoded[1:])}
    # as Sam2Model.get_image_features + forward: project the two high-resolution levels, add the
    # no-memory token to the last level, keep as many levels as the decoder has sizes for
    levels = list(encoded)
    levels[0] = model.mask_decoder.conv_s0(levels[0])
    levels[1] = model.mask_decoder.conv_s1(levels[1])
    levels[-1] = levels[-1] + model.no_memory_embedding.reshape(1, -1, 1, 1)
    return {"image_embeddings": levels[: len(model.backbone_feature_sizes)]}
