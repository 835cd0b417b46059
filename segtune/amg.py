"""Automatic mask generation: a mask for every object of an image that comes without prompts.

SAM's recipe (segment-anything's ``SamAutomaticMaskGenerator``), run through the fine-tuned model:
a grid of single positive points over the image, and optionally over overlapping crops of it for
small objects; each point's masks are kept when the predicted IoU and the stability score pass
their thresholds; duplicates are removed by mask NMS, first within a crop, then across crops
preferring the smaller crop's mask. The image encoder runs once per crop, the prompt encoder and
mask decoder once per ``points_per_batch`` points, so a 1024 px image fits a small GPU.

transformers' ``SamImageProcessor`` has these steps too, but its torch version imports torchvision
at import time and its ``post_process_for_mask_generation`` needs torchvision's ``batched_nms``;
segtune does not depend on torchvision (no CPU build of it goes with every torch). The steps here
are short: the NMS is pycocotools' RLE mask IoU (a kept dependency), so it compares masks, not
their boxes, and never holds more than one points batch at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn

from segtune.models.embedding_cache import embedding_inputs, encode_images
from segtune.postprocess import ImagePrediction, logits_to_original
from segtune.preprocessing import Preprocessing, preprocess_image, scale_coords


@dataclass(frozen=True)
class AutoMaskConfig:
    """How ``segtune predict`` finds masks on images that have no prompts.

    Args:
        points_per_side: the point grid over the image (and over each crop): ``n x n`` points.
        points_per_batch: points sent through the prompt encoder and mask decoder at once; lower
            it when memory is short (each point makes up to 3 masks at the image's full resolution).
        pred_iou_thresh: keep masks whose predicted IoU is above this.
        stability_score_thresh: keep masks whose stability score (IoU of the mask thresholded at
            ``+offset`` and at ``-offset`` logits) is above this.
        stability_score_offset: the logit offset of the stability score.
        mask_nms_thresh: of two masks overlapping more than this (mask IoU), keep the one with the
            higher predicted IoU.
        min_mask_area: drop masks with fewer pixels than this.
        crop_n_layers: also run on crops: layer ``i`` cuts the image into ``2^i x 2^i``
            overlapping crops, each resized to the model input, which finds smaller objects.
        crop_overlap_ratio: overlap of neighbouring crops as a fraction of the image's short side
            (in layer 1; deeper layers scale it down).
        crop_n_points_downscale_factor: layer ``i`` uses ``points_per_side / factor^i`` points per side.
        crop_nms_thresh: mask IoU above which a mask found on a larger crop gives way to one found
            on a smaller crop.
        multimask_output: ask for 3 masks per point (SAM's ambiguity handling) or 1; ``None``
            follows the method's ``multimask_output``, i.e. the output the model was fine-tuned on.
    """

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_nms_thresh: float = 0.7
    min_mask_area: int = 0
    crop_n_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    crop_nms_thresh: float = 0.7
    multimask_output: bool | None = None

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1 or self.crop_n_layers < 0:
            raise ValueError(
                f"amg: points_per_side and points_per_batch must be >= 1 and crop_n_layers >= 0 (got "
                f"{self.points_per_side}, {self.points_per_batch}, {self.crop_n_layers})"
            )


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[int, int, int, int, int]]:
    """``(x0, y0, x1, y1, layer)`` of the whole image (layer 0) and each layer's overlapping crops."""
    boxes = [(0, 0, width, height, 0)]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * min(height, width) * 2 / per_side)
        crop_w = -(-(overlap * (per_side - 1) + width) // per_side)
        crop_h = -(-(overlap * (per_side - 1) + height) // per_side)
        for i, j in product(range(per_side), range(per_side)):
            x0, y0 = (crop_w - overlap) * i, (crop_h - overlap) * j
            boxes.append((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height), layer))
    return boxes


def point_grid(n: int, height: int, width: int) -> torch.Tensor:
    """``[n * n, 2]`` xy points at the centres of an ``n x n`` grid of cells over a ``height x width`` image."""
    centres = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(centres * height, centres * width, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def stability_scores(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """``[K, H, W]`` logits -> ``[K]`` IoU of the mask at ``+offset`` with the mask at ``-offset`` (empty: 0)."""
    inner = (logits > offset).flatten(1).sum(1)
    outer = (logits > -offset).flatten(1).sum(1)
    return inner / outer.clamp(min=1)


def mask_nms(rles: list[dict], priority: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS on masks: indices kept, highest ``priority`` first; a mask overlapping a kept one
    by more than ``threshold`` (mask IoU) is dropped."""
    if not rles:
        return []
    order = np.argsort(-priority, kind="stable")
    ordered = [rles[i] for i in order]
    ious = np.asarray(mask_utils.iou(ordered, ordered, [0] * len(ordered))).reshape(len(ordered), len(ordered))
    suppressed = np.zeros(len(ordered), bool)
    keep = []
    for i in range(len(ordered)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        suppressed |= ious[i] > threshold
    return keep


def _near_crop_edge(boxes: torch.Tensor, crop: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Masks cut by a crop's edge that is not the image's edge (their object goes on in the next crop)."""
    crop_t = torch.tensor(crop, dtype=torch.float32)
    image_t = torch.tensor([0, 0, size[1], size[0]], dtype=torch.float32)
    near_crop = torch.isclose(boxes, crop_t, atol=20, rtol=0)
    near_image = torch.isclose(boxes, image_t, atol=20, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[K, H, W]`` non-empty bool masks -> ``[K, 4]`` xyxy boxes (far edges exclusive)."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    h, w = masks.shape[1:]
    y0 = rows.float().argmax(1)
    y1 = h - rows.flip(1).float().argmax(1)
    x0 = cols.float().argmax(1)
    x1 = w - cols.flip(1).float().argmax(1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


class AutoMaskGenerator:
    """Runs :class:`AutoMaskConfig`'s recipe with a SAM-family model (plain or PEFT-wrapped).

    Args:
        model: the model; its ``forward`` takes ``image_embeddings`` and point prompts.
        pre: the model's preprocessing.
        config: the recipe's settings.
        multimask_output: what ``config.multimask_output: null`` means (the method's setting).
    """

    def __init__(self, model: nn.Module, pre: Preprocessing, config: AutoMaskConfig, multimask_output: bool) -> None:
        self.model = model
        self.pre = pre
        self.config = config
        self.multimask = config.multimask_output if config.multimask_output is not None else multimask_output

    @torch.no_grad()
    def __call__(
        self,
        pixel_values: torch.Tensor,
        resized: tuple[int, int],
        original: tuple[int, int],
        image: np.ndarray | None = None,
    ) -> ImagePrediction:
        """All masks of one image, at its original resolution, highest predicted IoU first.

        Args:
            pixel_values: ``[3, S, S]`` model input of the whole image.
            resized: ``(h, w)`` of the image inside the model input.
            original: ``(H, W)`` of the image.
            image: the ``[H, W, 3]`` image as the dataset decodes it; needed only for crops
                (``crop_n_layers > 0``), which are preprocessed from the original pixels.
        """
        cfg = self.config
        height, width = original
        rles: list[dict] = []
        scores: list[float] = []
        crop_area: list[int] = []
        for x0, y0, x1, y1, layer in crop_boxes(height, width, cfg.crop_n_layers, cfg.crop_overlap_ratio):
            if layer == 0:
                values, crop_resized = pixel_values, resized
            else:
                if image is None:
                    raise ValueError("amg: crop_n_layers > 0 needs the original image")
                values, crop_resized = preprocess_image(np.ascontiguousarray(image[y0:y1, x0:x1]), self.pre)
            n = max(1, int(cfg.points_per_side / cfg.crop_n_points_downscale_factor**layer))
            crop_rles, crop_scores = self._crop(
                values.to(pixel_values.device), crop_resized, (x0, y0, x1, y1), n, original
            )
            keep = mask_nms(crop_rles, np.asarray(crop_scores), cfg.mask_nms_thresh)
            rles += [crop_rles[i] for i in keep]
            scores += [crop_scores[i] for i in keep]
            crop_area += [(x1 - x0) * (y1 - y0)] * len(keep)
        if cfg.crop_n_layers > 0 and rles:  # across crops, the mask from the smaller crop (more detail) wins
            keep = mask_nms(rles, -np.asarray(crop_area, float), cfg.crop_nms_thresh)
            rles, scores = [rles[i] for i in keep], [scores[i] for i in keep]
        order = np.argsort(-np.asarray(scores), kind="stable")
        if not len(order):
            return ImagePrediction(torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0))
        masks = mask_utils.decode([rles[i] for i in order]).transpose(2, 0, 1).astype(bool)
        return ImagePrediction(torch.from_numpy(masks), torch.tensor([scores[i] for i in order], dtype=torch.float32))

    def _crop(
        self,
        pixel_values: torch.Tensor,
        resized: tuple[int, int],
        crop: tuple[int, int, int, int],
        n: int,
        original: tuple[int, int],
    ) -> tuple[list[dict], list[float]]:
        """RLEs (in the whole image's frame) and predicted IoUs of the masks one crop keeps."""
        cfg = self.config
        x0, y0, x1, y1 = crop
        crop_size = (y1 - y0, x1 - x0)
        image_inputs = embedding_inputs(self.model, encode_images(self.model, pixel_values[None]))
        points = scale_coords(point_grid(n, *crop_size), crop_size, resized).to(pixel_values.device)
        rles: list[dict] = []
        scores: list[float] = []
        for start in range(0, len(points), cfg.points_per_batch):
            chunk = points[start : start + cfg.points_per_batch]
            out = self.model(
                **image_inputs,
                input_points=chunk[None, :, None, :],
                input_labels=torch.ones(1, len(chunk), 1, dtype=torch.long, device=chunk.device),
                multimask_output=self.multimask,
            )
            logits = out.pred_masks[0].flatten(0, 1)  # [P * M, h, w]
            iou = out.iou_scores[0].flatten().float()
            # the IoU test first: only its survivors are brought to full resolution
            keep = iou > cfg.pred_iou_thresh
            if not keep.any():
                continue
            full = logits_to_original(logits[keep], self.pre, resized, crop_size)
            iou = iou[keep]
            stable = stability_scores(full, cfg.stability_score_offset) > cfg.stability_score_thresh
            masks = full[stable] > 0
            iou = iou[stable]
            big = masks.flatten(1).sum(1) >= max(1, cfg.min_mask_area)  # empty masks never count
            masks, iou = masks[big], iou[big]
            if not len(masks):
                continue
            boxes = _boxes(masks) + torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=masks.device)
            inside = ~_near_crop_edge(boxes.cpu(), crop, original)
            masks, iou = masks[inside.to(masks.device)], iou[inside.to(iou.device)]
            if not len(masks):
                continue
            frame = np.zeros((original[0], original[1], len(masks)), np.uint8, order="F")
            frame[y0:y1, x0:x1] = masks.permute(1, 2, 0).cpu().numpy()
            rles += mask_utils.encode(frame)
            scores += iou.cpu().tolist()
        return rles, scores
