"""Preprocessing matches the HF processor; masks survive the round trip to the model frame and back."""

from __future__ import annotations

import json
from pathlib import Path

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
    pre = Preprocessing(1024, "longest", 256)
    pixels, resized = preprocess_image(image, pre)
    assert tuple(ref["reshaped_input_sizes"][0].tolist()) == resized
    assert torch.allclose(pixels, ref["pixel_values"][0].float(), atol=1e-4)
    ours = scale_coords(torch.tensor([box]), (300, 451), resized)
    assert torch.allclose(ours, ref["input_boxes"][0].float(), atol=1e-4)


@pytest.mark.parametrize("resize", ["longest", "square"])
def test_mask_round_trip_within_one_pixel(resize: str) -> None:
    pre = Preprocessing(256, resize, 64)
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


# --- the input each family's HF processor gives, read from transformers' own source -------------
# (Sam2ImageProcessor and Sam3ImageProcessor need torchvision to import, which this machine lacks,
# so their class attributes are read from the source file rather than from the class.)
FAMILIES = {
    "sam": ("SamConfig", "sam-vit-base"),
    "sam_hq": ("SamHQConfig", "samhq-vit-base"),
    "sam2": ("Sam2Config", "sam2.1-hiera-small"),
    "sam3_tracker": ("Sam3TrackerConfig", "sam3tracker"),
    "edgetam": ("EdgeTamConfig", "edgetam"),
}


def _processor_numbers(class_name: str) -> dict[str, object]:
    """``image_mean``, ``image_std``, ``size`` and ``mask_size`` of an HF image processor class."""
    import ast
    import importlib.util

    from transformers import image_utils

    models = Path(importlib.util.find_spec("transformers.models").submodule_search_locations[0])
    for path in sorted(models.glob("*/image_processing_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                values = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                        name = stmt.targets[0].id
                        if name in ("image_mean", "image_std"):
                            values[name] = tuple(getattr(image_utils, stmt.value.id))
                        elif name in ("size", "mask_size"):
                            values[name] = ast.literal_eval(stmt.value)
                return values
    raise AssertionError(f"{class_name} not found in transformers")


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_presets_and_family_fallbacks_match_the_hf_processor(model_type: str) -> None:
    import transformers

    from segtune.models.adapters import processor_class
    from segtune.models.loading import family_preprocessing
    from segtune.models.presets import PRESETS

    numbers = _processor_numbers(processor_class(model_type))
    config_class, preset = FAMILIES[model_type]
    for pre in (family_preprocessing(getattr(transformers, config_class)()), PRESETS[preset].preprocessing):
        assert pre.image_mean == pytest.approx(numbers["image_mean"])
        assert pre.image_std == pytest.approx(numbers["image_std"])
        size, mask = numbers["size"], numbers["mask_size"]
        if "longest_edge" in size:
            assert (pre.resize, pre.image_size, pre.mask_size) == (
                "longest",
                size["longest_edge"],
                mask["longest_edge"],
            )
        else:
            assert (pre.resize, pre.image_size, pre.mask_size) == ("square", size["height"], mask["height"])


def test_sam3tracker_normalises_with_the_standard_mean_not_imagenet() -> None:
    from segtune.models.presets import PRESETS

    pre = PRESETS["sam3tracker"].preprocessing
    pixels, _ = preprocess_image(np.full((8, 8, 3), 255, np.uint8), pre)
    assert torch.allclose(pixels[:, :8, :8], torch.ones(3, 8, 8))  # (1 - 0.5) / 0.5


def test_processor_config_of_a_checkpoint_wins_over_the_family(tmp_path: Path) -> None:
    from segtune.models.loading import build_random, load_model, preprocessing_for
    from segtune.models.presets import PRESETS

    folder = tmp_path / "ckpt"
    build_random(PRESETS["sam-tiny"]).save_pretrained(folder)
    assert load_model(str(folder))[1].image_mean == pytest.approx((0.485, 0.456, 0.406))  # no file: the family's
    processor = {
        "image_processor_type": "SamImageProcessor", "size": {"longest_edge": 256}, "mask_size": {"longest_edge": 64},
        "pad_size": {"height": 256, "width": 256},
        "do_normalize": True, "image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.6, 0.7],
    }  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    expected = Preprocessing(256, "longest", 64, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7))
    assert load_model(str(folder))[1] == expected
    assert preprocessing_for(str(folder)) == expected  # what the CLI links to the data
    # and the pixels are what HF's processor makes of the same file
    image = np.random.default_rng(0).integers(0, 256, size=(120, 200, 3), dtype=np.uint8)
    hf = transformers_processor(folder)(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(preprocess_image(image, expected)[0], hf.float(), atol=1e-4)
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "size": {"height": 256, "width": 200}}))
    with pytest.raises(ValueError, match="preprocessor_config.json: size .* is not square"):
        load_model(str(folder))


def transformers_processor(folder: Path):
    """The PIL SAM processor as a checkpoint folder configures it (torchvision is not installed here)."""
    from transformers import SamImageProcessorPil

    return SamImageProcessorPil.from_pretrained(folder)


@pytest.mark.parametrize("preset", ["sam-tiny", "sam2-tiny", "sam3tracker-tiny"])
def test_exported_preprocessor_config_names_the_family_processor(preset: str, tmp_path: Path) -> None:
    from transformers.image_processing_base import ImageProcessingMixin

    from segtune.models.adapters import save_pretrained
    from segtune.models.loading import build_random, load_model
    from segtune.models.presets import PRESETS

    pre = Preprocessing(PRESETS[preset].preprocessing.image_size, PRESETS[preset].preprocessing.resize,
                        PRESETS[preset].preprocessing.mask_size, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # fmt: skip
    save_pretrained(build_random(PRESETS[preset]), pre, tmp_path / "out")
    written, _ = ImageProcessingMixin.get_image_processor_dict(str(tmp_path / "out"))
    expected = {
        "sam-tiny": "SamImageProcessor",
        "sam2-tiny": "Sam2ImageProcessor",
        "sam3tracker-tiny": "Sam3ImageProcessor",
    }
    assert written["image_processor_type"] == expected[preset]
    assert load_model(str(tmp_path / "out"))[1] == pre  # read back by segtune
    if preset == "sam-tiny":  # and by HF's AutoImageProcessor (the PIL backend runs without torchvision)
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
        assert tuple(processor.image_mean) == pytest.approx(pre.image_mean)
        assert processor.size["longest_edge"] == pre.image_size
