"""The one batch type, built only by :func:`collate`.

A batch is a plain ``dict`` so Lightning moves its tensors to the device, and so extra keys a
custom dataset adds ride along as metadata. What reaches a model's ``forward`` is decided by the
sanitiser (:mod:`segtune.models.sanitise`), never here.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch


class Sample(TypedDict, total=False):
    """One image as the dataset returns it (``N`` instances)."""

    pixel_values: torch.Tensor  # [3, S, S] model input; absent when the model holds the image's encoder output
    input_boxes: torch.Tensor  # [N, 4] xyxy in the model frame
    input_points: torch.Tensor  # [N, P, 2] xy in the model frame
    input_labels: torch.Tensor  # [N, P] 1 positive, 0 negative
    boxes: torch.Tensor  # [N, 4] xyxy in the original image
    low_res_masks: torch.Tensor  # [N, s, s] float targets for the loss
    masks: torch.Tensor  # [N, H, W] bool ground truth at the original resolution
    category_ids: torch.Tensor  # [N] class index into the datamodule's class_names
    original_size: tuple[int, int]  # (H, W)
    reshaped_size: tuple[int, int]  # (h, w) inside the model input before padding
    image_id: int
    file_name: str
    image_path: str  # the file, for writers that draw on the original image
    image_key: str  # which image of that file (a volume's slice); absent when the file is one image


class Batch(TypedDict, total=False):
    """``B`` images padded to ``N`` prompts each; ``prompt_valid`` marks the real ones.

    Model inputs: ``pixel_values`` ``[B, 3, S, S]``, ``input_boxes`` ``[B, N, 4]``,
    ``input_points`` ``[B, N, P, 2]`` and ``input_labels`` ``[B, N, P]``.
    Metadata: ``prompt_valid`` ``[B, N]`` bool, ``low_res_masks`` ``[B, N, s, s]``, ``boxes``
    ``[B, N, 4]``, ``category_ids`` ``[B, N]`` (-1 on padding), ``original_sizes`` and
    ``reshaped_sizes`` ``[B, 2]``, ``masks`` (a list of ``[N_i, H_i, W_i]`` bool), ``image_ids``,
    ``file_names`` and ``image_paths`` (lists), ``image_keys`` (a list, when the samples have them).

    Images whose samples carry no ``pixel_values`` (the model holds their image-encoder output, see
    :meth:`segtune.data.dataset.InstanceDataset.mark_encoded`) are flagged in ``pixels_skipped``
    ``[B]`` bool; their ``pixel_values`` rows are zeros, and a batch of only such images has no
    ``pixel_values``.
    """

    pixel_values: torch.Tensor
    input_boxes: torch.Tensor
    input_points: torch.Tensor
    input_labels: torch.Tensor
    prompt_valid: torch.Tensor
    low_res_masks: torch.Tensor
    boxes: torch.Tensor
    category_ids: torch.Tensor
    pixels_skipped: torch.Tensor
    original_sizes: torch.Tensor
    reshaped_sizes: torch.Tensor
    masks: list[torch.Tensor]
    image_ids: list[int]
    file_names: list[str]
    image_paths: list[str]
    image_keys: list[str]


def _pad(tensors: list[torch.Tensor], length: int, value: float = 0) -> torch.Tensor:
    out = tensors[0].new_full((len(tensors), length, *tensors[0].shape[1:]), value)
    for i, t in enumerate(tensors):
        out[i, : len(t)] = t
    return out


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, written straight into shared memory inside a DataLoader worker.

    A worker's batch crosses to the main process through shared memory; stacking there directly
    saves one copy of the largest tensor (96 MiB for 8 images at 1024 px), as ``default_collate`` does.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def collate(samples: list[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`, padding every image to the most prompts in the batch.

    Padding boxes are ``[0, 0, 1, 1]`` so the model still sees a well-formed prompt; loss and
    metrics skip them through ``prompt_valid``.
    """
    # At least one prompt: a batch whose images have no instance (an empty mask file, a predict
    # image without prompts) still runs the model on a padding prompt instead of a 0-length tensor.
    n = max(1, *(len(s["category_ids"]) for s in samples))
    batch: dict[str, Any] = {
        "prompt_valid": _pad([torch.ones(len(s["category_ids"]), dtype=torch.bool) for s in samples], n, False),
        "low_res_masks": _pad([s["low_res_masks"] for s in samples], n),
        "boxes": _pad([s["boxes"] for s in samples], n),
        "category_ids": _pad([s["category_ids"] for s in samples], n, -1),
        "original_sizes": torch.tensor([s["original_size"] for s in samples]),
        "reshaped_sizes": torch.tensor([s["reshaped_size"] for s in samples]),
        "masks": [s["masks"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "file_names": [s["file_name"] for s in samples],
        "image_paths": [s["image_path"] for s in samples],
    }
    if "image_key" in samples[0]:
        batch["image_keys"] = [s.get("image_key", "") for s in samples]
    skipped = [s for s in samples if "pixel_values" not in s]
    if len(skipped) < len(samples):
        first = next(s["pixel_values"] for s in samples if "pixel_values" in s)
        batch["pixel_values"] = _stack([s.get("pixel_values", torch.zeros_like(first)) for s in samples])
    if skipped:
        batch["pixels_skipped"] = torch.tensor(["pixel_values" not in s for s in samples])
    if "input_boxes" in samples[0]:
        boxes = _pad([s["input_boxes"] for s in samples], n)
        boxes[~batch["prompt_valid"]] = torch.tensor([0.0, 0.0, 1.0, 1.0])
        batch["input_boxes"] = boxes
    if "input_points" in samples[0]:
        batch["input_points"] = _pad([s["input_points"] for s in samples], n)
        # -10 is SAM's "not a point" label: padding prompts add nothing to the prompt encoder.
        batch["input_labels"] = _pad([s["input_labels"] for s in samples], n, -10)
    return batch  # type: ignore[return-value]
