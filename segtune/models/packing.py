"""Decode real prompts only: a batch's padding prompts never reach the mask decoder.

A batch holds ``N`` prompt slots per image, ``N`` being the most instances any of its images has;
``prompt_valid`` marks the real ones. SAM-family models decode every slot (the image embedding is
repeated for each), so a batch of one 30-instance image and seven 1-instance ones decodes 240 slots
for 37 prompts. From the image encoder's output, each real prompt can instead be decoded as its own
one-prompt image: the decoder treats every (image, prompt) pair on its own, so the real prompts'
masks are the same, and padding costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: Batch entries that hold one row per prompt slot, ``[B, N, ...]``.
PROMPT_KEYS = ("input_boxes", "input_points", "input_labels", "input_masks")


@dataclass(frozen=True)
class PackedPrompts:
    """Where each real prompt of a ``[B, N]`` batch sits: image ``images[p]``, slot ``slots[p]``."""

    images: torch.Tensor
    slots: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, valid: torch.Tensor | None) -> PackedPrompts | None:
        """The packing of a ``[B, N]`` ``prompt_valid``; None when it saves nothing (no padding, or no prompt)."""
        if valid is None or valid.ndim != 2 or bool(valid.all()) or not bool(valid.any()):
            return None
        images, slots = valid.nonzero(as_tuple=True)
        return cls(images, slots, (int(valid.shape[0]), int(valid.shape[1])))

    def prompts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's prompt entries, one real prompt per row: ``[P, 1, ...]``."""
        return {
            k: batch[k][self.images, self.slots].unsqueeze(1)
            for k in PROMPT_KEYS
            if isinstance(batch.get(k), torch.Tensor) and tuple(batch[k].shape[:2]) == self.shape
        }

    def images_of(self, value: Any) -> Any:
        """An image-level input (a ``[B, ...]`` tensor or a list of them) repeated for each real prompt."""
        if isinstance(value, torch.Tensor):
            return value[self.images]
        if isinstance(value, list | tuple):
            return type(value)(self.images_of(v) for v in value)
        return value

    def unpack(self, out: Any) -> Any:
        """The model output for the packed prompts back in the batch's ``[B, N, ...]`` layout (zeros at padding).

        Every tensor field with one row per packed prompt (``[P, 1, ...]``: masks, IoU and object scores)
        is scattered back; other fields are left as they are.
        """
        count = len(self.images)
        for key, value in list(out.items()):
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (count, 1):
                full = value.new_zeros((*self.shape, *value.shape[2:]))
                out[key] = full.index_put((self.images, self.slots), value[:, 0])
        return out
