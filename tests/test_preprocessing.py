"""Preprocessing matches the HF processor; masks survive the round trip to the model frame and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.postprocess import logits_to_original
from segtune.preprocessing import Preprocessing, preprocess_image, scale_coords


def test_matches_sam_image_processor_on_non_square_image() -> None:
    transformers = pytest.importorskip("transformers")
    processor = transformers.SamProcessor(image_processor=transformers.SamImageProcessorPil())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 451, 3), dtype=np.uint8)
    box = [37.0, 51.0, 402.0, 260.0]
    ref = processor(images=image, input_boxes=[[box]], return_tensors="pt")
    pre = Preprocessing(1024, "longest", "imagenet", 256)
    pixels, resized = preprocess_image(image, pre)
    assert tuple(ref["reshaped_input_sizes"][0].tolist()) == resized
    assert torch.allclose(pixels, ref["pixel_values"][0].float(), atol=1e-4)
    ours = scale_coords(torch.tensor([box]), (300, 451), resized)
    assert torch.allclose(ours, ref["input_boxes"][0].float(), atol=1e-4)


@pytest.mark.parametrize("resize", ["longest", "square"])
def test_mask_round_trip_within_one_pixel(resize: str) -> None:
    pre = Preprocessing(256, resize, "imagenet", 64)
    height, width = 150, 310
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[30:120, 40:200] = True
    resized = pre.resized_shape(height, width)
    # what a perfect model predicts: the mask drawn in the model's low-resolution frame
    frame = torch.zeros(1, 1, pre.image_size, pre.image_size)
    frame[..., : resized[0], : resized[1]] = torch.nn.functional.interpolate(mask[None, None].float(), size=resized)
    low = torch.nn.functional.interpolate(frame, size=(pre.mask_size, pre.mask_size), mode="area")[:, 0]
    back = logits_to_original(low - 0.5, pre, resized, (height, width)) > 0
    assert back.shape == (1, height, width)
    diff = back[0] ^ mask
    ys, xs = diff.nonzero(as_tuple=True)
    # every wrong pixel sits at the border of the drawn rectangle (within the low-res cell size)
    cell = max(height / resized[0], width / resized[1]) * pre.image_size / pre.mask_size
    edge = torch.minimum(
        torch.minimum((ys - 30).abs(), (ys - 120).abs()), torch.minimum((xs - 40).abs(), (xs - 200).abs())
    )
    assert diff.float().mean() < 0.05
    assert (edge <= cell).all()
