"""Scores of a Dice-click curve: the Dice and IoU after each click, its normalised area, the number of
clicks to reach a Dice (NoC), and the report's click table. numpy and torch only, no Lightning.

A curve has ``R + 1`` points: the Dice after the first prompt (the box, or the point prompts: 0 clicks)
and after each of ``R`` clicks (:mod:`segtune.click_rounds`).

**NoC@t** is the interactive-segmentation literature's number of clicks (RITM's
``compute_noc_metric``, used by SimpleClick, FocalClick and their successors): the first click count at
which the score reaches ``t``, and a penalty when it never does. RITM counts its first click as click 1
and charges ``max_clicks`` when the threshold is never reached; here the first prompt is the first
interaction, so NoC counts the clicks after it (0: the box alone reaches ``t``) and charges ``R + 1``
when ``R`` clicks never reach it, so a threshold reached at the last click and one never reached stay
apart. It equals RITM's function on the curve with ``max_clicks = R + 2``, minus one
(``tests/test_clicks.py`` checks it against RITM's definition). Measured on Dice here (RITM: IoU).

**AUC** is the area under the Dice-click curve (trapezoids, clicks 0 to ``R``) over ``R``: 1.0 for a
curve at 1.0 throughout, the mean Dice over the clicks in between (the CVPR 2025 interactive 3D
challenge's normalised AUC). **Gain** is the Dice after the last click minus the Dice after the first
prompt: how much the model listens to clicks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: The Dice NoC is reported at.
NOC_THRESHOLDS = (0.85, 0.90)
_CLICK_DICE = re.compile(r"dice_click_(\d+)$")


def click_score_names(rounds: int, other: str = "iou") -> tuple[str, ...]:
    """The per-instance score names of ``rounds`` click rounds: ``dice_click_1`` ... ``dice_click_R``,
    ``iou_click_1`` ... (``other``: ``"nsd"`` for volumes' rows), ``click_auc``, ``click_gain``, ``noc_85``,
    ``noc_90`` (none for 0 rounds)."""
    if rounds <= 0:
        return ()
    return (
        *(f"dice_click_{r}" for r in range(1, rounds + 1)),
        *(f"{other}_click_{r}" for r in range(1, rounds + 1)),
        "click_auc",
        "click_gain",
        *(f"noc_{round(100 * t)}" for t in NOC_THRESHOLDS),
    )


def click_rounds_of(scores: Sequence[str]) -> int:
    """How many click rounds a report's score names hold (0: none)."""
    found = [int(m.group(1)) for s in scores if (m := _CLICK_DICE.match(s))]
    return max(found, default=0)


def clicks_to_reach(curve: Sequence[float], threshold: float) -> float:
    """NoC of one instance: the clicks after the first prompt at which ``curve`` first reaches ``threshold``,
    ``len(curve)`` (``R + 1``) when it never does, NaN for an instance left out (a NaN first score).

    Args:
        curve: the score after the first prompt and after each click.
        threshold: the score to reach (e.g. 0.9).
    """
    values = np.asarray(curve, dtype=np.float64)
    if not len(values) or math.isnan(values[0]):
        return float("nan")
    reached = np.flatnonzero(values >= threshold)
    return float(reached[0]) if len(reached) else float(len(values))


def normalised_auc(curve: Sequence[float]) -> float:
    """The area under ``curve`` (trapezoids over clicks 0 to ``R``) over ``R``; NaN for fewer than 2 points."""
    values = np.asarray(curve, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    return float(((values[1:] + values[:-1]) / 2).mean())


def curve_scores(dice: torch.Tensor, iou: torch.Tensor, other: str = "iou") -> dict[str, torch.Tensor]:
    """The per-instance click scores (:func:`click_score_names`) of ``[N, R + 1]`` Dice and IoU curves (``other``:
    the second curve's name, ``"nsd"`` for volumes)."""
    rounds = dice.shape[1] - 1
    out = {f"dice_click_{r}": dice[:, r] for r in range(1, rounds + 1)}
    out.update({f"{other}_click_{r}": iou[:, r] for r in range(1, rounds + 1)})
    rows = dice.double().cpu().numpy()
    out["click_auc"] = torch.tensor([normalised_auc(row) for row in rows], dtype=torch.float32)
    out["click_gain"] = (dice[:, -1] - dice[:, 0]).float()
    for t in NOC_THRESHOLDS:
        out[f"noc_{round(100 * t)}"] = torch.tensor([clicks_to_reach(row, t) for row in rows], dtype=torch.float32)
    return out


def dice_curve(means: Mapping[str, Any], rounds: int, score: str = "dice") -> list[float | None]:
    """The mean Dice after the first prompt and after each click, from a report's means (``dice``,
    ``dice_click_1`` ...; ``score``: another score's curve, e.g. volumes' ``"nsd"``)."""
    return [means.get(score), *(means.get(f"{score}_click_{r}") for r in range(1, rounds + 1))]


def click_summary(report: Mapping[str, Any], rounds: int) -> dict[str, Any]:
    """What ``test_metrics.json`` says of the clicks: the Dice curve overall and per class, and, with the
    untuned model beside the checkpoint, its curve and the paired difference at each click. Volumes' reports
    (NSD after each click) also get the NSD curve overall and per class."""
    out: dict[str, Any] = {
        "rounds": rounds,
        "noc_thresholds": list(NOC_THRESHOLDS),
        "dice_curve": {"overall": dice_curve(report["overall"], rounds),
                       **{name: dice_curve(s, rounds) for name, s in report["per_class"].items()}},
    }  # fmt: skip
    if "nsd_click_1" in report["overall"]:
        per_class = {name: dice_curve(s, rounds, "nsd") for name, s in report["per_class"].items()}
        out["nsd_curve"] = {"overall": dice_curve(report["overall"], rounds, "nsd"), **per_class}
    untuned = report.get("untuned")
    if untuned:
        names = ["dice", *(f"dice_click_{r}" for r in range(1, rounds + 1))]
        out["untuned_dice_curve"] = {"overall": dice_curve(untuned["overall"], rounds),
                                     **{n: dice_curve(s, rounds) for n, s in untuned["per_class"].items()}}  # fmt: skip
        out["difference_curve"] = [untuned["difference"].get(n, {}).get("overall") for n in names]
    return out


def _value(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(paired: Mapping[str, Any] | None, key: str) -> str:
    return "-" if paired is None else f"{paired[key]:+.4f}"


def click_table(report: Mapping[str, Any], rounds: int) -> str:
    """The printed click table: Dice after the first prompt and after each click, AUC, gain and NoC, overall
    and per class (volumes: NSD after each click below them); with the untuned model, its overall row and the
    paired difference at each click."""
    steps = ["prompt", *(f"{r} click" if r == 1 else f"{r} clicks" for r in range(1, rounds + 1))]
    extra = ["auc", "gain", *(f"NoC@{round(100 * t)}" for t in NOC_THRESHOLDS)]
    widths = [max(8, len(s)) for s in [*steps, *extra]]
    header = " ".join(f"{s:>{w}}" for s, w in zip([*steps, *extra], widths, strict=True))
    lines = [f"{'Dice after':<24} {'instances':>9} {header}"]

    def line(name: str, s: Mapping[str, Any], score: str = "dice") -> str:
        values = [*dice_curve(s, rounds, score), s.get("click_auc"), s.get("click_gain")]
        values += [s.get(f"noc_{round(100 * t)}") for t in NOC_THRESHOLDS]
        if score != "dice":  # the area, gain and NoC are of the Dice curve
            values[rounds + 1 :] = [None] * (len(values) - rounds - 1)
        digits = [4] * (rounds + 3) + [2] * len(NOC_THRESHOLDS)
        cells = " ".join(f"{_value(v, d):>{w}}" for v, d, w in zip(values, digits, widths, strict=True))
        return f"{name[:24]:<24} {s.get('instances', 0):>9} {cells}"

    lines.append(line("all", report["overall"]))
    if len(report["per_class"]) > 1:
        lines += [line(name, s) for name, s in report["per_class"].items()]
    if "nsd_click_1" in report["overall"]:  # volumes: the NSD after each click
        lines.append(line("NSD: all", report["overall"], "nsd"))
        if len(report["per_class"]) > 1:
            lines += [line(f"NSD: {name}", s, "nsd") for name, s in report["per_class"].items()]
    untuned = report.get("untuned")
    if untuned:
        lines.append(line("untuned: all", untuned["overall"]))
        names = ["dice", *(f"dice_click_{r}" for r in range(1, rounds + 1))]
        paired = [(untuned["difference"].get(n) or {}).get("overall") for n in names]
        for name, key in (("difference", "mean"), ("  95% CI low", "low"), ("  95% CI high", "high")):
            cells = " ".join(f"{_signed(p, key):>{w}}" for p, w in zip(paired, widths, strict=False))
            lines.append(f"{name:<24} {paired[0]['instances'] if paired[0] else 0:>9} {cells}")
    return "\n".join(lines)


def flatter_than_untuned(report: Mapping[str, Any], rounds: int) -> str | None:
    """A warning when the checkpoint gains less Dice from its clicks than the untuned model does on the same
    instances (a fine-tune that stopped listening to clicks, SAM-Med2D#25), or ``None``.

    The gain is the Dice after the last click minus the Dice after the first prompt; the message gives the
    paired difference of the two models' gains with its 95% interval.
    """
    untuned = report.get("untuned")
    if not untuned or rounds <= 0:
        return None
    tuned_gain, untuned_gain = report["overall"].get("click_gain"), untuned["overall"].get("click_gain")
    if tuned_gain is None or untuned_gain is None or tuned_gain >= untuned_gain:
        return None
    paired = (untuned["difference"].get("click_gain") or {}).get("overall")
    interval = f" (paired difference {paired['mean']:+.4f} [95% CI {paired['low']:+.4f}, {paired['high']:+.4f}])"
    return (
        f"the checkpoint's click curve is flatter than the untuned model's: {rounds} clicks add {tuned_gain:+.4f} "
        f"Dice against {untuned_gain:+.4f} untuned{interval if paired else ''}; the fine-tune may have stopped "
        "listening to clicks (train with click rounds, or with fewer epochs or a lower learning rate)"
    )
