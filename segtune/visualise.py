"""Pictures of masks on images: overlays for predict outputs, the validation grid and the test report.

The figures are matplotlib figures laid out in pixels (fixed size for a given number of rows or
classes), so they read the same in a file, in TensorBoard and in the README. No Lightning here:
the callbacks pass in the scores :func:`segtune.postprocess.score_instances` computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from segtune.files import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Distinct, colour-blind-friendly colours (Okabe-Ito), RGB.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """An ``[H, W, 3]`` image as the intensity policy returns it (uint8, or float in [0, 1]) -> uint8."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay(
    image: np.ndarray,
    masks: np.ndarray,
    labels: Sequence[str] = (),
    colours: Sequence[int] | None = None,
    alpha: float = 0.35,
) -> np.ndarray:
    """Draw instance masks on an image: a translucent fill, the contour, and a label per instance.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        masks: ``[N, H, W]`` bool.
        labels: text written at each instance's top-left (e.g. ``"polyp 0.93"``); may be empty.
        colours: palette index of each instance (default: its position).
        alpha: opacity of the fill.

    Returns:
        A new ``[H, W, 3]`` uint8 RGB image.
    """
    out = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        colour = PALETTE[(colours[i] if colours is not None else i) % len(PALETTE)]
        region = out[mask]
        out[mask] = (region * (1 - alpha) + np.array(colour) * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness)
        if i < len(labels) and labels[i]:
            ys, xs = np.nonzero(mask)
            origin = (int(xs.min()), max(12, int(ys.min()) - 3))
            scale = 0.4 * thickness
            cv2.putText(out, labels[i], origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
            cv2.putText(out, labels[i], origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return out


def instance_index_mask(masks: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """``[N, H, W]`` bool -> ``[H, W]`` with instance ``i`` stored as ``i + 1`` (0 background).

    Where instances overlap, the higher-scoring one wins. uint8 up to 255 instances, else uint16.
    """
    height, width = masks.shape[1:]
    out = np.zeros((height, width), np.uint8 if len(masks) < 256 else np.uint16)
    order = np.argsort(scores) if scores is not None else np.arange(len(masks))
    for i in order:  # ascending score: the best is painted last
        out[masks[i]] = i + 1
    return out


@dataclass
class ScoredImage:
    """One image as the pictures draw it: ground truth, prediction and each instance's scores.

    Args:
        file_name: the image's file name (shown with it).
        image: ``[H, W, 3]`` uint8 RGB.
        target: ``[N, H, W]`` bool ground-truth masks.
        predicted: ``[N, H, W]`` bool predicted masks, one per ground-truth instance.
        class_ids: class index of each instance (its colour).
        class_names: class name of each instance.
        dice: Dice of each instance (from :class:`segtune.postprocess.InstanceScores`).
        box_dice: Dice of each instance's filled box prompt, the floor.
    """

    file_name: str
    image: np.ndarray
    target: np.ndarray
    predicted: np.ndarray
    class_ids: list[int]
    class_names: list[str]
    dice: list[float]
    box_dice: list[float]

    @property
    def mean_dice(self) -> float:
        """Mean instance Dice of the image (the per-image Dice of the test report)."""
        return float(np.mean(self.dice)) if self.dice else float("nan")

    @property
    def mean_box_dice(self) -> float:
        """Mean box-floor Dice of the image."""
        return float(np.mean(self.box_dice)) if self.box_dice else float("nan")


DPI = 100  # figures are laid out in pixels: 1 inch = DPI pixels


def _figure(width: int, height: int) -> Figure:
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot): nothing global, nothing to close, safe in a training process.
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _axes(fig: Figure, left: float, top: float, width: float, height: float) -> Any:
    """Axes placed in pixels from the figure's top-left corner."""
    w, h = fig.get_size_inches() * DPI
    return fig.add_axes((left / w, 1 - (top + height) / h, width / w, height / h))


def _image_axes(ax: Any, picture: np.ndarray) -> None:
    ax.imshow(picture, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _instance_scores(row: ScoredImage, per_line: int = 2, lines: int = 2) -> str:
    """``class Dice (box floor Dice)`` of each instance, ``per_line`` per line, at most ``lines`` lines."""
    items = [f"{c} {d:.2f} (box {b:.2f})" for c, d, b in zip(row.class_names, row.dice, row.box_dice, strict=True)]
    shown = items[: per_line * lines]
    text = "\n".join(", ".join(shown[i : i + per_line]) for i in range(0, len(shown), per_line))
    return text + (f" + {len(items) - len(shown)} more" if len(items) > len(shown) else "")


def short_name(name: str, width: int) -> str:
    """``name`` cut in the middle to fit ``width`` pixels of 8 pt text (Roboflow's names run long)."""
    chars = max(9, width // 7)  # DejaVu Sans at 8 pt and 100 dpi: about 6-7 px a character
    if len(name) <= chars:
        return name
    head = (chars - 1) // 2
    return f"{name[:head]}…{name[len(name) - (chars - 1 - head) :]}"


def _class_list(names: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{k}" if k > 1 else n for n, k in counts.items()) or "no instance"


VALIDATION_COLUMNS = ("image", "ground truth", "prediction (instance Dice)")
_GRID_GAP, _GRID_HEADER, _GRID_BAND = 12, 34, 52  # pixels: between panels, column titles, text under a row


def validation_grid_height(rows: int, panel_height: int) -> int:
    """The pixel height of :func:`validation_grid` with ``rows`` rows of ``panel_height`` pixels;
    row ``i`` ends at ``validation_grid_height(i + 1, panel_height)``."""
    return _GRID_HEADER + rows * (panel_height + _GRID_BAND)


def validation_grid(rows: Sequence[ScoredImage], height: int = 256) -> Figure:
    """The validation grid: one row per image, columns image | ground truth | prediction.

    The columns have titles; under each row's panels: the file name, the ground truth's classes,
    and the image's mean Dice with its box-floor Dice, then each instance's. The prediction panel
    labels each instance with its Dice.

    Args:
        rows: the images with their scores.
        height: panel height in pixels (the width follows the widest image's aspect).

    Returns:
        A figure of ``3 * (panel width + 12) + 12`` by :func:`validation_grid_height` pixels.
    """
    aspect = max(r.image.shape[1] / r.image.shape[0] for r in rows)
    width = round(height * aspect)
    gap, header, band = _GRID_GAP, _GRID_HEADER, _GRID_BAND
    fig = _figure(3 * (width + gap) + gap, validation_grid_height(len(rows), height))
    for i, row in enumerate(rows):
        top = header + i * (height + band)
        labels = [f"{d:.2f}" for d in row.dice]
        panels = (
            (row.image, short_name(row.file_name, width)),
            (overlay(row.image, row.target, row.class_names, colours=row.class_ids), _class_list(row.class_names)),
            (
                overlay(row.image, row.predicted, labels, colours=row.class_ids),
                f"Dice {row.mean_dice:.2f} (box floor {row.mean_box_dice:.2f})\n{_instance_scores(row)}",
            ),
        )
        for j, (picture, text) in enumerate(panels):
            ax = _axes(fig, gap + j * (width + gap), top, width, height)
            _image_axes(ax, picture)
            ax.set_xlabel(text, fontsize=8, labelpad=2, linespacing=1.1)
            if i == 0:
                ax.set_title(VALIDATION_COLUMNS[j], fontsize=10, fontweight="bold", pad=6)
    return fig


def _contours(image: np.ndarray, masks: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 300))
    for mask in masks:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def test_report_figure(per_instance: Sequence[dict[str, Any]], worst: Sequence[ScoredImage]) -> Figure:
    """The test report picture: per-class Dice distributions with the box floor, and the worst images.

    Top: per class, each instance's Dice (a box plot and the points) with the mean box-floor Dice
    marked. Bottom: the images with the lowest mean Dice, the prediction filled in the class colour,
    the ground truth's outline in white, titled with the file name and its Dice and box-floor Dice.

    Args:
        per_instance: the test report's per-instance rows (``class``, ``dice``, ``box_dice``).
        worst: the worst images, worst first (may be empty).

    Returns:
        A figure of 1000 by ``150 + 34 * classes (+ 290 with worst images)`` pixels.
    """
    classes = sorted({r["class"] for r in per_instance})
    dist_height = 60 + 34 * len(classes)
    strip = 290 if worst else 0
    fig = _figure(1000, 90 + dist_height + strip)
    ax = _axes(fig, 160, 40, 600, dist_height)
    dice = [[r["dice"] for r in per_instance if r["class"] == c] for c in classes]
    floor = [float(np.mean([r["box_dice"] for r in per_instance if r["class"] == c])) for c in classes]
    positions = np.arange(len(classes))
    # Drawn by hand rather than with ax.boxplot, whose orientation argument changed in matplotlib 3.10.
    q1, median, q3 = (np.array([np.percentile(v, q) for v in dice]) for q in (25, 50, 75))
    ax.barh(positions, q3 - q1, left=q1, height=0.55, color="0.88", edgecolor="0.6")
    ax.scatter(median, positions, marker="|", s=500, linewidths=2, color="black", zorder=3)
    rng = np.random.default_rng(0)  # the same jitter every time: pictures compare across runs
    for k, values in enumerate(dice):
        colour = np.array(PALETTE[k % len(PALETTE)]) / 255
        jitter = k + rng.uniform(-0.18, 0.18, len(values))
        ax.scatter(values, jitter, s=12, alpha=0.7, color=colour, zorder=2)
    ax.scatter(floor, positions, marker="|", s=900, linewidths=3, color="firebrick", zorder=4)
    ax.set_yticks(positions, [f"{c} (n={len(v)})" for c, v in zip(classes, dice, strict=True)])
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.6, len(classes) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("per-instance Dice (0-1)")
    ax.set_title("test: per-instance Dice per class, box floor marked", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [  # drawn apart from the plot's own markers, whose sizes would overlap in a legend
        Line2D([], [], linestyle="none", marker="o", markersize=4, color=np.array(PALETTE[0]) / 255),
        Line2D([], [], linestyle="none", marker="|", markersize=12, markeredgewidth=2, color="black"),
        Patch(facecolor="0.88", edgecolor="0.6"),
        Line2D([], [], linestyle="none", marker="|", markersize=14, markeredgewidth=3, color="firebrick"),
    ]
    labels = ["instance Dice", "median Dice", "middle half (25-75 %)", "box floor (mean box Dice)"]
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    if worst:
        n = len(worst)
        width = (1000 - (n + 1) * 16) // n
        top = 90 + dist_height + 60
        for j, row in enumerate(worst):
            drawn = overlay(row.image, row.predicted, [f"{d:.2f}" for d in row.dice], colours=row.class_ids)
            axj = _axes(fig, 16 + j * (width + 16), top, width, strip - 70)
            _image_axes(axj, _contours(drawn, row.target, (255, 255, 255)))
            title = f"{short_name(row.file_name, width)}\nDice {row.mean_dice:.2f} (box floor {row.mean_box_dice:.2f})"
            axj.set_title(title, fontsize=8)
        caption = f"the {n} images with the lowest Dice: prediction in colour (instance Dice), ground truth in white"
        fig.text(0.5, 1 - (top - 40) / (fig.get_size_inches()[1] * DPI), caption, ha="center", fontsize=10)
    return fig


def click_curve_figure(summary: dict[str, Any]) -> Figure:
    """The Dice-click curve of a test: mean Dice after the first prompt and after each click, overall (black)
    and per class; with the untuned model, its curves dashed and, on the right, the paired difference
    (checkpoint minus untuned) at each click with its 95% bootstrap interval.

    Args:
        summary: :func:`segtune.click_scores.click_summary`'s output.

    Returns:
        A figure of 1000 (with the untuned model; 620 without) by 420 pixels.
    """
    curves, untuned = summary["dice_curve"], summary.get("untuned_dice_curve")
    rounds = summary["rounds"]
    fig = _figure(1000 if untuned else 620, 420)
    ax = _axes(fig, 70, 40, 380, 320)
    clicks = np.arange(rounds + 1)

    def draw(axis: Any, found: dict[str, list[float | None]], style: str, label: str) -> None:
        for k, (name, curve) in enumerate(found.items()):
            values = np.array([np.nan if v is None else v for v in curve], dtype=float)
            colour = "black" if name == "overall" else np.array(PALETTE[(k - 1) % len(PALETTE)]) / 255
            width = 2 if name == "overall" else 1.2
            shown = f"{label}{'all' if name == 'overall' else name}"
            axis.plot(clicks, values, style, color=colour, marker="o", markersize=4, linewidth=width, label=shown)

    draw(ax, curves, "-", "")
    if untuned:
        draw(ax, untuned, "--", "untuned: ")
    ax.set_xticks(clicks, ["prompt", *(str(r) for r in range(1, rounds + 1))])
    ax.set_xlabel("clicks after the first prompt")
    ax.set_ylabel("mean Dice")
    ax.set_title("Dice after each corrective click", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    if untuned:
        right = _axes(fig, 700, 40, 270, 320)
        paired = summary.get("difference_curve") or []
        mean = np.array([np.nan if p is None else p["mean"] for p in paired], dtype=float)
        low = np.array([np.nan if p is None else p["low"] for p in paired], dtype=float)
        high = np.array([np.nan if p is None else p["high"] for p in paired], dtype=float)
        right.errorbar(clicks, mean, yerr=[mean - low, high - mean], fmt="o-", color="black", capsize=4)
        right.axhline(0, color="firebrick", linewidth=1)
        right.set_xticks(clicks, ["prompt", *(str(r) for r in range(1, rounds + 1))])
        right.set_xlabel("clicks after the first prompt")
        right.set_title("checkpoint - untuned Dice, 95% CI", fontsize=11)
        right.grid(alpha=0.3)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as an RGB PNG at its own pixel size (to a temporary file, then renamed).

    The figures are opaque: RGB at zlib level 3 encodes a quickstart validation grid (1882 x 1071 px)
    in 0.10 s and 1.40 MB, where matplotlib's RGBA at level 6 took 0.43 s and 1.49 MB.
    """
    from PIL import Image

    picture = Image.fromarray(figure_to_array(fig))
    return write_atomically(path, lambda scratch: picture.save(scratch, format="PNG", compress_level=3))


def figure_to_array(fig: Figure) -> np.ndarray:
    """``fig`` rendered as an ``[H, W, 3]`` uint8 RGB array (for TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
