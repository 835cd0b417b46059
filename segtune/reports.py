"""Test reports: per-instance scores -> per-image and per-class tables, json and csv files, and
COCO results (RLE) for predictions. No Lightning here."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from segtune.paired import format_interval, paired_rows
from segtune.postprocess import InstanceScores


def instance_rows(
    image_id: int,
    file_name: str,
    scores: InstanceScores,
    classes: torch.Tensor,
    predicted_iou: torch.Tensor,
    class_names: list[str],
) -> list[dict[str, Any]]:
    """One row per instance of one image: its class, Dice, IoU, box-floor Dice and predicted IoU.

    The scores are the ones the test metrics accumulated (:func:`segtune.postprocess.score_instances`);
    an instance they exclude (NaN) has ``None`` scores, left out of the means. The scores' ``extra`` (the
    click curve's) follow as more columns.
    """
    dice, iou, box = (
        [None if math.isnan(v) else v for v in t.tolist()] for t in (scores.dice, scores.iou, scores.box_dice)
    )
    extra = {name: [None if math.isnan(v) else v for v in t.tolist()] for name, t in scores.extra.items()}
    return [
        {
            "image_id": image_id,
            "file_name": file_name,
            "instance": k,
            "class": class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c)),
            "dice": dice[k],
            "iou": iou[k],
            "box_dice": box[k],
            "predicted_iou": float(predicted_iou[k]),
            **{name: values[k] for name, values in extra.items()},
        }
        for k, c in enumerate(classes.tolist())
    ]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(values)) if values else None


#: The scores of a 2D report's rows (instances); a volume report's rows (a class of a case) carry
#: :data:`segtune.volume_scoring.VOLUME_SCORES`.
IMAGE_SCORES = ("dice", "iou", "box_dice")
#: The filled-box floors: what the prompt box itself scores, the same for every model, so two models are
#: never compared on them (nor is the untuned model's copy logged).
FLOORS = ("box_dice", "box_iou")


def compared_scores(scores: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The scores of ``scores`` that depend on the model: all but the filled-box :data:`FLOORS`."""
    return tuple(s for s in scores if s not in FLOORS)


def summarise(
    rows: list[dict[str, Any]], scores: tuple[str, ...] = IMAGE_SCORES, unit: str = "image"
) -> dict[str, Any]:
    """Overall, per-class and per-image means of per-instance rows (the same means as ``test_dice``).

    Args:
        rows: one per instance (or, for volumes, one per class of a case).
        scores: the score columns to average.
        unit: what a row's ``image_id`` is (``"image"``, or ``"case"`` for volumes): names
            ``per_<unit>`` in the report and the csv.
    """
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_class[row["class"]].append(row)
        by_image[row["image_id"]].append(row)

    def means(group: list[dict[str, Any]]) -> dict[str, Any]:
        return {"instances": len(group), **{k: _mean(group, k) for k in scores}}

    return {
        "scores": list(scores),
        "unit": unit,
        "overall": means(rows),
        "per_class": {name: means(group) for name, group in sorted(by_class.items())},
        f"per_{unit}": [
            {"image_id": image_id, "file_name": group[0]["file_name"], **means(group)}
            for image_id, group in sorted(by_image.items(), key=lambda item: item[1][0]["file_name"])
        ],
        "per_instance": rows,
    }


def write_test_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write ``test_metrics.json`` (everything) and ``test_per_image.csv`` (``test_per_case.csv`` for
    volumes) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "test_metrics.json"
    json_path.write_text(json.dumps(report, indent=2))
    unit = report.get("unit", "image")
    csv_path = folder / f"test_per_{unit}.csv"
    with open(csv_path, "w", newline="") as f:
        scores = report.get("scores", list(IMAGE_SCORES))
        writer = csv.DictWriter(f, fieldnames=["image_id", "file_name", "instances", *scores])
        writer.writeheader()
        writer.writerows(report[f"per_{unit}"])
    return json_path, csv_path


def summary_table(report: dict[str, Any], worst: int = 3, scores: Sequence[str] | None = None) -> str:
    """A short text table: overall, each class, and the images (cases) with the lowest Dice.

    Args:
        report: :func:`summarise`'s report.
        worst: how many of the lowest-Dice images (cases) to list.
        scores: the columns (default: every score of the report).
    """
    scores = list(scores or report.get("scores", list(IMAGE_SCORES)))
    unit = report.get("unit", "image")
    widths = [max(7, len(k)) for k in scores]
    rows_name = "instances" if unit == "image" else "rows"
    header = " ".join(f"{k.replace('_', ' '):>{w}}" for k, w in zip(scores, widths, strict=True))
    lines = [f"{'':<24} {rows_name:>9} {header}"]

    def line(name: str, s: dict[str, Any]) -> str:
        values = " ".join(
            f"{f'{s[k]:.4f}' if s[k] is not None else '-':>{w}}" for k, w in zip(scores, widths, strict=True)
        )
        return f"{name[:24]:<24} {s['instances']:>9} {values}"

    lines.append(line("all", report["overall"]))
    if len(report["per_class"]) > 1:
        lines += [line(name, s) for name, s in report["per_class"].items()]
    scored = [r for r in report[f"per_{unit}"] if r["dice"] is not None]
    for image in sorted(scored, key=lambda r: r["dice"])[:worst]:
        lines.append(line(f"worst: {image['file_name']}", image))
    return "\n".join(lines)


def untuned_summary(
    untuned: list[dict[str, Any]], tuned: list[dict[str, Any]], scores: tuple[str, ...] = IMAGE_SCORES,
    unit: str = "image",
) -> dict[str, Any]:  # fmt: skip
    """The untuned model's overall and per-class means on the same rows as ``tuned``, and the paired difference
    (checkpoint minus untuned) of each score that depends on the model (:func:`compared_scores`: Dice and IoU
    for images) with its 95% bootstrap interval, overall and per class.

    Args:
        untuned: the untuned model's rows (instances, or for volumes (case, class) rows).
        tuned: the checkpoint's rows, paired with ``untuned`` by ``(image_id, instance)``.
        scores: the rows' scores, as :func:`summarise` takes them.
        unit: what a row's ``image_id`` is, as :func:`summarise` takes it.
    """
    report = summarise(untuned, scores, unit)
    return {
        "overall": report["overall"],
        "per_class": report["per_class"],
        "difference": {score: paired_rows(untuned, tuned, score) for score in compared_scores(scores)},
        "per_instance": untuned,
    }


def untuned_table(report: dict[str, Any]) -> str:
    """The untuned model beside the checkpoint: Dice of each, and the paired difference [95% CI]."""
    untuned, difference = report["untuned"], report["untuned"]["difference"]["dice"]
    rows_name = "instances" if report.get("unit", "image") == "image" else "rows"  # volumes: (case, class) rows
    lines = [f"{'untuned vs checkpoint':<24} {rows_name:>9} {'untuned':>8} {'tuned':>7}  dice difference [95% CI]"]

    def line(name: str, before: dict[str, Any], after: dict[str, Any], paired: dict[str, Any] | None) -> str:
        a, b = (f"{s['dice']:.4f}" if s.get("dice") is not None else "-" for s in (before, after))
        count = paired["instances"] if paired else 0
        return f"{name[:24]:<24} {count:>9} {a:>8} {b:>7}  {format_interval(paired)}"

    lines.append(line("all", untuned["overall"], report["overall"], difference["overall"]))
    if len(report["per_class"]) > 1:
        lines += [
            line(name, untuned["per_class"].get(name, {}), s, difference["per_class"].get(name))
            for name, s in report["per_class"].items()
        ]
    return "\n".join(lines)


def coco_results(image_id: int, masks: np.ndarray, scores: np.ndarray, category_ids: list[int]) -> list[dict[str, Any]]:
    """COCO results entries (``loadRes`` format) for one image's ``[N, H, W]`` bool masks, RLE-encoded."""
    results = []
    for mask, score, category in zip(masks, scores, category_ids, strict=True):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {"image_id": image_id, "category_id": int(category), "segmentation": rle, "score": float(score),
             "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle))}
        )  # fmt: skip
    return results


def markdown_cell(value: Any) -> str:
    """One value as a markdown table cell: empty for None, 4 significant digits for floats, ``|`` escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
