"""The batch contract: only forward's named parameters reach the model."""

from __future__ import annotations

import logging

import pytest
import torch

from segtune.models.adapters import add_lora
from segtune.models.loading import load_model
from segtune.models.sanitise import Sanitiser, forward_parameters

JUNK = {
    "attention_mask": torch.ones(1, 4),
    "original_sizes": torch.tensor([[256, 256]]),
    "image_mask": torch.ones(1, 256, 256),
    "metadata": {"source": "x"},
    "labels": torch.zeros(1, 1, 64, 64),
    "file_name": ["a.jpg"],
}


def _batch(size: int) -> dict:
    return {
        "pixel_values": torch.randn(1, 3, size, size),
        "input_boxes": torch.tensor([[[10.0, 10.0, 90.0, 90.0]]]),
        **JUNK,
    }


def test_sam2_fails_on_leaked_attention_mask_and_sanitiser_fixes_it() -> None:
    model, pre, _ = load_model("sam2-tiny")
    batch = _batch(pre.image_size)
    with pytest.raises(TypeError, match="multiple values for keyword argument 'attention_mask'"):
        model(**batch, multimask_output=False)
    out = model(**Sanitiser(model)(batch), multimask_output=False)
    assert out.pred_masks.shape[:2] == (1, 1)


def test_signature_is_read_through_peft(caplog: pytest.LogCaptureFixture) -> None:
    model, pre, targets = load_model("sam-tiny")
    wrapped = add_lora(model, targets)
    assert forward_parameters(wrapped) == forward_parameters(model)
    assert {"pixel_values", "input_boxes", "input_points", "input_labels", "image_embeddings"} <= forward_parameters(
        wrapped
    )
    sanitise = Sanitiser(wrapped)
    with caplog.at_level(logging.INFO, logger="segtune.models.sanitise"):
        inputs = sanitise(_batch(pre.image_size))
        sanitise(_batch(pre.image_size))
    assert set(inputs) == {"pixel_values", "input_boxes"}
    reports = [r for r in caplog.records if "kept as metadata" in r.getMessage()]
    assert len(reports) == 1 and "attention_mask" in reports[0].getMessage()


def test_missing_image_or_prompt_is_a_clear_error() -> None:
    model, pre, _ = load_model("sam-tiny")
    sanitise = Sanitiser(model)
    batch = _batch(pre.image_size)
    with pytest.raises(ValueError, match="no image input"):
        sanitise({k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="no prompt"):
        sanitise({k: v for k, v in batch.items() if k != "input_boxes"})
    # a typo is not a prompt: HF would silently run without one
    with pytest.raises(ValueError, match="no prompt"):
        sanitise({"pixel_values": batch["pixel_values"], "input_box": batch["input_boxes"]})
