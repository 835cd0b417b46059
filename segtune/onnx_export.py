"""ONNX export of a SAM-family model, split as SAM deployments run it (no Lightning here).

- ``image_encoder.onnx``: ``pixel_values`` ``[1, 3, S, S]`` -> the image embeddings, once per image.
- ``decoder_boxes.onnx``: the embeddings and ``input_boxes`` ``[1, N, 4]`` -> ``iou_scores``
  ``[1, N, M]`` and ``pred_masks`` ``[1, N, M, s, s]`` (low-resolution logits), many times per image.
- ``decoder_points.onnx``: the same from ``input_points`` ``[1, N, P, 2]`` and ``input_labels``
  ``[1, N, P]`` (1 positive, 0 negative, -10 not a point).
- ``onnx_model.json``: the inputs and outputs of each file, the preprocessing (resize, padding,
  normalisation), how prompts enter the model frame and how logits return to the image.

The encoder output is what the model's ``forward`` takes as ``image_embeddings`` (SAM2 and
Sam3Tracker: three feature levels; SAM-HQ: the embedding and its first intermediate feature map),
so the decoder graphs are the model's own prompt encoder and mask decoder. ``N`` (prompts) and ``P``
(points per prompt) are dynamic. The model must be a plain HF model: merge LoRA first
(:func:`segtune.export.export_command` does).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segtune.models.embedding_cache import embedding_inputs, encode_images
from segtune.models.sanitise import unwrap
from segtune.preprocessing import Preprocessing

log = logging.getLogger(__name__)

#: ONNX opset of the exported graphs (onnxruntime >= 1.17 runs it).
OPSET = 18


def _flatten(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``embedding_inputs``' keyword arguments as named tensors (lists become ``name_0``, ``name_1``, ...)."""
    flat = {}
    for key, value in inputs.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


def _unflatten(names: list[str], tensors: tuple[torch.Tensor, ...], lists: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tensor in zip(names, tensors, strict=True):
        key = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[0] in lists else name
        if key in lists:
            out.setdefault(key, []).append(tensor)
        else:
            out[key] = tensor
    return out


class ImageEncoder(nn.Module):
    """``pixel_values`` -> the model's image-embedding inputs, flattened to a tuple of tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flatten(embedding_inputs(self.model, encode_images(self.model, pixel_values))).values())


class PromptDecoder(nn.Module):
    """The embeddings and box or point prompts -> ``iou_scores`` and low-resolution ``pred_masks``."""

    def __init__(self, model: nn.Module, names: list[str], lists: set[str], prompt: str, multimask: bool) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.lists = lists
        self.prompt = prompt
        self.multimask = multimask

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.names)
        inputs = _unflatten(self.names, args[:n], self.lists)
        if self.prompt == "boxes":
            inputs["input_boxes"] = args[n]
        else:
            inputs["input_points"], inputs["input_labels"] = args[n], args[n + 1]
        out = self.model(**inputs, multimask_output=self.multimask)
        return out.iou_scores, out.pred_masks


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    # The TorchScript exporter: it exports SAM, SAM-HQ, SAM2 and Sam3Tracker as they are; the
    # dynamo exporter (onnxscript) fails on SAM2's data-dependent prompt padding.
    torch.onnx.export(
        module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
        opset_version=OPSET, dynamo=False,
    )  # fmt: skip


@torch.no_grad()
def export_onnx(model: nn.Module, pre: Preprocessing, output: Path, multimask_output: bool = False) -> Path:
    """Write the image encoder, the two prompt decoders and ``onnx_model.json`` into ``output``.

    Args:
        model: a plain (merged) SAM-family model.
        pre: its preprocessing.
        output: the folder to write.
        multimask_output: the decoders return 3 masks per prompt (``M = 3``) or 1 (the output
            the model was fine-tuned on; :class:`~segtune.methods.base.SegmentationModule`'s
            ``multimask_output``).

    Returns:
        The json's path.
    """
    model = unwrap(model).float().eval()
    output.mkdir(parents=True, exist_ok=True)
    size = pre.image_size
    pixel_values = torch.zeros(1, 3, size, size)
    embedded = embedding_inputs(model, encode_images(model, pixel_values))
    flat = _flatten(embedded)
    names = list(flat)
    lists = {k for k, v in embedded.items() if isinstance(v, (list, tuple))}
    _export(ImageEncoder(model), (pixel_values,), output / "image_encoder.onnx", ["pixel_values"], names, {})

    embeddings = tuple(flat.values())
    prompts = {
        "boxes": ((torch.tensor([[[10.0, 10.0, size / 2, size / 2]]]),), ["input_boxes"], {"input_boxes": {1: "N"}}),
        "points": (
            (torch.tensor([[[[size / 3, size / 3], [size / 2, size / 2]]]]), torch.tensor([[[1, 0]]])),
            ["input_points", "input_labels"],
            {"input_points": {1: "N", 2: "P"}, "input_labels": {1: "N", 2: "P"}},
        ),
    }
    files = {}
    for kind, (example, prompt_names, dynamic) in prompts.items():
        path = output / f"decoder_{kind}.onnx"
        decoder = PromptDecoder(model, names, lists, kind, multimask_output)
        outputs = ["iou_scores", "pred_masks"]
        dynamic = {**dynamic, "iou_scores": {1: "N"}, "pred_masks": {1: "N"}}
        _export(decoder, (*embeddings, *example), path, names + prompt_names, outputs, dynamic)
        files[kind] = path.name

    masks = 3 if multimask_output else 1
    description = {
        "model": type(model).__name__,
        "image_encoder": {
            "file": "image_encoder.onnx",
            "inputs": {"pixel_values": [1, 3, size, size]},
            "outputs": {name: list(t.shape) for name, t in flat.items()},
        },
        "decoders": {
            kind: {
                "file": files[kind],
                "inputs": {
                    **{name: list(t.shape) for name, t in flat.items()},
                    **(
                        {"input_boxes": [1, "N", 4]}
                        if kind == "boxes"
                        else {"input_points": [1, "N", "P", 2], "input_labels": [1, "N", "P"]}
                    ),
                },
                "outputs": {"iou_scores": [1, "N", masks], "pred_masks": [1, "N", masks, pre.mask_size, pre.mask_size]},
            }
            for kind in prompts
        },
        "preprocessing": {
            **asdict(pre),
            "steps": [
                "RGB uint8 image [H, W, 3]",
                "resize (bilinear) so that "
                + (
                    "the longest side is image_size, keeping the aspect ratio: h = int(H * s + 0.5), "
                    "w = int(W * s + 0.5) with s = image_size / max(H, W)"
                    if pre.resize == "longest"
                    else "h = w = image_size"
                ),
                "x / 255, then (x - image_mean) / image_std per channel",
                "zero-pad bottom and right to image_size x image_size, channels first, batch of 1",
            ],
            "prompts": "box xyxy and point xy in original pixels, times (w / W, h / H): the resized image's frame",
            "labels": "1 positive point, 0 negative point, -10 not a point (padding)",
        },
        "postprocessing": [
            "pred_masks are logits at mask_size x mask_size; per mask: resize (bilinear) to image_size x image_size",
            "crop [:h, :w] (drop the padding), resize (bilinear) to H x W, mask = logits > 0",
            "with M = 3 masks per prompt, SAM keeps the one with the highest iou_scores",
        ],
        "multimask_output": multimask_output,
        "opset": OPSET,
    }
    path = output / "onnx_model.json"
    path.write_text(json.dumps(description, indent=2) + "\n")
    return path
