"""Corrective clicks on real data: Dice after the box and after 1, 3 and 5 clicks, NoC@85/90 and the curve's
AUC, for a model (the untuned LiteMedSAM by default) on the test splits of the shared sets.

Each row is one in-process ``segtune test`` through the CLI with ``model.init_args.clicks`` set and the click
rule and mask input of the variant. Image sets run ``configs/decoder_litemedsam_kvasir.yaml``'s model on a
Roboflow COCO export (every class, as the export names them); the volume set (``hippocampus``) runs
``configs/volumes_hippocampus.yaml`` (box3d propagation, then one 3D click per class and round, its slice
predicted again and propagated from: :mod:`segtune.volume_clicks`), and its table also gives the NSD after each
click. The table gives the means over instances (volumes: (case, class) rows) that ``test_metrics.json`` holds,
the instances and images (cases) scored, and wall and CPU seconds (user + system of this process; the encoder's
outputs come from a disk embedding cache, so a second variant on a set only decodes).

    python benchmarks/clicks.py                                 # flakes (all 10), brain MRI (first 40 images)
    python benchmarks/clicks.py --sets flakes --variants center center-nomask random --clicks 5
    python benchmarks/clicks.py --sets hippocampus --variants center --ckpt CKPT  # volumes (its test split)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.volume_speed import timed  # noqa: E402  (wall and CPU seconds of one segtune command)

CONFIG = ROOT / "configs" / "decoder_litemedsam_kvasir.yaml"
VOLUME_CONFIG = ROOT / "configs" / "volumes_hippocampus.yaml"
SHARED = ROOT.parent / "shared" / "data"
#: set name -> (folder, images of its test split scored: 0 for all)
SETS = {"flakes": (SHARED / "bn-flakes-coco", 0), "brain": (SHARED / "brain-tumor-mri-coco", 40),
        "hippocampus": (SHARED / "hippocampus-mri-nifti-40", 0)}  # fmt: skip
#: the sets of volumes (scored by VOLUME_CONFIG: its split, layout and volume scoring)
VOLUME_SETS = ("hippocampus",)
CLICKS = "--model.init_args.click_scoring."
#: variant name -> the click_scoring settings it changes
VARIANTS: dict[str, list[str]] = {
    "center": [f"{CLICKS}rule", "center", f"{CLICKS}mask_input", "true"],
    "center-nomask": [f"{CLICKS}rule", "center", f"{CLICKS}mask_input", "false"],
    "random": [f"{CLICKS}rule", "random", f"{CLICKS}mask_input", "true"],
}


def run(name: str, variant: str, args: argparse.Namespace, work: Path) -> dict:
    root, images = SETS[name]
    images = args.images or images
    out = work / f"{name}-{variant}"
    data = (
        ["--config", str(VOLUME_CONFIG), "--data.init_args.root", str(root)] if name in VOLUME_SETS
        else ["--config", str(CONFIG), "--data.init_args.root", str(root), "--data.init_args.layout", "roboflow",
              "--data.init_args.categories", "null", "--data.init_args.batch_size", "1"]
    )  # fmt: skip
    common = [
        *data, "--model.init_args.model", args.model, "--model.init_args.clicks", str(args.clicks), *VARIANTS[variant],
        "--model.init_args.embedding_cache", "disk", "--model.init_args.embedding_cache_dir", args.cache_dir,
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.picture=false",
    ]  # fmt: skip
    if images:
        common += ["--trainer.limit_test_batches", str(images)]
    if args.ckpt:
        common += ["--ckpt_path", str(args.ckpt)]
    with contextlib.chdir(work):
        wall, cpu = timed(["test", *common])
    found = next(out.glob("*/version_*/test_metrics.json"))
    report = json.loads(found.read_text())
    if args.keep:  # the run's test_metrics.json and per-case (per-image) csv, to read before explaining a number
        kept = args.keep / f"{name}-{variant}"
        kept.mkdir(parents=True, exist_ok=True)
        for written in found.parent.glob("test_*"):
            shutil.copy(written, kept / written.name)
    scored = len(report[f"per_{report['unit']}"])  # images, or cases
    return {"set": name, "variant": variant, "overall": report["overall"], "images": scored, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--variants", nargs="+", default=["center", "center-nomask"], choices=list(VARIANTS))
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--images", type=int, default=0, help="score the first N test images of each set (0: SETS')")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--ckpt", type=Path, help="a fit's checkpoint (default: the untuned model)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "segtune_clicks_cache"))
    parser.add_argument("--keep", type=Path, help="copy each run's test_metrics.json and per-case csv here")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, variant, args, Path(tmp)) for name in args.sets for variant in args.variants]
    shown = [c for c in (0, 1, 3, 5) if c <= args.clicks]
    columns = ["box" if c == 0 else f"{c} click{'s' * (c > 1)}" for c in shown]
    volumes = any(name in VOLUME_SETS for name in args.sets)  # NSD after each click beside the Dice
    if volumes:
        columns += [f"NSD {c}" for c in columns]
    lines = ["| set | variant | images | instances | " + " | ".join(columns) +
             " | AUC | NoC@85 | NoC@90 | wall s | CPU s |",
             "|---" * (len(columns) + 9) + "|"]  # fmt: skip
    for r in rows:
        o = r["overall"]
        dice = [o["dice"] if c == 0 else o[f"dice_click_{c}"] for c in shown]
        if volumes:
            dice += [o.get("nsd" if c == 0 else f"nsd_click_{c}", float("nan")) for c in shown]
        cells = [f"{v:.4f}" for v in dice] + [f"{o['click_auc']:.4f}", f"{o['noc_85']:.2f}", f"{o['noc_90']:.2f}"]
        lines.append(f"| {r['set']} | {r['variant']} | {r['images']} | {o['instances']} | " + " | ".join(cells)
                     + f" | {r['wall']:.1f} | {r['cpu']:.1f} |")  # fmt: skip
    model = f"checkpoint {args.ckpt}" if args.ckpt else f"untuned {args.model}"
    title = f"{model}, {args.clicks} clicks per instance, Dice means over instances (test splits)"
    print(f"\n{title}\n\n" + "\n".join(lines))
    if args.write:
        from benchmarks.results import append_section

        append_section(f"corrective clicks, {title}", [f"Load average at the end: {os.getloadavg()[0]:.1f}."],
                       "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    main()
