"""The pictures a reader looks at first: the validation grid, the test report, the compare plot,
and the README's images made from a run (docs/make_images.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from segtune.cli import main
from segtune.compare import write_reports
from segtune.visualise import VALIDATION_COLUMNS, short_name, validation_grid_height
from tests.conftest import CONFIGS, ROOT, last_metrics

QUICKSTART = CONFIGS / "quickstart.yaml"
PANEL = 128  # the grid's panel height in these runs


@pytest.fixture(scope="module")
def tiny_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """fit (1 epoch, a grid of the 4 validation images), test and predict, every figure recorded before saving."""
    import segtune.callbacks

    cwd = tmp_path_factory.mktemp("pictures")
    figures: dict[str, object] = {}
    save = segtune.callbacks.save_figure

    def record(figure: object, path: Path) -> Path:
        figures[Path(path).name] = figure
        return save(figure, path)

    common = ["--config", str(QUICKSTART), "--data.init_args.root", str(shapes_root)]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(segtune.callbacks, "save_figure", record)
        main([
            "fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.callbacks+=segtune.callbacks.ValidationImages", "--trainer.callbacks.every_n_epochs=1",
            f"--trainer.callbacks.height={PANEL}",
        ])  # fmt: skip
        (best,) = (cwd / "runs/quickstart/version_0/checkpoints").glob("best-*.ckpt")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["test", *common, "--ckpt_path", str(best)])
        main(["predict", *common, "--ckpt_path", str(best)])
    return SimpleNamespace(runs=cwd / "runs/quickstart", figures=figures, test_out=out.getvalue(), shapes=shapes_root)


def _texts(texts: list) -> list[str]:
    return [t.get_text() for t in texts]


def test_validation_grid_has_column_titles_and_scored_rows(tiny_run: SimpleNamespace) -> None:
    fit = tiny_run.runs / "version_0"
    path = fit / "val_images" / "epoch_000.png"
    valid = json.loads((tiny_run.shapes / "valid" / "_annotations.coco.json").read_text())
    # 4 rows of 128 px panels; the shapes are 320 x 240, so a panel is 171 px wide
    assert Image.open(path).size == (3 * (171 + 12) + 12, validation_grid_height(4, PANEL)) == (561, 754)
    axes = tiny_run.figures["epoch_000.png"].axes
    assert len(axes) == 3 * 4
    assert [ax.get_title() for ax in axes[:3]] == list(VALIDATION_COLUMNS)
    assert all(ax.get_title() == "" for ax in axes[3:])  # the titles once, above the columns
    names = {c["id"]: c["name"] for c in valid["categories"]}
    rows = [axes[i : i + 3] for i in range(0, len(axes), 3)]
    # Roboflow's long file names are cut in the middle to fit under a panel
    shown = {short_name(im["file_name"], 171): im for im in valid["images"]}
    assert {row[0].get_xlabel() for row in rows} == set(shown)
    assert all(len(name) <= 171 // 7 for name in shown)
    dice, box = [], []
    for image_ax, truth_ax, predicted_ax in rows:
        image = shown[image_ax.get_xlabel()]
        classes = [names[a["category_id"]] for a in valid["annotations"] if a["image_id"] == image["id"]]
        assert set(truth_ax.get_xlabel().replace(" x2", "").replace(" x3", "").split(", ")) == set(classes)
        first, *instances = predicted_ax.get_xlabel().split("\n")  # two instances a line
        assert re.fullmatch(r"Dice [01]\.\d\d \(box floor [01]\.\d\d\)", first)
        assert len(instances) == (len(classes) + 1) // 2
        found = re.findall(r"(\w+) ([01]\.\d\d) \(box ([01]\.\d\d)\)", " ".join(instances))
        assert sorted(c for c, _, _ in found) == sorted(classes)
        dice += [float(d) for _, d, _ in found]
        box += [float(b) for _, _, b in found]
    # the grid shows the scores the validation metrics were computed from (all 4 images here)
    logged = last_metrics(fit)
    assert np.mean(dice) == pytest.approx(logged["val_dice"], abs=0.006)
    assert np.mean(box) == pytest.approx(logged["val_box_dice"], abs=0.006)


def test_test_report_picture_shows_dice_per_class_and_the_worst_images(tiny_run: SimpleNamespace) -> None:
    run = tiny_run.runs / "version_1"
    path = run / "test_report.png"
    assert "Test report: " in tiny_run.test_out and "runs/quickstart/version_1/test_report.png" in tiny_run.test_out
    report = json.loads((run / "test_metrics.json").read_text())
    classes = sorted(report["per_class"])
    assert Image.open(path).size == (1000, 90 + 60 + 34 * len(classes) + 290)
    figure = tiny_run.figures["test_report.png"]
    dist, *strip = figure.axes
    assert dist.get_xlabel() == "per-instance Dice (0-1)"
    assert "box floor" in dist.get_title()
    n = {c: s["instances"] for c, s in report["per_class"].items()}
    assert _texts(dist.get_yticklabels()) == [f"{c} (n={n[c]})" for c in classes]
    assert "box floor (mean box Dice)" in _texts(dist.get_legend().get_texts())
    floor = dist.collections[-1].get_offsets()  # the box-floor marks, one per class
    assert np.asarray(floor)[:, 0] == pytest.approx([report["per_class"][c]["box_dice"] for c in classes])
    # the 4 test images, worst (lowest Dice) first
    worst = sorted(report["per_image"], key=lambda r: (r["dice"], r["file_name"]))
    panel = (1000 - 5 * 16) // 4  # 4 panels, 16 px apart
    assert [ax.get_title() for ax in strip] == [
        f"{short_name(r['file_name'], panel)}\nDice {r['dice']:.2f} (box floor {r['box_dice']:.2f})" for r in worst
    ]


def _make_images():
    spec = importlib.util.spec_from_file_location("make_images", ROOT / "docs" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_pictures_come_from_the_documented_command(tiny_run: SimpleNamespace, tmp_path: Path) -> None:
    compare = tmp_path / "compare"
    compare.mkdir()
    write_reports([_cell("sam-tiny", m, 0.7 + i / 10) for i, m in enumerate(("full", "lora", "qlora"))], compare)
    docs = tmp_path / "images"
    _make_images().main(["--runs", str(tiny_run.runs), "--compare", str(compare), "--output", str(docs)])
    files = {p.name: p for p in docs.iterdir()}
    assert set(files) == {"val_grid.jpg", "overlay.jpg", "test_report.png", "compare.png"}
    assert all(0 < p.stat().st_size < 300_000 for p in files.values())
    grid = Image.open(tiny_run.runs / "version_0/val_images/epoch_000.png")
    assert Image.open(files["val_grid.jpg"]).size == (grid.width, validation_grid_height(3, PANEL))  # 3 rows kept
    assert Image.open(files["test_report.png"]).size == Image.open(tiny_run.runs / "version_1/test_report.png").size
    assert Image.open(files["compare.png"]).size == Image.open(compare / "report.png").size
    overlays = sorted((tiny_run.runs / "version_2/predictions/overlays").glob("*.jpg"))
    assert Image.open(files["overlay.jpg"]).size == Image.open(overlays[0]).size
    # the README shows the committed ones, each under the limit
    readme = (ROOT / "README.md").read_text()
    for name in files:
        assert f"docs/images/{name}" in readme
        assert 0 < (ROOT / "docs" / "images" / name).stat().st_size < 300_000


def _cell(model: str, method: str, dice: float, status: str = "ok") -> dict:
    return {
        "model": model, "method": method, "status": status, "test_dice": dice if status == "ok" else None,
        "peak_memory_mb": 500 + 100 * dice, "train_time_s": 10 * dice, "memory_kind": "rss",
    }  # fmt: skip


def test_compare_plot_names_every_cell_with_units(tmp_path: Path) -> None:
    from segtune.compare import plot_report

    models = ["sam-tiny", "samhq-tiny", "sam2-tiny", "sam3tracker-tiny"]
    rows = [_cell(m, k, 0.5 + 0.03 * i) for i, (m, k) in enumerate((m, k) for m in models for k in ("a", "b", "c"))]
    rows.append(_cell("sam-tiny", "d", 0.0, status="failed"))
    figure = plot_report(rows, tmp_path / "report.png")
    assert Image.open(tmp_path / "report.png").size == (1200, 480)
    (legend,) = figure.legends
    assert _texts(legend.get_texts()) == [f"{r['model']} / {r['method']}" for r in rows[:12]]  # one per cell
    markers = {(h.get_facecolor()[0].tobytes(), h.get_paths()[0].vertices.tobytes()) for h in legend.legend_handles}
    assert len(markers) == 12  # colour (model) and marker (method) tell every cell apart
    memory, time = figure.axes
    assert memory.get_xlabel() == "peak process memory, RSS (MiB)" and time.get_xlabel() == "train time (s)"
    assert memory.get_ylabel() == "test Dice (mean over instances, 0-1)"
    assert "12 of 13 cells" in figure.get_suptitle()
    assert any("failed" in t and "sam-tiny / d" in t for t in _texts(figure.texts))


def test_figures_are_saved_as_opaque_rgb_at_their_pixel_size_and_replace_atomically(tmp_path: Path) -> None:
    from segtune.visualise import _figure, save_figure

    fig = _figure(300, 200)
    fig.text(0.5, 0.5, "segtune", ha="center")
    target = tmp_path / "pictures" / "grid.png"
    target.parent.mkdir()
    target.write_bytes(b"an older picture")
    assert save_figure(fig, target) == target
    with Image.open(target) as picture:
        assert picture.mode == "RGB" and picture.size == (300, 200)
        pixels = np.asarray(picture)
    assert (pixels == 255).all(axis=2).mean() > 0.9 and (pixels < 128).any()  # white page, dark text
    assert [p.name for p in target.parent.iterdir()] == ["grid.png"]  # no temporary file left
