"""Largest |difference| between `segtune convert`'s models and the reference implementations.

Builds each native model with its own code (Meta's segment-anything and sam2, MobileSAM's code from
mobilesam-mirror; the `test` extra and noxfile.py install them), fills it with random values,
converts it and runs both on one random image with one box prompt (multimask output), float32 on
the CPU. Prints the largest absolute difference of the image embeddings, the low-resolution mask
logits and the IoU scores. The README quotes its output.

    python benchmarks/convert_equivalence.py tiny vitb mobilesam sam2_512 sam2_1024
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


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny", "mobilesam", "sam2_512"])
