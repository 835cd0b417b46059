"""The quickstart as a user times it: ``segtune fit`` from an empty folder, whole, in phases.

Runs ``segtune fit --config <config>`` as a separate process in a fresh folder for each config, in rounds
(every config once per round, so a load that comes and goes reaches all of them), timestamps each line the
command prints as it arrives, and splits the wall time into phases:

- start-up: process start to Lightning's ``Seed set`` line (imports, parsing the config);
- data written: the synthetic export written (``writing synthetic shapes`` to the layout line);
- training: the rest up to ``Trainer.fit stopped`` (model, the untuned validation, every epoch);
- exit: from there to the end of the process (best-checkpoint report, interpreter shutdown).

It reports each phase, the best ``val_dice`` against the box floor, and the wall time as a ratio of the
first config's.

    python benchmarks/quickstart_fit.py                                  # quickstart against quickstart_lora
    python benchmarks/quickstart_fit.py --rounds 2 --write
    python benchmarks/quickstart_fit.py --configs configs/quickstart.yaml --set trainer.max_epochs=14
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import append_section  # noqa: E402

CONFIGS = [ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "quickstart_lora.yaml"]
PHASES = ["start-up", "data written", "training", "exit"]
#: the line that ends each phase but the last
MARKS = {"start-up": "Seed set to", "data written": "layout ", "training": "`Trainer.fit` stopped"}


def segtune_command() -> list[str]:
    """The ``segtune`` script beside this interpreter, else ``python -m segtune``."""
    script = Path(sys.executable).with_name("segtune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "segtune"]


def fit(config: Path, folder: Path, extra: list[str]) -> dict:
    """One fresh-folder fit: its phases in seconds, its wall and CPU time and its best scores."""
    command = [*segtune_command(), "fit", "--config", str(config), "--trainer.enable_progress_bar", "false", *extra]
    before = os.times()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    lines: list[str] = []
    writing = False  # "data written" ends at the layout line only after the export was being written
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        now = time.perf_counter() - start
        writing = writing or "writing synthetic shapes" in line
        for phase, mark in MARKS.items():
            if phase not in seen and mark in line and (phase != "data written" or writing):
                seen[phase] = now
    code = process.wait()
    wall = time.perf_counter() - start
    after = os.times()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n{''.join(lines[-30:])}")
    ends = [seen.get("start-up", 0.0), seen.get("data written"), seen.get("training", wall), wall]
    if ends[1] is None:  # the export was there already: no writing phase
        ends[1] = ends[0]
    phases = {p: end - begin for p, begin, end in zip(PHASES, [0.0, *ends[:-1]], ends, strict=True)}
    (run,) = (folder / "runs").glob("*/version_0")
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_dice")]
    best = max(rows, key=lambda r: float(r["val_dice"]))
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {
        "wall": wall, "cpu": cpu, "phases": phases, "val_dice": float(best["val_dice"]), "epoch": int(best["epoch"]),
        "box": float(best["val_box_dice"]), "epochs": int(rows[-1]["epoch"]) + 1,
    }  # fmt: skip


def render(results: dict[str, list[dict]]) -> str:
    names = list(results)
    base = min(r["wall"] for r in results[names[0]])
    head = ["config", "fits", "fastest wall s", *[f"{p} s" for p in PHASES], "CPU s", "wall / first",
            "epochs", "best val_dice (epoch)", "val_box_dice"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        fastest = min(results[name], key=lambda r: r["wall"])
        scores = ", ".join(f"{r['val_dice']:.4f} ({r['epoch']})" for r in results[name])
        rows.append(
            f"| {name} | {len(results[name])} | {fastest['wall']:.1f} | "
            + " | ".join(f"{fastest['phases'][p]:.1f}" for p in PHASES)
            + f" | {fastest['cpu']:.1f} | {fastest['wall'] / base:.2f} | {fastest['epochs']} | {scores} "
            f"| {fastest['box']:.4f} |"
        )
    walls = "; ".join(f"{n}: " + ", ".join(f"{r['wall']:.1f}" for r in results[n]) for n in names)
    return "\n".join([*rows, "", f"Every fit's wall time, s: {walls}."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=CONFIGS, help="configs to fit (first: the base)")
    parser.add_argument("--rounds", type=int, default=1, help="fits per config (interleaved)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every fit")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    extra = [a for kv in args.set for a in (f"--{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    names = [str(c.resolve().relative_to(ROOT)) if c.resolve().is_relative_to(ROOT) else str(c) for c in args.configs]
    results: dict[str, list[dict]] = {name: [] for name in names}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        for config, name in zip(args.configs, results, strict=True):
            folder = Path(tempfile.mkdtemp(prefix="quickstart-fit-"))
            try:
                found = fit(config.resolve(), folder, extra)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            results[name].append(found)
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1} {name}: {found['wall']:.1f} s, val_dice {found['val_dice']:.4f}; "
                  f"load {loads[-1]:.1f}", flush=True)  # fmt: skip
    table = render(results)
    print("\n" + table)
    if args.write:
        append_section(
            f"the quickstart fit from an empty folder, CPU ({platform.processor() or 'CPU'}, {os.cpu_count()} CPUs)",
            [f"Each fit a separate `segtune fit` process in a new folder (the synthetic export written each time); "
             f"highest 1-minute load average seen: {max(loads):.1f}. Phases of the fastest fit of each config."],
            table,
        )  # fmt: skip


if __name__ == "__main__":
    main()
