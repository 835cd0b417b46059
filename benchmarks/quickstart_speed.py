"""Quickstart speed: what each candidate costs in the quickstart's epochs, measured side by side in one run.

Runs short fits of ``configs/quickstart.yaml`` (in-process, through segtune's CLI, on the synthetic shapes
written once) with one candidate changed at a time, in rounds (every candidate once per round, so a load
that comes and goes reaches all of them), and reports each candidate's fastest epoch (wall, and the CPU
seconds of this process and its DataLoader workers) and where the as-shipped epochs' time goes.

    python benchmarks/quickstart_speed.py                 # 2 rounds of 2-epoch fits
    python benchmarks/quickstart_speed.py --rounds 3 --write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from epoch_speed import PARTS  # noqa: E402
from results import append_section  # noqa: E402
from train_speed import _load, fmt  # noqa: E402

from segtune.cli import DEFAULTS  # noqa: E402
from segtune.cli import main as segtune_main  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.yaml"

#: name -> (extra CLI arguments, torch threads or None, a change to segtune's default callbacks or None)
CANDIDATES: dict[str, tuple[list[str], int | None, str | None]] = {
    "as shipped": ([], None, None),
    "fast_attention false": (["--model.init_args.fast_attention", "false"], None, None),
    "validation pictures every epoch": ([], None, "pictures"),
    "no validation pictures": ([], None, "no pictures"),
    "1 torch thread": ([], 1, None),
    "num_workers 1": (["--data.init_args.num_workers", "1", "--data.init_args.persistent_workers", "true"], None, None),
    "1 torch thread + num_workers 1": (
        ["--data.init_args.num_workers", "1", "--data.init_args.persistent_workers", "true"],
        1,
        None,
    ),  # fmt: skip
    "cache_images 0": (["--data.init_args.cache_images", "0"], None, None),
    "bf16-mixed": (["--trainer.precision", "bf16-mixed"], None, None),
    "cache_images 0 + num_workers 1": (
        [
            "--data.init_args.cache_images",
            "0",
            "--data.init_args.num_workers",
            "1",
            "--data.init_args.persistent_workers",
            "true",
        ],
        None,
        None,
    ),  # fmt: skip
}


def callbacks_config(change: str, folder: Path) -> list[str]:
    """A config file replacing segtune's default callbacks with the validation pictures every epoch, or none."""
    defaults = yaml.safe_load(DEFAULTS.read_text())
    callbacks = []
    for callback in defaults["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ValidationImages"):
            if change == "no pictures":
                continue
            callback = {**callback, "init_args": {**callback.get("init_args", {}), "every_n_epochs": 1}}
        callbacks.append(callback)
    path = folder / f"callbacks-{change.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return ["--config", str(path)]


def fit(name: str, epochs: int, work: Path, data: Path) -> list[dict]:
    extra, threads, change = CANDIDATES[name]
    out = work / "epochs.json"
    timer = json.dumps({"class_path": "epoch_speed.EpochTimer", "init_args": {"out": str(out)}})
    args = ["fit", "--config", str(QUICKSTART), *(callbacks_config(change, work) if change else [])]
    args += ["--data.init_args.root", str(data), "--trainer.max_epochs", str(epochs), *extra]
    args += ["--trainer.enable_progress_bar", "false", f"--trainer.callbacks+={timer}"]
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings(), contextlib.chdir(work):
            warnings.simplefilter("ignore")
            segtune_main(args)
    finally:
        torch.set_num_threads(before)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="fits per candidate (interleaved)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit")
    parser.add_argument("--only", default=None, help="comma-separated candidate names (substring match)")
    parser.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("segtune").setLevel(logging.ERROR)
    names = [n for n in CANDIDATES if not args.only or any(s.strip() in n for s in args.only.split(","))]
    epochs: dict[str, list[dict]] = {n: [] for n in names}
    loads = [_load()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data" / "shapes"
        for round_ in range(args.rounds):
            for name in names:
                work = tmp / f"{round_}-{name.replace(' ', '_')}"
                work.mkdir()
                found = fit(name, args.epochs, work, data)
                epochs[name] += found
                loads.append(_load())
                line = ", ".join(f"{e['wall']:.2f} s (CPU {e['user'] + e['system']:.2f})" for e in found)
                print(f"round {round_ + 1} {name}: epochs {line}; load {loads[-1]:.1f}", flush=True)
    tables = render(epochs)
    print("\n" + tables)
    if args.write:
        append_section(
            f"quickstart epochs, CPU ({platform.processor() or 'CPU'}, {torch.get_num_threads()} torch threads)",
            [f"{args.rounds} rounds of {args.epochs}-epoch fits of configs/quickstart.yaml per candidate, interleaved "
             f"in one process; highest 1-minute load average seen: {max(loads):.1f} on {os.cpu_count()} CPUs (other "
             "processes' load reaches every candidate alike: compare the ratios). Fastest epoch of each candidate; "
             "CPU: user + system seconds of this process and its DataLoader workers (workers are counted when "
             "they exit, so a persistent worker's CPU time shows in no epoch: only its wall time does)."],
            tables,
        )  # fmt: skip


def render(epochs: dict[str, list[dict]]) -> str:
    base = min(e["wall"] for e in epochs[next(iter(epochs))]) if epochs else None
    head = ["candidate", "fastest epoch s", "median epoch s", "CPU s of the fastest", "epoch / as shipped"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, found in epochs.items():
        fastest = min(found, key=lambda e: e["wall"])
        walls = sorted(e["wall"] for e in found)
        ratio = fastest["wall"] / base if base else None
        rows.append(f"| {name} | {fmt(fastest['wall'])} | {fmt(walls[len(walls) // 2])} | "
                    f"{fmt(fastest['user'] + fastest['system'])} | {fmt(ratio)} |")  # fmt: skip
    parts = ["", "Where the epochs' time goes (mean over every epoch of each candidate, inclusive):", ""]
    names = list(epochs)
    parts.append("| part | " + " | ".join(names) + " |")
    parts.append("|" + "---|" * (len(names) + 1))
    for label in [*PARTS, "whole epoch"]:
        cells = []
        for name in names:
            found = epochs[name]
            seconds = [e["wall"] if label == "whole epoch" else e["parts"].get(label, 0.0) for e in found]
            cells.append(fmt(sum(seconds) / len(seconds), ".3f"))
        parts.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} | " + " | ".join(cells) + " |")
    return "\n".join(rows + parts)


if __name__ == "__main__":
    main()
