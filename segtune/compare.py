"""``segtune compare``: a matrix of model presets x methods on one dataset, one process per cell.

Each cell is a ``segtune fit`` then a ``segtune test`` of its best checkpoint, run as child
processes with their own run folder, so a crash or out-of-memory in one cell cannot stop the
others. A cell that finished is skipped when the comparison runs again; a failed one is retried.
The reports (``report.md``, ``report.csv``, ``report.json``, ``report.png``) are rebuilt from the
cells' own files every time.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

STATS_FILE = "cell_stats.json"
RESULT_FILE = "cell.json"
COLUMNS = [
    "model", "method", "status", "trainable_params", "total_params", "train_time_s", "time_per_step_s",
    "peak_memory_mb", "memory_kind", "final_train_loss", "best_val_dice", "test_dice", "test_iou", "error",
]  # fmt: skip


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
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"segtune compare: {path}: config not found") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"segtune compare: {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    missing = [k for k in ("base_config", "models", "methods") if k not in (config or {})]
    if missing:
        raise SystemExit(f"segtune compare: {path}: missing {', '.join(missing)}")
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


def _best(metrics_csv: Path, key: str) -> float | None:
    values = []
    if metrics_csv.is_file():
        with open(metrics_csv) as f:
            values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return max(values) if values else None


def _segtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "segtune", *args]


def run_cell(cell: Cell, base_config: Path, overrides: list[str]) -> dict[str, Any]:
    """Fit then test one cell in child processes; the result row (also written to ``cell.json``)."""
    cell.folder.mkdir(parents=True, exist_ok=True)
    method_args = ["--model.class_path", cell.method_config["class_path"]]
    for key, value in (cell.method_config.get("init_args") or {}).items():
        method_args += [f"--model.init_args.{key}", json.dumps(value) if not isinstance(value, str) else value]
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
        test = subprocess.run(
            _segtune("test", *common, *logger, "test", "--ckpt_path", str(best[-1])), capture_output=True, text=True
        )
        (cell.folder / "test.log").write_text(test.stdout + test.stderr)
        if test.returncode != 0:
            result["error"] = _one_line_error(test.stderr)
        else:
            tested = _last_metrics(cell.folder / "test" / "metrics.csv")
            result.update(status="ok", test_dice=tested.get("test_dice"), test_iou=tested.get("test_iou"))
    stats = fit_dir / STATS_FILE
    if stats.is_file():
        result.update(json.loads(stats.read_text()))
    result["best_val_dice"] = _best(fit_dir / "metrics.csv", "val_dice")
    (cell.folder / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def write_reports(rows: list[dict[str, Any]], folder: Path) -> None:
    """``report.csv``, ``report.json``, ``report.md`` and ``report.png`` (Dice vs peak memory and time)."""
    full = [{c: row.get(c) for c in COLUMNS} for row in rows]
    (folder / "report.json").write_text(json.dumps(full, indent=2))
    with open(folder / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(full)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in full]
    (folder / "report.md").write_text("# segtune compare\n\n" + "\n".join(md) + "\n")
    _plot(full, folder / "report.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok" and r["test_dice"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    kind = done[0]["memory_kind"].upper() if done and done[0]["memory_kind"] else "peak"
    for ax, key, label in (
        (axes[0], "peak_memory_mb", f"peak memory ({kind}, MiB)"),
        (axes[1], "train_time_s", "train time (s)"),
    ):
        for r in done:
            if r[key] is None:
                continue
            ax.scatter(r[key], r["test_dice"], s=40)
            ax.annotate(f"{r['model']} / {r['method']}", (r[key], r["test_dice"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("test Dice")
        ax.grid(alpha=0.3)
    failed = [f"{r['model']} / {r['method']}" for r in rows if r["status"] != "ok"]
    fig.suptitle("test Dice per cell" + (f" (failed: {', '.join(failed)})" if failed else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_command(argv: list[str]) -> int:
    """Run (or list, with ``--dry-run``) the cells of a comparison and write its reports."""
    parser = argparse.ArgumentParser(prog="segtune compare", description="Compare model presets x methods.")
    parser.add_argument("--config", required=True, type=Path, help="a compare YAML (see configs/compare.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
    parser.add_argument("--epochs", type=int, help="max_epochs for every cell")
    parser.add_argument("--data.root", dest="data_root", help="data root for every cell")
    parser.add_argument("--output", type=Path, help="compare folder (default: the config's output)")
    args, extra = parser.parse_known_args(argv)
    config = _load_compare_config(args.config)
    base = (args.config.parent / config["base_config"]).resolve()
    folder = Path(args.output or config.get("output", "runs/compare"))
    overrides = [str(o) for o in config.get("overrides", [])] + extra
    if args.epochs is not None:
        overrides += ["--trainer.max_epochs", str(args.epochs)]
    if args.data_root:
        overrides += ["--data.init_args.root", args.data_root]
    cells = [
        Cell(model, name, method, folder / f"{model}__{name}")
        for model in config["models"]
        for name, method in config["methods"].items()
    ]
    if args.dry_run:
        for c in cells:
            print(f"{c.model:<24} {c.method:<12} {'done' if c.finished else 'to run'}  {c.folder}")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in cells:
        if c.finished:
            print(f"{c.model} / {c.method}: done, skipped")
            rows.append(json.loads((c.folder / RESULT_FILE).read_text()))
            continue
        print(f"{c.model} / {c.method}: running", flush=True)
        row = run_cell(c, base, overrides)
        print(f"{c.model} / {c.method}: {row['status']} {row.get('error') or ''}".rstrip(), flush=True)
        rows.append(row)
    write_reports(rows, folder)
    print(f"Reports: {folder / 'report.md'} (.csv, .json, .png)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
