"""Volume speed: training slices per second and scored volumes per second, through ``segtune fit`` and ``test``.

One run, per model, on the same cases: ``segtune fit`` for a given number of epochs without validation (the
training slices of the training cases; the first epoch reads and normalises each volume once, and with
``DecoderOnly`` encodes each slice once), then ``segtune test`` (every test case propagated from each
object's middle slice, scored as a volume, plus the ground-truth-box pass on every slice). Both run
in-process through segtune's CLI with ``configs/volumes_hippocampus.yaml``, only the model (and, for a random
model, the method) swapped. Wall and CPU seconds (user + system of this process) are reported; on a shared
machine the CPU seconds are the steadier measure.

Data: the first ``--cases`` cases (sorted by name) of ``../shared/data/hippocampus-mri-nifti-40``, linked
into a temporary Decathlon folder; without it, synthetic two-label phantoms (``tests/test_volumes.py``'s).

    python benchmarks/volume_speed.py                                     # sam-tiny and litemedsam, 6 cases
    python benchmarks/volume_speed.py --model sam-tiny --cases 8 --epochs 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segtune.cli import main as segtune_main  # noqa: E402

CONFIG = ROOT / "configs" / "volumes_hippocampus.yaml"
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus-mri-nifti-40"
#: a random model trains in full (its encoder has nothing to keep frozen); real weights keep the config's method
RANDOM = ["--model.class_path", "segtune.methods.FullFinetune", "--model.init_args.train_parts",
          "[vision_encoder, mask_decoder]", "--model.init_args.lr", "0.002",
          "--model.init_args.embedding_cache", "off"]  # fmt: skip


def cases(folder: Path, count: int) -> str:
    """A Decathlon folder of ``count`` cases: the shared hippocampus set's first ones, else phantoms."""
    if HIPPOCAMPUS.is_dir():
        names = sorted(p.name for p in (HIPPOCAMPUS / "imagesTr").iterdir())[:count]
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True)
            for name in names:
                os.symlink(HIPPOCAMPUS / sub / name, folder / sub / name)
        shutil.copy(HIPPOCAMPUS / "dataset.json", folder)
        return f"the first {count} cases of {HIPPOCAMPUS.name}"
    sys.path.insert(0, str(ROOT))
    from tests.test_volumes import decathlon

    decathlon(folder, cases=count)
    return f"{count} synthetic phantoms (12 x 40 x 48)"


def timed(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one in-process segtune command."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segtune_main(args)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - start, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class SliceCount(logging.Handler):
    """Training slices per epoch, from the line segtune logs (``<root>: N training slices from M cases``)."""

    def __init__(self) -> None:
        super().__init__()
        self.slices = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "training slices from" in message:
            self.slices = int(message.rsplit(": ", 1)[-1].split()[0])


def run_model(model: str, data: Path, epochs: int, work: Path) -> dict:
    common = ["--config", str(CONFIG), "--data.init_args.root", str(data), "--model.init_args.model", model,
              "--data.init_args.split_fractions", "[0.5, 0.17, 0.33]", "--trainer.enable_progress_bar", "false",
              *(RANDOM if model.endswith("-tiny") else [])]  # fmt: skip
    out = work / model
    out.mkdir(parents=True)
    counter = SliceCount()
    logger = logging.getLogger("segtune")
    level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)  # the slice count is an info line
    try:
        with contextlib.chdir(out):
            fit = timed(["fit", *common, "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0"])
            ckpt = next(Path("runs").glob("*/version_0/checkpoints/last.ckpt"))
            test = timed(["test", *common, "--ckpt_path", str(ckpt)])
            metrics = json.loads(next(Path("runs").glob("*/version_1/test_metrics.json")).read_text())
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
    return {"model": model, "epochs": epochs, "slices": counter.slices, "fit": fit,
            "volumes": len(metrics["per_case"]), "test": test}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sam-tiny", "litemedsam"])
    parser.add_argument("--cases", type=int, default=6, help="cases: 3:1:2 train, validation (not run), test")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cases"
        source = cases(data, args.cases)
        rows = [run_model(model, data, args.epochs, Path(tmp) / "runs") for model in args.model]
    print(f"\nData: {source}, split 3:1:2 train/validation/test by case (validation not run); "
          f"{args.epochs} training epoch(s) per model.\n")  # fmt: skip
    print(
        "| model | training slices x epochs | fit wall s | fit CPU s | training slices / s (wall) "
        "| test volumes | test wall s | test CPU s | scored volumes / s (wall) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["slices"] * r["epochs"]
        print(
            f"| {r['model']} | {r['slices']} x {r['epochs']} | {r['fit'][0]:.1f} | {r['fit'][1]:.1f} | "
            f"{n / r['fit'][0]:.2f} | {r['volumes']} | {r['test'][0]:.1f} | {r['test'][1]:.1f} | "
            f"{r['volumes'] / r['test'][0]:.3f} |"
        )


if __name__ == "__main__":
    main()
