"""The batch contract: only what a model's ``forward`` names reaches it.

HF SAM forwards take ``**kwargs``. Sam and SamHQ silently ignore unknown keys (a typo such as
``input_box=`` trains with no prompt); Sam2 and Sam3Tracker forward them to attention and fail with
``got multiple values for keyword argument 'attention_mask'``. The sanitiser reads the named
parameters of the wrapped model's ``forward`` (through PEFT and ``torch.compile`` wrappers), passes
those and keeps everything else as metadata for the loss and metrics.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

IMAGE_INPUTS = ("pixel_values", "image_embeddings")
PROMPT_INPUTS = ("input_boxes", "input_points", "input_masks")


def unwrap(model: nn.Module) -> nn.Module:
    """The model under PEFT and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def forward_parameters(model: nn.Module) -> frozenset[str]:
    """Names ``forward`` declares explicitly, without ``*args``/``**kwargs``."""
    params = inspect.signature(unwrap(model).forward).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in named)


class Sanitiser:
    """Filters a batch down to the keyword arguments a model's ``forward`` declares.

    Args:
        model: the model (plain, PEFT-wrapped or compiled) whose ``forward`` receives the batch.
    """

    def __init__(self, model: nn.Module) -> None:
        self.allowed = forward_parameters(model)
        self.model_name = type(unwrap(model)).__name__
        self._reported: set[frozenset[str]] = set()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Return the model inputs of ``batch``.

        Raises:
            ValueError: when the batch has no image input or no prompt.
        """
        inputs = {k: v for k, v in batch.items() if k in self.allowed and v is not None}
        if not any(k in inputs for k in IMAGE_INPUTS):
            raise ValueError(
                f"batch has no image input for {self.model_name}: expected one of {', '.join(IMAGE_INPUTS)}, "
                f"got keys {', '.join(sorted(batch))}"
            )
        if not any(k in inputs for k in PROMPT_INPUTS):
            raise ValueError(
                f"batch has no prompt for {self.model_name}: expected one of {', '.join(PROMPT_INPUTS)}, "
                f"got keys {', '.join(sorted(batch))}"
            )
        stripped = frozenset(batch) - frozenset(inputs)
        if stripped not in self._reported:
            self._reported.add(stripped)
            log.info("%s.forward gets %s; kept as metadata: %s", self.model_name, sorted(inputs), sorted(stripped))
        return inputs
