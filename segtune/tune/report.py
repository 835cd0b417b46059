"""The report of a study, rebuilt from the database and the trials' folders after every trial:
``tune_report.md``, ``.csv`` and ``.json`` (one row per trial), three plots drawn with matplotlib
(``tune_history.png``, ``tune_importance.png``, ``tune_parallel.png``) and ``best.yaml``, the full
config of the best trial, which ``segtune fit --config best.yaml`` reproduces.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import yaml

from segtune.files import write_atomically
from segtune.reports import markdown_cell
from segtune.tune.storage import import_optuna
from segtune.tune.trial import MONITOR, reproducible_config

log = logging.getLogger(__name__)

COLUMNS = [
    "trial", "state", "baseline", MONITOR, "untuned_val_dice", "gain", "gain_ci95", "epochs", "pruned_after_epoch",
    "wall_s", "run",
]  # fmt: skip
BEST = "best.yaml"


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial of ``study``: its state, score, gain over the untuned model with the interval,
    epochs run, wall time, run folder and parameters (the keys of the search file)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        ended, started = t.datetime_complete, t.datetime_start
        wall = (ended - started).total_seconds() if ended and started else None
        low, high = attrs.get("gain_low"), attrs.get("gain_high")
        rows.append({
            "trial": t.number, "state": t.state.name.lower(), "baseline": bool(attrs.get("baseline")),
            MONITOR: attrs.get(MONITOR),
            "untuned_val_dice": attrs.get("untuned_val_dice"), "gain": attrs.get("gain"),
            "gain_ci95": f"[{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else None,
            "epochs": attrs.get("epochs"), "pruned_after_epoch": attrs.get("pruned_after_epoch"), "wall_s": wall,
            "run": attrs.get("run"), "params": dict(t.params),
        })  # fmt: skip
    return rows


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda scratch: scratch.write_text(text))


def write_report(study: Any, folder: Path, plots: bool = True) -> Path | None:
    """Write the tables (and with ``plots`` the pictures) and ``best.yaml``; the path of ``best.yaml``, or None
    while no trial has completed."""
    rows = trial_rows(study)
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    flat = [{**{c: r[c] for c in COLUMNS}, **{p: r["params"].get(p) for p in params}} for r in rows]
    _write_text(folder / "tune_report.json", json.dumps(flat, indent=2))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS + params)
    writer.writeheader()
    writer.writerows(flat)
    _write_text(folder / "tune_report.csv", out.getvalue())
    best = _best(rows)
    untuned = next((r["untuned_val_dice"] for r in rows if r["untuned_val_dice"] is not None), None)
    lines = [f"# segtune tune: study {study.study_name}", ""]
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(rows)} trials.")
    if untuned is not None:
        lines.append(f"Untuned model: {MONITOR} {untuned:.4f} (scored once per study; gains are paired, 95% CI).")
    base = next((r for r in rows if r["baseline"] and r[MONITOR] is not None), None)
    if base:
        said = f"trial {base['trial']}, {base['state']}"
        lines.append(f"The config's own values ({said}): {MONITOR} {base[MONITOR]:.4f}.")
    if best:
        lines.append(f"Best: trial {best['trial']}, {MONITOR} {best[MONITOR]:.4f}; its config: `{BEST}`.")
    header = COLUMNS[:-1] + params
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(f[c]) for c in header) + " |" for f in flat]
    _write_text(folder / "tune_report.md", "\n".join(lines) + "\n")
    if plots:
        plot_history(rows, untuned, folder / "tune_history.png")
        plot_importance(study, folder / "tune_importance.png")
        plot_parallel(rows, params, folder / "tune_parallel.png")
    if not best:
        return None
    config = reproducible_config(Path(best["run"]) / "config.yaml", f"{study.study_name}_best")
    text = (
        f"# segtune tune: the config of study {study.study_name}'s best trial, trial {best['trial']} "
        f"({MONITOR} {best[MONITOR]:.4f}, {best['run']}).\n# segtune fit --config {BEST} reproduces it.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    _write_text(folder / BEST, text)
    return folder / BEST


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if r["state"] == "complete" and r[MONITOR] is not None and r["run"]]
    return max(done, key=lambda r: r[MONITOR]) if done else None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    write_atomically(path, lambda scratch: fig.savefig(scratch, dpi=100, format="png"), suffix=".png")


def plot_history(rows: list[dict[str, Any]], untuned: float | None, path: Path) -> None:
    """Each trial's best val_dice by trial number (pruned trials hollow: their score when stopped), the best so
    far, and the untuned model's score."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    scored = [r for r in rows if r[MONITOR] is not None]
    for state, style in (("complete", {"color": "tab:blue"}), ("pruned", {"facecolors": "none", "edgecolors": "grey"})):
        chosen = [r for r in scored if r["state"] == state]
        ax.scatter([r["trial"] for r in chosen], [r[MONITOR] for r in chosen], label=state, **style)
    best, steps = -math.inf, []
    for r in sorted((r for r in scored if r["state"] == "complete"), key=lambda r: r["trial"]):
        best = max(best, r[MONITOR])
        steps.append((r["trial"], best))
    if steps:
        steps.append((max(r["trial"] for r in rows), best))  # the best so far holds to the last trial
        ax.step([s[0] for s in steps], [s[1] for s in steps], where="post", color="tab:red", label="best so far")
    if untuned is not None:
        ax.axhline(untuned, color="black", linestyle="--", linewidth=1, label=f"untuned {untuned:.3f}")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best {MONITOR}")
    ax.set_title("segtune tune: optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_importance(study: Any, path: Path) -> None:
    """Optuna's parameter importances (its default fANOVA evaluator) as horizontal bars; a figure saying why
    there are none while fewer than two completed trials vary a parameter."""
    optuna = import_optuna()

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    try:
        with warnings.catch_warnings():  # "few trials in a regime": the plot's title says how many trials
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:  # too few completed trials, or no parameter varies
        importances, why = {}, str(e).splitlines()[0]
    else:
        why = "no parameter varies over the completed trials"
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (Optuna's default evaluator; sums to 1)")
    else:
        ax.text(0.5, 0.5, f"no importances yet: {why}"[:100], ha="center", va="center", wrap=True)
        ax.set_axis_off()
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    # Optuna weighs completed trials only: a pruned trial has no final value
    ax.set_title(f"segtune tune: parameter importance over {done} completed trials", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_parallel(rows: list[dict[str, Any]], params: list[str], path: Path) -> None:
    """One line per scored trial across an axis per parameter and a last one for val_dice, coloured by it.
    Each axis is scaled to its range (log for a parameter spanning more than a factor of 20; a choice by its
    values' order)."""
    plt = _pyplot()
    scored = [r for r in rows if r[MONITOR] is not None]
    axes_names = [*params, MONITOR]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(axes_names)), 4.2))
    scales = {n: _scale([r["params"].get(n) if n != MONITOR else r[MONITOR] for r in scored]) for n in axes_names}
    if scored:
        scores = [r[MONITOR] for r in scored]
        low, high = min(scores), max(scores)
        cmap = plt.get_cmap("viridis")
        for r in scored:
            ys = [scales[n][0](r["params"].get(n) if n != MONITOR else r[MONITOR]) for n in axes_names]
            xs = [i for i, y in enumerate(ys) if y is not None]
            colour = cmap((r[MONITOR] - low) / (high - low) if high > low else 0.5)
            style = "--" if r["state"] == "pruned" else "-"
            ax.plot(xs, [ys[i] for i in xs], color=colour, alpha=0.85, linestyle=style)
    for i, name in enumerate(axes_names):
        ax.axvline(i, color="black", linewidth=0.8)
        ax.text(i, -0.06, scales[name][1], ha="center", va="top", fontsize=7)
        ax.text(i, 1.03, scales[name][2], ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(axes_names)), [n.rsplit(".", 1)[-1] for n in axes_names], fontsize=8)
    ax.tick_params(axis="x", pad=14)
    ax.set_yticks([])
    ax.set_ylim(-0.1, 1.1)
    ax.set_title("segtune tune: parallel coordinates (colour: val_dice; dashed: pruned)", fontsize=10, pad=16)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _scale(values: list[Any]) -> tuple[Any, str, str]:
    """A map of values to [0, 1], and the labels of the axis's bottom and top."""
    present = [v for v in values if v is not None]
    numeric = present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    if not numeric:
        order = sorted({_label(v) for v in present})

        def categorical(v: Any) -> float | None:
            if v is None:
                return None
            return order.index(_label(v)) / max(1, len(order) - 1)

        return categorical, (order[0] if order else "")[:20], (order[-1] if order else "")[:20]
    low, high = min(present), max(present)
    use_log = low > 0 and high / low > 20
    lo, hi = (math.log(low), math.log(high)) if use_log else (low, high)

    def numeric_scale(v: Any) -> float | None:
        if v is None:
            return None
        x = math.log(v) if use_log else v
        return (x - lo) / (hi - lo) if hi > lo else 0.5

    return numeric_scale, f"{low:.3g}", f"{high:.3g}"


def _label(value: Any) -> str:
    """A choice's value as an axis shows it: strings as they are (the last part of a class path), others as JSON."""
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else json.dumps(value, default=str)
