"""``segtune compare``: a matrix of model presets x methods on one dataset, one process per cell.

Each cell is a ``segtune fit`` then a ``segtune test`` of its best checkpoint, run as child
processes with their own run folder, so a crash or out-of-memory in one cell cannot stop the
others. A cell that finished is skipped when the comparison runs again; a failed one is retried.
The reports (``report.md``, ``report.csv``, ``report.json``, ``report.png``) and the aggregate over
cells (``aggregate.json``, ``aggregate.md``) are rebuilt from the cells' own files every time.
Arguments for the cells are checked against ``segtune fit``'s parser once, before any cell runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from segtune.files import read_yaml
from segtune.reports import markdown_cell
from segtune.untuned import UNTUNED_FILE

log = logging.getLogger(__name__)

STATS_FILE = "cell_stats.json"
RESULT_FILE = "cell.json"
COLUMNS = [
    "model", "method", "status", "trainable_params", "total_params", "train_time_s", "time_per_step_s",
    "peak_memory_mb", "memory_kind", "final_train_loss", "best_val_loss", "best_val_dice", "val_dice_gain",
    "val_dice_gain_ci95", "test_dice", "test_iou", "error",
]  # fmt: skip
#: The method name of each model's untuned row. Its ``best_val_dice`` is the validation Dice a fit of
#: the model measured before its first optimiser step (:mod:`segtune.untuned`); its test Dice comes
#: from the first cell of the model whose test also scored the untuned model: no run is added for it.
UNTUNED = "(untuned)"
#: Added to that one test: the untuned model beside the checkpoint (TestReport's ``untuned``).
UNTUNED_TEST = ["--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.untuned=true"]
#: The quantities ``aggregate.json`` summarises (mean, min, max) over the cells that finished.
AGGREGATED = ["train_time_s", "time_per_step_s", "peak_memory_mb", "test_dice"]


class CellStats(Callback):
    """Written by every compare cell's fit: parameters, train time, time per step, peak memory, last loss."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()
        self.start_step = trainer.global_step
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = time.perf_counter() - self.start
        steps = max(1, trainer.global_step - self.start_step)
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated() / 2**20, "gpu"
        else:  # ru_maxrss is in KiB on Linux: the process's peak resident memory
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"
        loss = trainer.callback_metrics.get("train_loss")
        stats = {
            "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in pl_module.parameters()),
            "train_time_s": elapsed,
            "time_per_step_s": elapsed / steps,
            "peak_memory_mb": peak,
            "memory_kind": kind,
            "final_train_loss": float(loss) if loss is not None else None,
        }
        folder = trainer.log_dir  # a collective call under DDP: every process makes it
        if trainer.is_global_zero and folder:
            (Path(folder) / STATS_FILE).write_text(json.dumps(stats, indent=2))


@dataclass
class Cell:
    """One model x method run."""

    model: str
    method: str
    method_config: dict[str, Any]
    folder: Path
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        path = self.folder / RESULT_FILE
        return path.is_file() and json.loads(path.read_text()).get("status") == "ok"


def _load_compare_config(path: Path) -> dict[str, Any]:
    config = read_yaml(path, "compare config")
    missing = [k for k in ("base_config", "models", "methods") if k not in (config or {})]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    return config


def _one_line_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith(("segtune", "error:"))]
    return (errors or lines or ["exited without a message"])[-1][:300]


def _last_metrics(metrics_csv: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    if metrics_csv.is_file():
        with open(metrics_csv) as f:
            for row in csv.DictReader(f):
                out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def _best(metrics_csv: Path, key: str, best: Any = max) -> float | None:
    values = []
    if metrics_csv.is_file():
        with open(metrics_csv) as f:
            values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return best(values) if values else None


def _segtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "segtune", *args]


def _method_args(method_config: dict[str, Any]) -> list[str]:
    args = ["--model.class_path", method_config["class_path"]]
    for key, value in (method_config.get("init_args") or {}).items():
        args += [f"--model.init_args.{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def check_fit_arguments(base_config: Path, methods: dict[str, dict[str, Any]], overrides: list[str]) -> str | None:
    """Parse each method's ``segtune fit`` arguments without running anything; the first error, or ``None``.

    The parse is ``fit --print_config`` in this process, once per method (a method's own init_args
    decide which ``--model.init_args.*`` exist). The model is the ``sam-tiny`` preset there, so no
    hub is asked: the model name does not change which arguments parse.
    """
    for name, method in methods.items():
        args = ["fit", "--config", str(base_config), *_method_args(method), "--model.init_args.model", "sam-tiny"]
        parsed = dry_parse([*args, *overrides])
        if not parsed.ok:
            return f"method {name}: {parser_error(parsed.stderr)}"
    return None


@dataclass(frozen=True)
class DryParse:
    """What ``segtune <args> --print_config`` said: whether the parser accepted the arguments, the resolved
    config it printed (YAML) and its error output."""

    ok: bool
    config: str
    stderr: str


def dry_parse(args: list[str]) -> DryParse:
    """Parse ``segtune`` arguments (``fit --config ...``) in this process without running anything:
    ``--print_config`` is added, so nothing is instantiated and no run folder is made."""
    from segtune.cli import main  # segtune.cli imports this module

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = saved[:1]  # LightningCLI warns when given arguments while the command line holds others
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([*args, "--print_config"])
                code: Any = 0
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = saved
    return DryParse(code in (0, None), out.getvalue(), err.getvalue())


def check_models(models: list[str], config: Path) -> None:
    """Resolve every model of the comparison (preset, folder or hub id) before any cell runs.

    Raises:
        ValueError: naming the config and the first model that cannot be found.
    """
    from segtune.models.loading import ModelNotFoundError, preprocessing_for

    for model in models:
        try:
            preprocessing_for(model)
        except ModelNotFoundError as e:
            raise ValueError(f"{config}: models: {e}") from None


def parser_error(stderr: str) -> str:
    """jsonargparse's error on one line: its ``error:`` line and the line naming the bad option."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith(("error:", "segtune: error:"))), None)
    if start is None:
        return (lines or ["segtune fit refused the arguments"])[-1]
    detail = [ln for ln in lines[start + 1 :] if "not accepted" in ln or "nrecognized" in ln]
    return " ".join([lines[start], *detail[:1]])


def run_cell(cell: Cell, base_config: Path, overrides: list[str], untuned_test: bool = False) -> dict[str, Any]:
    """Fit then test one cell in child processes; the result row (also written to ``cell.json``).

    With ``untuned_test`` the test also scores the untuned model (its Dice goes to the model's untuned row).
    """
    cell.folder.mkdir(parents=True, exist_ok=True)
    method_args = _method_args(cell.method_config)
    common = ["--config", str(base_config), *method_args, "--model.init_args.model", cell.model, *overrides]
    logger = [
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(cell.folder),
        "--trainer.logger.name", "", "--trainer.logger.version",
    ]  # fmt: skip
    result: dict[str, Any] = {"model": cell.model, "method": cell.method, "status": "failed", "error": ""}
    fit = subprocess.run(
        _segtune("fit", *common, *logger, "fit", "--trainer.callbacks+=segtune.compare.CellStats"),
        capture_output=True, text=True,
    )  # fmt: skip
    (cell.folder / "fit.log").write_text(fit.stdout + fit.stderr)
    fit_dir = cell.folder / "fit"
    best = sorted((fit_dir / "checkpoints").glob("best-*.ckpt"))
    if fit.returncode != 0 or not best:
        result["error"] = _one_line_error(fit.stderr) if fit.returncode else "fit wrote no best checkpoint"
    else:
        untuned = UNTUNED_TEST if untuned_test else []
        test = subprocess.run(
            _segtune("test", *common, *logger, "test", "--ckpt_path", str(best[-1]), *untuned),
            capture_output=True, text=True,
        )  # fmt: skip
        (cell.folder / "test.log").write_text(test.stdout + test.stderr)
        if test.returncode != 0:
            result["error"] = _one_line_error(test.stderr)
        else:
            tested = _last_metrics(cell.folder / "test" / "metrics.csv")
            result.update(status="ok", test_dice=tested.get("test_dice"), test_iou=tested.get("test_iou"))
            report = cell.folder / "test" / "test_metrics.json"
            side = json.loads(report.read_text()).get("untuned") if untuned_test and report.is_file() else None
            if side:
                result.update(untuned_test_dice=side["overall"]["dice"], untuned_test_iou=side["overall"]["iou"])
    stats = fit_dir / STATS_FILE
    if stats.is_file():
        result.update(json.loads(stats.read_text()))
    result["best_val_dice"] = _best(fit_dir / "metrics.csv", "val_dice")
    result.update(untuned_scores(fit_dir))
    result["best_val_loss"] = _best(fit_dir / "metrics.csv", "val_loss", min)
    (cell.folder / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def untuned_scores(fit_dir: Path) -> dict[str, Any]:
    """The untuned validation Dice a cell's fit logged, and the best epoch's paired gain over it with its
    95% bootstrap interval (from the fit's ``untuned.json``). When no epoch beat the untuned model, the best
    checkpoint (the one the cell tests) is the untuned model: ``best_val_dice`` is then its Dice and
    ``best_is_untuned`` says so."""
    out: dict[str, Any] = {"untuned_val_dice": _best(fit_dir / "metrics.csv", "untuned_val_dice")}
    path = fit_dir / UNTUNED_FILE
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("best_checkpoint_is_untuned") and summary.get("monitor") == "val_dice":
        out.update(best_val_dice=summary.get("untuned"), best_is_untuned=True)
    gain = summary.get("difference", {}).get("overall") if summary.get("monitor") == "val_dice" else None
    if gain:
        out["val_dice_gain"] = gain["mean"]
        out["val_dice_gain_ci95"] = f"[{gain['low']:+.4f}, {gain['high']:+.4f}]"
    return out


def with_untuned_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with an untuned row before each model's cells, from the first of its cells whose fit
    measured the untuned model (QLoRA's quantised base may differ slightly: its gain is against its own)."""
    out: list[dict[str, Any]] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = [r for r in rows if r["model"] == model]
        val = [r["untuned_val_dice"] for r in cells if r.get("untuned_val_dice") is not None]
        test = [r for r in cells if r.get("untuned_test_dice") is not None]
        if val or test:
            out.append({
                "model": model, "method": UNTUNED, "status": "ok", "best_val_dice": val[0] if val else None,
                "test_dice": test[0]["untuned_test_dice"] if test else None,
                "test_iou": test[0]["untuned_test_iou"] if test else None,
            })  # fmt: skip
        out += cells
    return out


def write_reports(rows: list[dict[str, Any]], folder: Path) -> None:
    """``report.csv``, ``report.json``, ``report.md`` (with each model's untuned row), ``report.png``
    (Dice vs peak memory and time) and the aggregate over cells (``aggregate.json``, ``aggregate.md``)."""
    full = [{c: row.get(c) for c in COLUMNS} for row in with_untuned_rows(rows)]
    cells = [{c: row.get(c) for c in COLUMNS} for row in rows]
    (folder / "report.json").write_text(json.dumps(full, indent=2))
    with open(folder / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(full)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(markdown_cell(r[c]) for c in COLUMNS) + " |" for r in full]
    (folder / "report.md").write_text("# segtune compare\n\n" + "\n".join(md) + "\n")
    summary = aggregate(cells)  # over the cells that ran: the untuned rows are no cells
    (folder / "aggregate.json").write_text(json.dumps(summary, indent=2))
    (folder / "aggregate.md").write_text(_aggregate_markdown(summary))
    plot_report(cells, folder / "report.png")


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison over cells: success rate, mean/min/max of each of :data:`AGGREGATED` over the
    cells that finished, and each cell's best validation loss (lowest epoch ``val_loss`` of its fit)."""

    def stats(key: str) -> dict[str, float | None]:
        values = [float(r[key]) for r in rows if r["status"] == "ok" and r.get(key) is not None]
        values = [v for v in values if math.isfinite(v)]
        if not values:
            return {"mean": None, "min": None, "max": None, "cells": 0}
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "cells": len(values)}

    ok = sum(r["status"] == "ok" for r in rows)
    return {
        "cells": len(rows),
        "ok": ok,
        "failed": len(rows) - ok,
        "success_rate": ok / len(rows) if rows else None,
        **{key: stats(key) for key in AGGREGATED},
        "best_val_loss": [
            {"model": r["model"], "method": r["method"], "status": r["status"], "best_val_loss": r.get("best_val_loss")}
            for r in rows
        ],
    }


def _aggregate_markdown(summary: dict[str, Any]) -> str:
    rate = summary["success_rate"]
    lines = [
        "# segtune compare: aggregate over cells",
        "",
        f"{summary['ok']} of {summary['cells']} cells finished"
        + (f" (success rate {rate:.0%})." if rate is not None else "."),
        "",
        "| over finished cells | mean | min | max | cells |",
        "|---|---|---|---|---|",
    ]
    for key in AGGREGATED:
        s = summary[key]
        lines.append(
            "| " + " | ".join([key, *(markdown_cell(s[k]) for k in ("mean", "min", "max")), str(s["cells"])]) + " |"
        )
    lines += ["", "| model | method | status | best val_loss |", "|---|---|---|---|"]
    lines += [
        "| "
        + " | ".join(
            [markdown_cell(r["model"]), markdown_cell(r["method"]), r["status"], markdown_cell(r["best_val_loss"])]
        )
        + " |"
        for r in summary["best_val_loss"]
    ]
    return "\n".join(lines) + "\n"


# Methods are told apart by marker, models by colour: 7 x 8 cells stay distinguishable.
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def plot_report(rows: list[dict[str, Any]], path: Path) -> Any:
    """Draw ``report.png``: test Dice against peak memory and against train time, one point per cell.

    Each cell has one legend entry (``model / method``, placed beside the axes so points stay
    visible); colour marks the model and marker shape the method. Failed cells are named under the plot.

    Returns:
        The (closed) matplotlib figure, for its titles and labels.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok" and r["test_dice"] is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20").colors
    kind = (done[0]["memory_kind"] or "peak").upper() if done else "peak"
    memory_label = {"GPU": "peak GPU memory allocated (MiB)", "RSS": "peak process memory, RSS (MiB)"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, label in (
        (axes[0], "peak_memory_mb", memory_label.get(kind, "peak memory (MiB)")),
        (axes[1], "train_time_s", "train time (s)"),
    ):
        for r in done:
            if r[key] is None:
                continue
            ax.scatter(
                r[key], r["test_dice"], s=55, alpha=0.85, edgecolors="black", linewidths=0.5,
                color=colours[models.index(r["model"]) % len(colours)],
                marker=MARKERS[methods.index(r["method"]) % len(MARKERS)],
                label=f"{r['model']} / {r['method']}",
            )  # fmt: skip
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test Dice (mean over instances, 0-1)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=8,
                   title="model / method", title_fontsize=9, frameon=False)  # fmt: skip
    failed = [f"{r['model']} / {r['method']}" for r in rows if r["status"] != "ok"]
    fig.suptitle(f"segtune compare: test Dice of {len(done)} of {len(rows)} cells", fontsize=11)
    if failed:
        shown = ", ".join(failed[:6]) + (f" and {len(failed) - 6} more" if len(failed) > 6 else "")
        fig.text(0.01, 0.01, f"failed (see report.md): {shown}", fontsize=8, color="firebrick")
    fig.subplots_adjust(left=0.07, right=0.78, bottom=0.16, top=0.9, wspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def _select(names: list[str], wanted: list[str] | None, what: str, config: Path) -> list[str]:
    """``names`` filtered to ``wanted`` (comma- or space-separated), in the config's order."""
    if not wanted:
        return names
    chosen = [w for item in wanted for w in item.split(",") if w]
    unknown = [w for w in chosen if w not in names]
    if unknown:
        raise ValueError(f"{config}: no {what} {', '.join(unknown)} (it has {', '.join(names)})")
    return [n for n in names if n in chosen]


def compare_command(argv: list[str]) -> int:
    """Run (or list, with ``--dry-run``) the cells of a comparison and write its reports.

    Every cell's arguments and model are checked before any cell runs (also with ``--dry-run``);
    bad input raises one line (``OSError``, ``ValueError``) that ``segtune``'s main prints.
    """
    parser = argparse.ArgumentParser(
        prog="segtune compare",
        description="Compare model presets x methods. Other --key value arguments go to every cell's fit and test.",
        allow_abbrev=False,  # --model.init_args.* must never be read as an abbreviation of --models
    )
    parser.add_argument("--config", required=True, type=Path, help="a compare YAML (see configs/compare.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
    parser.add_argument("--epochs", type=int, help="max_epochs for every cell")
    parser.add_argument("--data.root", dest="data_root", help="data root for every cell")
    parser.add_argument("--output", type=Path, help="compare folder (default: the config's output)")
    parser.add_argument("--models", nargs="+", metavar="MODEL", help="only these of the config's models")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="only these of the config's methods")
    args, extra = parser.parse_known_args(argv)
    config = _load_compare_config(args.config)
    base = (args.config.parent / config["base_config"]).resolve()
    folder = Path(args.output or config.get("output", "runs/compare"))
    overrides = [str(o) for o in config.get("overrides", [])] + extra
    if args.epochs is not None:
        overrides += ["--trainer.max_epochs", str(args.epochs)]
    if args.data_root:
        overrides += ["--data.init_args.root", args.data_root]
    models = _select(list(config["models"]), args.models, "model", args.config)
    methods = _select(list(config["methods"]), args.methods, "method", args.config)
    all_cells = [
        Cell(model, name, method, folder / f"{model}__{name}")
        for model in config["models"]
        for name, method in config["methods"].items()
    ]
    cells = [c for c in all_cells if c.model in models and c.method in methods]
    # An argument fit does not know would fail every cell, one after the other: refuse it here, once.
    error = check_fit_arguments(base, {m: config["methods"][m] for m in methods}, overrides)
    if error:
        raise ValueError(f"{args.config}: an argument for the cells is not one of segtune fit's: {error}")
    check_models(models, args.config)  # a misspelled model would fail its cells after the others trained
    if args.dry_run:
        for c in cells:
            print(f"{c.model:<24} {c.method:<12} {'done' if c.finished else 'to run'}  {c.folder}")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for c in cells:
        if c.finished:
            print(f"{c.model} / {c.method}: done, skipped")
            continue
        print(f"{c.model} / {c.method}: running", flush=True)
        # one test per model also scores the untuned model, until one has
        done = [rows.get(o.folder.name) or _result(o) for o in all_cells if o.model == c.model and o is not c]
        untuned_test = not any(r and r.get("untuned_test_dice") is not None for r in done)
        row = run_cell(c, base, overrides, untuned_test)
        print(f"{c.model} / {c.method}: {row['status']} {row.get('error') or ''}".rstrip(), flush=True)
        rows[c.folder.name] = row
    # The reports cover every cell of the config that has a result, also those a filter left out now.
    reported = [rows.get(c.folder.name) or _result(c) for c in all_cells]
    write_reports([r for r in reported if r], folder)
    print(f"Reports: {folder / 'report.md'} (.csv, .json, .png); aggregate over cells: {folder / 'aggregate.json'}")
    selected = [rows.get(c.folder.name) or _result(c) for c in cells]
    return 0 if all(r and r["status"] == "ok" for r in selected) else 1


def _result(cell: Cell) -> dict[str, Any] | None:
    path = cell.folder / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
