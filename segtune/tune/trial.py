"""One ``segtune tune`` trial: an ordinary ``segtune fit`` in ``<study folder>/trial_<n>/version_0/``.

The trial's values go on fit's command line after the config (``--model.init_args.lr 0.0003``), its
logger writes into the trial's folder, and two callbacks join the config's own
(:mod:`segtune.tune.callbacks`): the pruning report and the study's untuned scores. The fit runs
in this process (no second start-up of torch per trial), or, when its trainer needs several processes (DDP),
as ``python -m segtune fit`` with the same arguments (:mod:`segtune.tune.child`); its output goes to
``trial_<n>/fit.log``.
The trial's score is its best epoch's ``val_dice``; its gain over the untuned model, with the
paired interval, is what the fit's own ``untuned.json`` says.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segtune.tune.callbacks import PRUNED_FILE
from segtune.tune.checks import as_argument, key_arguments
from segtune.tune.child import fit_in_child, needs_own_process, trainer_settings, unsupported
from segtune.tune.space import SearchSpace
from segtune.tune.storage import PrunerSettings
from segtune.untuned import UNTUNED_FILE

log = logging.getLogger(__name__)

#: The score a trial is judged by (its best epoch's), maximised.
MONITOR = "val_dice"
#: Keys that change what training does but not the untuned model's validation scores: trials that differ
#: only in these share one untuned pass. Any other searched key (the model, its class, the data, the seed)
#: gets its own pass per value.
TRAINING_ONLY = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
    "trainer.check_val_every_n_epoch", "model.init_args.lr", "model.init_args.weight_decay",
    "model.init_args.warmup_steps", "model.init_args.scheduler", "model.init_args.mask_loss",
    "model.init_args.mask_weight", "model.init_args.dice_weight", "model.init_args.iou_weight",
    "model.init_args.gradient_clip_val", "model.init_args.r", "model.init_args.alpha", "model.init_args.dropout",
    "model.init_args.target_modules", "model.init_args.modules_to_save", "model.init_args.train_parts",
    "model.init_args.propagation_prompts", "data.init_args.batch_size", "data.init_args.prompts.box_jitter",
    "data.init_args.augmentations",
)  # fmt: skip
UNTUNED_CLASS = "segtune.untuned.UntunedScore"
PRUNING_CLASS = "segtune.tune.callbacks.TrialPruning"
STUDY_UNTUNED_CLASS = "segtune.tune.callbacks.StudyUntuned"
LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger")


class TrialFailed(Exception):
    """A trial's fit stopped with an error (the study goes on; the trial is marked FAIL)."""


@dataclass(frozen=True)
class Study:
    """What every trial of a study shares.

    Args:
        name: the study's name.
        folder: ``runs/<study>``: the trials' folders, the database, the report.
        config: the fit config every trial starts from.
        overrides: extra ``fit`` arguments for every trial (after the config, before the trial's values).
        space: the search space.
        storage: the storage URL (the pruning callback reports to it).
        pruner: the pruner settings.
        resolved: the resolved base config (``fit --print_config``): its callbacks and logger.
    """

    name: str
    folder: Path
    config: Path
    overrides: tuple[str, ...]
    space: SearchSpace
    storage: str
    pruner: PrunerSettings
    resolved: dict[str, Any]

    def untuned_file(self, values: dict[str, Any]) -> Path:
        """The untuned-scores file of a trial: one per combination of the values that may change them."""
        relevant = {k: v for k, v in sorted(values.items()) if not k.startswith(TRAINING_ONLY)}
        digest = hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.folder / "untuned" / f"{digest}.json"

    def arguments(self, number: int, values: dict[str, Any]) -> list[str]:
        """The ``segtune fit`` arguments of trial ``number`` with ``values``."""
        trainer = self.resolved.get("trainer") or {}
        callbacks = [_study_callback(c, self.untuned_file(values)) for c in trainer.get("callbacks") or []]
        callbacks.append({
            "class_path": PRUNING_CLASS,
            "init_args": {
                "storage": self.storage, "study": self.name, "trial": number, "pruner": self.pruner.kind,
                "startup_trials": self.pruner.startup_trials, "warmup_epochs": self.pruner.warmup_epochs,
                "monitor": MONITOR,
            },
        })  # fmt: skip
        return [
            "--config", str(self.config), *self.overrides, *key_arguments(values),
            "--trainer.logger", json.dumps(trial_logger(trainer.get("logger"), self.folder, number)),
            "--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_progress_bar", "false",
        ]  # fmt: skip


def _study_callback(callback: Any, scores: Path) -> Any:
    """The config's UntunedScore becomes the study's (same seed, scores shared by the study)."""
    if isinstance(callback, dict) and callback.get("class_path") == UNTUNED_CLASS:
        seed = (callback.get("init_args") or {}).get("seed", 0)
        return {"class_path": STUDY_UNTUNED_CLASS, "init_args": {"scores": str(scores.resolve()), "seed": seed}}
    return callback


def trial_logger(logger: Any, folder: Path, number: int) -> dict[str, Any]:
    """The config's CSV or TensorBoard logger (any other: a CSVLogger) writing into ``<folder>/trial_<n>/version_0``."""
    kept = logger if isinstance(logger, dict) and logger.get("class_path") in LOGGERS else None
    if kept is None:
        log.info("trials log with a CSVLogger (the config's logger is %s)", logger)
    init = dict((kept or {}).get("init_args") or {})
    # version null, not 0: the trial's folder is new, so the fit takes version_0; a later `segtune test --config
    # <trial>/version_0/config.yaml` then takes version_1 instead of reopening version_0 (CSVLogger would delete
    # its metrics.csv)
    init.update(save_dir=str(folder.resolve()), name=f"trial_{number}", version=None)
    return {"class_path": (kept or {}).get("class_path", LOGGERS[0]), "init_args": init}


def trial_folder(study: Study, number: int) -> Path:
    """``<study folder>/trial_<n>``."""
    return study.folder / f"trial_{number}"


def run_trial(study: Study, number: int, values: dict[str, Any]) -> dict[str, Any]:
    """Fit one trial; its result (:func:`trial_result`).

    The fit runs in this process, or in a child process when its trainer needs several
    (:func:`segtune.tune.child.needs_own_process`: DDP, several devices or nodes); either way it is the same
    ``segtune fit`` writing the same run folder, which the result is read from.

    Raises:
        TrialFailed: the fit stopped with an error, or the trial's folder already exists (never overwritten).
    """
    trainer = trainer_settings(study.resolved, values)
    if (why := unsupported(trainer)) is not None:
        raise TrialFailed(f"trial {number}: {why}")
    folder = trial_folder(study, number)
    if folder.exists():
        raise TrialFailed(f"{folder} already exists (from another study?): not overwritten")
    folder.mkdir(parents=True)
    args = ["fit", *study.arguments(number, values)]
    (folder / "command.txt").write_text("segtune " + " ".join(_quoted(a) for a in args) + "\n")
    start = time.perf_counter()
    reason = needs_own_process(trainer)
    if reason is not None:
        log.info("trial %d runs in a process of its own (%s)", number, reason)
        code: Any = fit_in_child(args, folder / "fit.log")
    else:
        code = _fit_here(args, number, folder / "fit.log")
    if code not in (0, None):
        raise TrialFailed(f"trial {number}: fit failed: {_last_error(folder / 'fit.log')} (see {folder / 'fit.log'})")
    result = trial_result(folder / "version_0")
    result["wall_s"] = time.perf_counter() - start
    if result.get(MONITOR) is None:
        raise TrialFailed(f"trial {number}: the fit logged no {MONITOR} (is there a validation split?)")
    return result


def _fit_here(args: list[str], number: int, log_file: Path) -> Any:
    """Run ``segtune <args>`` in this process with its output in ``log_file``; its exit code (0 or None: done)."""
    from segtune.cli import main  # segtune.cli imports the tune command

    with open(log_file, "w") as out, _output_to(out):
        try:
            main(args)
            return 0
        except SystemExit as e:
            return e.code
        except Exception as e:  # a bug in a trial's fit: its traceback goes to fit.log, the study goes on
            log.exception("trial %d failed", number)
            return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def _output_to(out: Any) -> Iterator[None]:
    """Everything a trial's fit prints goes to ``out``: Python's streams, and Lightning's console handlers (made
    at import with the streams of then). ``sys.argv`` holds no arguments meanwhile: LightningCLI warns when it is
    given arguments while the command line holds others (``segtune tune``'s)."""
    handlers = [
        h for name in ("lightning.pytorch", "lightning.fabric", "lightning")
        for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler
    ]  # fmt: skip
    streams = [h.setStream(out) for h in handlers]
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        sys.argv = saved
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)


def _quoted(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./=:+" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def _last_error(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def trial_result(run: Path) -> dict[str, Any]:
    """What a trial's run folder says: best ``val_dice``, epochs validated, untuned score, gain with its 95%
    interval, and the epoch it was pruned after (None when it was not)."""
    scores: list[float] = []
    metrics = run / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as f:
            scores = [float(row[MONITOR]) for row in csv.DictReader(f) if row.get(MONITOR)]
    summary = json.loads((run / UNTUNED_FILE).read_text()) if (run / UNTUNED_FILE).is_file() else {}
    overall = (summary.get("difference") or {}).get("overall") or {}
    pruned = json.loads((run / PRUNED_FILE).read_text()) if (run / PRUNED_FILE).is_file() else None
    return {
        MONITOR: max(scores) if scores else None,
        "epochs": len(scores),
        "untuned_val_dice": summary.get("untuned"),
        "gain": overall.get("mean"),
        "gain_low": overall.get("low"),
        "gain_high": overall.get("high"),
        "instances": overall.get("instances"),
        "pruned_after_epoch": pruned["epoch"] if pruned else None,
        "run": str(run),
    }


def reproducible_config(trial_config: Path, name: str) -> dict[str, Any]:
    """A trial's ``config.yaml`` as a config of its own (``best.yaml``): the config's UntunedScore instead of
    the study's, no pruning callback, and a logger writing a new ``runs/<name>/version_N`` (not the trial's)."""
    config = yaml.safe_load(trial_config.read_text())
    trainer = config.setdefault("trainer", {})
    callbacks = []
    for callback in trainer.get("callbacks") or []:
        path = callback.get("class_path") if isinstance(callback, dict) else None
        if path == PRUNING_CLASS:
            continue
        if path == STUDY_UNTUNED_CLASS:
            callback = {"class_path": UNTUNED_CLASS, "init_args": {"seed": callback["init_args"].get("seed", 0)}}
        callbacks.append(callback)
    trainer["callbacks"] = callbacks
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        logger.setdefault("init_args", {}).update(save_dir="runs", name=name, version=None)
    trainer["enable_progress_bar"] = True
    config.pop("ckpt_path", None)
    return config


def describe(values: dict[str, Any]) -> str:
    """Trial values on one line, by the last part of each key (``lr=0.00031 r=8``)."""
    parts = []
    for key, value in values.items():
        shown = f"{value:.3g}" if isinstance(value, float) else as_argument(value)
        parts.append(f"{key.rsplit('.', 1)[-1] if not key.endswith('class_path') else key}={shown}")
    return " ".join(parts)
