"""The README's pictures, from runs you made: a validation grid, a prediction overlay, a test report
and a compare plot, shrunk to under 300 KB each.

    segtune fit --config configs/quickstart.yaml
    segtune validate --config configs/quickstart.yaml --trainer.callbacks+=segtune.callbacks.ValidationImages \\
        --trainer.callbacks.every_n_epochs=1 --ckpt_path <best checkpoint printed by fit>
    segtune test --config configs/quickstart.yaml --ckpt_path <best checkpoint printed by fit>
    segtune predict --config configs/quickstart.yaml --ckpt_path <best checkpoint printed by fit>
    segtune compare --config configs/compare.yaml --epochs 1
    python docs/make_images.py --runs runs/quickstart --compare runs/compare --output docs/images

``--runs`` is a logger folder (``runs/<name>``): the newest ``version_N`` that has each picture is
used: ``val_images/epoch_EEE.png`` (the last epoch's; with the ``validate`` line, the best
checkpoint's), ``test_report.png``, ``predictions/overlays/*.jpg`` (the first by name unless
``--overlay`` names one).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import yaml
from PIL import Image

from segtune.visualise import validation_grid_height

LIMIT = 300_000  # bytes: a README picture loads at once, also on a slow connection
NAMES = {
    "val_grid": "val_grid.jpg",  # photos with noise: JPEG is far smaller than PNG
    "overlay": "overlay.jpg",
    "test_report": "test_report.png",  # mostly plot: a few colours
    "compare": "compare.png",
}


def _versions(runs: Path) -> list[Path]:
    """``runs/<name>/version_N`` folders, newest (highest N) first."""
    found = [p for p in runs.glob("version_*") if p.is_dir() and re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def _newest(runs: Path, pattern: str, pick: Callable[[list[Path]], Path]) -> Path:
    for version in _versions(runs):
        files = sorted(version.glob(pattern))
        if files:
            return pick(files)
    raise SystemExit(f"make_images: {runs}: no version_N/{pattern} (see this script's docstring for the runs)")


def _save(picture: Image.Image, path: Path) -> Path:
    """PNG with at most 128 colours (plots) or JPEG (photos); smaller steps until under :data:`LIMIT`."""
    picture = picture.convert("RGB")
    for scale in (1.0, 0.8, 0.65, 0.5):
        size = (round(picture.width * scale), round(picture.height * scale))
        resized = picture if scale == 1.0 else picture.resize(size, Image.Resampling.LANCZOS)
        if path.suffix == ".png":
            resized.quantize(colors=128).save(path, optimize=True)
        else:
            resized.save(path, quality=82, optimize=True)
        if path.stat().st_size <= LIMIT:
            return path
    raise SystemExit(f"make_images: {path}: still {path.stat().st_size // 1024} KB at half size")


def make_images(runs: Path, compare: Path, output: Path, overlay: str | None = None, rows: int = 3) -> list[Path]:
    """Write the README pictures into ``output``; their paths.

    Args:
        runs: a logger folder with fit, test and predict runs (``runs/quickstart``).
        compare: a ``segtune compare`` output folder (has ``report.png``).
        output: where to write (``docs/images``).
        overlay: the prediction overlay's file name (default: the first by name).
        rows: how many image rows of the validation grid to keep.
    """
    output.mkdir(parents=True, exist_ok=True)
    grid_path = _newest(runs, "val_images/epoch_*.png", lambda files: files[-1])
    grid = Image.open(grid_path)
    keep = grid.height
    for panel in _panel_heights(grid_path.parents[1] / "config.yaml"):
        if any(validation_grid_height(n, panel) == grid.height for n in range(1, 1000)):
            keep = min(grid.height, validation_grid_height(rows, panel))  # the first rows, cut between rows
            break
    written = [_save(grid.crop((0, 0, grid.width, keep)), output / NAMES["val_grid"])]
    pick = (lambda files: next((f for f in files if f.name == overlay), files[0])) if overlay else (lambda f: f[0])
    written.append(_save(Image.open(_newest(runs, "predictions/overlays/*.jpg", pick)), output / NAMES["overlay"]))
    report = _newest(runs, "test_report.png", lambda files: files[0])
    written.append(_save(Image.open(report), output / NAMES["test_report"]))
    if not (compare / "report.png").is_file():
        raise SystemExit(f"make_images: {compare}: no report.png (run segtune compare first)")
    written.append(_save(Image.open(compare / "report.png"), output / NAMES["compare"]))
    return written


def _panel_heights(config: Path) -> list[int]:
    """The ``height`` of each ValidationImages callback in a run's saved config."""
    if not config.is_file():
        return []
    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks") or []
    return [
        int((c.get("init_args") or {}).get("height", 256))
        for c in callbacks
        if isinstance(c, dict) and str(c.get("class_path", "")).endswith("ValidationImages")
    ]


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python docs/make_images.py --runs R --compare C --output O``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="a logger folder, e.g. runs/quickstart")
    parser.add_argument("--compare", type=Path, required=True, help="a segtune compare folder, e.g. runs/compare")
    parser.add_argument("--output", type=Path, default=Path("docs/images"), help="where to write")
    parser.add_argument("--overlay", help="file name of the prediction overlay to show")
    args = parser.parse_args(argv)
    for path in make_images(args.runs, args.compare, args.output, args.overlay):
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
