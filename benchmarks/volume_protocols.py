"""Volume protocols side by side: each 3D prompt protocol and option scored on the same cases by ``segtune test``
(or ``validate``), with its scores, the ceiling column and its time, in one run.

Each variant is one in-process ``segtune test`` through the CLI with ``configs/volumes_hippocampus.yaml`` (the
model, checkpoint and data as given), only ``model.init_args.volume_scoring`` changed. The table gives, per
variant, the means over (case, class) rows that ``test_metrics.json`` holds: volume Dice and NSD (2 mm,
surface elements as published), the ceiling (every slice of the object's range prompted with its own
ground-truth box, stacked and scored as a volume), the per-slice Dice with those boxes and its box floor,
slices predicted outside the object's true range and range slices left empty; then wall and CPU seconds
(user + system of this process) and volumes scored per second.

With ``--cache off`` every variant encodes each slice of each case once (what a run without an embedding
cache pays per protocol: the speed rows); with ``--cache disk`` (default) the encoder's outputs are kept in
``--cache-dir`` and later variants (and later runs) only decode.

    python benchmarks/volume_protocols.py --ckpt runs/volumes_hippocampus/version_0/checkpoints/best.ckpt
    python benchmarks/volume_protocols.py --variants box3d box2d --cache off --cases 2     # speed rows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.volume_speed import timed  # noqa: E402  (wall and CPU seconds of one segtune command)

CONFIG = ROOT / "configs" / "volumes_hippocampus.yaml"
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus-mri-nifti-40"
SCORING = "--model.init_args.volume_scoring."
#: variant name -> the volume_scoring settings it changes
VARIANTS: dict[str, list[str]] = {
    "box3d": [f"{SCORING}prompt", "box3d"],
    "box3d+mask": [f"{SCORING}prompt", "box3d", f"{SCORING}mask_prompt", "true"],
    "box3d+lcc": [f"{SCORING}prompt", "box3d", f"{SCORING}largest_component", "true"],
    "box2d": [f"{SCORING}prompt", "box2d"],
    "box2d+mask": [f"{SCORING}prompt", "box2d", f"{SCORING}mask_prompt", "true"],
    "box2d+lcc": [f"{SCORING}prompt", "box2d", f"{SCORING}largest_component", "true"],
    "box2d-nostop": [f"{SCORING}prompt", "box2d", f"{SCORING}stop", "{min_score: 0.0, min_overlap: 0.0}",
                     f"{SCORING}choose_stop", "false"],
    # a fixed rule with the area condition: (0.5, 0.2, 0.15) had the best mean per-object Dice of the score x
    # overlap x area grid on the 4 validation cases for the untuned model (a loop over recorded steps)
    "box2d-area": [f"{SCORING}prompt", "box2d", f"{SCORING}stop",
                   "{min_score: 0.5, min_overlap: 0.2, min_area: 0.15}", f"{SCORING}choose_stop", "false"],
}  # fmt: skip
COLUMNS = ("dice", "nsd", "ceiling_dice", "ceiling_nsd", "slice_dice", "box_dice", "outside_slices", "empty_slices")


def run(variant: str, args: argparse.Namespace, work: Path) -> dict:
    common = ["--config", str(CONFIG), "--data.init_args.root", str(args.root), "--trainer.enable_progress_bar",
              "false", "--trainer.logger.init_args.save_dir", str(work / variant), *VARIANTS[variant]]  # fmt: skip
    if args.cache == "disk":
        common += ["--model.init_args.embedding_cache", "disk", "--model.init_args.embedding_cache_dir", args.cache_dir]
    else:
        common += ["--model.init_args.embedding_cache", "off"]
    if args.cases:
        common += [f"--trainer.limit_{'test' if args.stage == 'test' else 'val'}_batches", str(args.cases)]
    if args.split_fractions:
        common += ["--data.init_args.split_fractions", args.split_fractions]
    if args.ckpt:
        common += ["--ckpt_path", str(args.ckpt)]
    with contextlib.chdir(work):
        wall, cpu = timed([args.stage, *common])
    folder = max((work / variant).glob("*/version_*"), key=lambda p: p.stat().st_mtime)
    metrics_file = folder / "test_metrics.json"
    if metrics_file.is_file():
        report = json.loads(metrics_file.read_text())
        overall, volumes = report["overall"], len(report["per_case"])
    else:  # validate: the logged metrics
        rows = (folder / "metrics.csv").read_text().splitlines()
        names, values = rows[0].split(","), rows[-1].split(",")
        logged = dict(zip(names, values, strict=True))
        overall = {c: float(logged[f"val_{c}"]) for c in COLUMNS if logged.get(f"val_{c}")}
        volumes = args.cases or 0
    return {"variant": variant, "overall": overall, "volumes": volumes, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ckpt", type=Path, help="a fit's checkpoint (default: the untuned model)")
    parser.add_argument("--root", type=Path, default=HIPPOCAMPUS)
    parser.add_argument("--stage", choices=("test", "validate"), default="test")
    parser.add_argument("--cases", type=int, default=0, help="score only the first N cases (0: all of the split)")
    parser.add_argument("--split-fractions", default="", help="data.init_args.split_fractions (default: the config's)")
    parser.add_argument("--cache", choices=("disk", "off"), default="disk")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "segtune_volume_protocols_cache"))
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(variant, args, Path(tmp)) for variant in args.variants]
    model = f"checkpoint {args.ckpt}" if args.ckpt else "the untuned model"
    title = (f"{args.stage} split of {args.root.name} ({rows[0]['volumes']} volumes), {model}, embedding cache "
             f"{args.cache}; means over (case, class) rows")  # fmt: skip
    lines = ["| variant | " + " | ".join(COLUMNS) + " | wall s | CPU s | volumes / s (wall) |",
             "|---" * (len(COLUMNS) + 4) + "|"]  # fmt: skip
    for r in rows:
        cells = [f"{r['overall'].get(c, float('nan')):.3f}" for c in COLUMNS]
        rate = r["volumes"] / r["wall"] if r["wall"] else float("nan")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['wall']:.1f} | {r['cpu']:.1f} | {rate:.3f} |")
    print(f"\n{title}\n\n" + "\n".join(lines))
    if args.write:
        from benchmarks.results import append_section

        append_section(f"volume protocols, {title}", [f"Load average at the end: {os.getloadavg()[0]:.1f}."],
                       "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
