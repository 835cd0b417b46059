"""The shipped ``segtune tune`` example with real weights, end to end: the study, then the held-out test of its best
trial against the default recipe (the config's own values, trial 0) and the untuned model, in one run.

Too long for the test suite (minutes per trial on a 2-core CPU), so it lives here. It runs, from a scratch folder,

    segtune tune --config configs/tune_litemedsam_flakes.yaml --search configs/search_litemedsam_flakes.yaml \
        --trials N --data.init_args.root <flakes>

then ``segtune test`` of the best trial's and of trial 0's best checkpoint with the untuned model beside each
(``TestReport``, ``untuned: true``), and prints the table of docs/tune.md: held-out test Dice of the untuned model,
the default recipe and the best trial, the paired intervals best - untuned and best - default over the held-out
instances (``segtune.paired``), the trial count and the wall time of the study.

    python benchmarks/tune_example.py --trials 8
    python benchmarks/tune_example.py --trials 2 --work /tmp/tune_example     # a quick check that it all runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segtune.paired import format_interval, paired_rows  # noqa: E402
from segtune.tune.report import COLUMNS  # noqa: E402

FLAKES = ROOT.parent / "shared" / "data" / "bn-flakes-coco"
CONFIG = ROOT / "configs" / "tune_litemedsam_flakes.yaml"
SEARCH = ROOT / "configs" / "search_litemedsam_flakes.yaml"
STUDY = "tune_litemedsam_flakes"


def segtune(args: list[str], cwd: Path, log: Path) -> float:
    """Run ``python -m segtune <args>`` in ``cwd`` with its output in ``log``; its wall seconds. Stops on failure."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "segtune", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"segtune {args[0]} failed ({done.returncode}): see {log}")
    return time.perf_counter() - start


def test_trial(trial: dict, root: Path, work: Path) -> dict:
    """``segtune test`` of one trial's best checkpoint with the untuned model beside it: its test_metrics.json."""
    run = work / trial["run"]  # the report's run folders are relative to where segtune tune ran (or absolute)
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    if not best:
        raise SystemExit(f"trial {trial['trial']}: no best checkpoint in {run / 'checkpoints'}")
    name = f"test_trial_{trial['trial']}"
    # the study's config carves its training and validation images out of the export's valid/ folder; the test
    # reads the export as it is (its test/ folder), as docs/tune.md's test lines do
    segtune(["test", "--config", str(run / "config.yaml"), "--data.init_args.root", str(root),
             "--data.init_args.layout", "roboflow",
             "--ckpt_path", str(best[-1]), "--trainer.callbacks+=segtune.callbacks.TestReport",
             "--trainer.callbacks.untuned=true", "--trainer.callbacks.picture=false",
             "--trainer.logger.init_args.save_dir", str(work / "tests"), "--trainer.logger.init_args.name", name,
             "--trainer.logger.init_args.version", "null"], work, work / f"{name}.log")  # fmt: skip
    return json.loads(max((work / "tests" / name).glob("version_*/test_metrics.json")).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--root", type=Path, default=FLAKES)
    parser.add_argument("--work", type=Path, help="a new or empty folder (default: a temporary one)")
    args = parser.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"{args.root}: the shared flakes set is not here")
    work = args.work or Path(tempfile.mkdtemp(prefix="tune_example_"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work}: not empty (the study would resume there)")
    wall = segtune(["tune", "--config", str(CONFIG), "--search", str(SEARCH), "--trials", str(args.trials),
                    "--data.init_args.root", str(args.root.resolve())], work, work / "tune.log")  # fmt: skip
    trials = json.loads(next(work.glob(f"**/{STUDY}/tune_report.json")).read_text())
    complete = [t for t in trials if t["state"] == "complete" and t["val_dice"] is not None]
    best = max(complete, key=lambda t: t["val_dice"])
    default = next(t for t in trials if t["baseline"])
    if default["state"] != "complete":
        raise SystemExit(f"trial {default['trial']} (the config's own values) ended {default['state']}")
    best_report = test_trial(best, args.root.resolve(), work)
    default_report = best_report if best is default else test_trial(default, args.root.resolve(), work)
    untuned = best_report["untuned"]
    over_default = paired_rows(default_report["per_instance"], best_report["per_instance"])["overall"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")}
    print(f"{len(trials)} trials ({states}), study wall {wall:.1f} s; {work}")
    print("| held-out test | test Dice | val_dice |\n|---|---|---|")
    print(f"| untuned | {untuned['overall']['dice']:.4f} | {best['untuned_val_dice']:.4f} |")
    print(f"| default recipe (trial {default['trial']}) | {default_report['overall']['dice']:.4f} | "
          f"{default['val_dice']:.4f} |")  # fmt: skip
    params = {k: v for k, v in best.items() if k not in COLUMNS}  # the searched keys, beside the report's columns
    print(f"| best trial ({best['trial']}: {params}) | {best_report['overall']['dice']:.4f} | "
          f"{best['val_dice']:.4f} |")  # fmt: skip
    print(f"best - untuned: {format_interval(untuned['difference']['dice']['overall'])}")
    print(f"best - default: {format_interval(over_default)}")


if __name__ == "__main__":
    main()
