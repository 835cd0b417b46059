"""``segtune tune --config X --search search.yaml``: the command, from its options to the report.

1. the search file is read and every key checked against ``segtune fit``'s parser (:mod:`.space`, :mod:`.checks`);
2. the study is created or loaded from its storage (:mod:`.storage`): SQLite in the study folder unless
   ``--storage`` names another database; trials whose process died are marked FAIL;
3. Optuna asks for trials until the study has ``--trials`` finished ones (complete or pruned, counted over every
   process sharing the study) or ``--timeout`` passes; each is an ordinary fit (:mod:`.trial`), and one line per
   finished trial says its values, score and the best so far;
4. the report and ``best.yaml`` are rebuilt from the database (:mod:`.report`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segtune.tune.checks import base_config, check_against_parser
from segtune.tune.space import SearchSpace, load_search
from segtune.tune.storage import PRUNERS, PrunerSettings, StorageSettings, default_url, import_optuna, open_study
from segtune.tune.trial import MONITOR, Study, TrialFailed, describe, run_trial

log = logging.getLogger(__name__)

#: A process stops asking for trials after this many of its own fail in a row (a config that cannot fit).
MAX_FAILURES_IN_A_ROW = 3


@dataclass(frozen=True)
class TuneSettings:
    """``segtune tune``'s options.

    Args:
        config: the fit config every trial starts from.
        search: the search file.
        trials: finished trials (complete or pruned) the study should reach, over all its processes.
        timeout: seconds after which this process starts no new trial (None: no limit).
        study: the study's name; its folder is ``<output>/<study>``.
        output: the folder of studies.
        storage: an SQLAlchemy database URL (None: SQLite ``<output>/<study>/study.db``).
        pruner: how trials are pruned.
        heartbeat: seconds between a running trial's heartbeats; a trial silent for 3 of them is failed.
        seed: the sampler's seed, offset by the study's trials (None: random; processes sharing a study need
            different ones).
        overrides: extra ``fit`` arguments for every trial.
        dry_run: check the config and the search file against fit's parser, then stop.
        baseline: a new study's first trial is the config as it is (its own values of the searched keys), the
            recipe every other trial is compared with in the report; skipped when a value lies outside the search.
    """

    config: Path
    search: Path
    trials: int = 20
    timeout: float | None = None
    study: str | None = None
    output: Path = Path("runs")
    storage: str | None = None
    pruner: PrunerSettings = PrunerSettings()
    heartbeat: int = 10
    seed: int | None = None
    overrides: tuple[str, ...] = ()
    dry_run: bool = False
    baseline: bool = True

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"--trials {self.trials}: 1 or more")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"--timeout {self.timeout}: more than 0 seconds")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"--study {self.name!r}: letters, digits, '_', '.' and '-' only (it names a folder)")
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.config}: config not found")

    @property
    def name(self) -> str:
        """The study's name: ``--study``, else the config file's stem."""
        return self.study or self.config.stem

    @property
    def folder(self) -> Path:
        """The study folder: trials, database, report."""
        return self.output / self.name


def parse(argv: list[str]) -> TuneSettings:
    """``segtune tune``'s command line; arguments it does not know go to every trial's fit."""
    parser = argparse.ArgumentParser(
        prog="segtune tune",
        description="Search hyperparameters with Optuna: each trial is a segtune fit in runs/<study>/trial_<n>/. "
        "Other --key value arguments go to every trial's fit.",
        allow_abbrev=False,  # --trainer.* must never be read as an abbreviation of --trials
    )
    parser.add_argument("--config", required=True, type=Path, help="the fit config every trial starts from")
    parser.add_argument("--search", required=True, type=Path, help="the search file (see configs/search_*.yaml)")
    parser.add_argument("--trials", type=int, default=20, help="finished trials the study should reach (default 20)")
    parser.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    parser.add_argument("--study", help="the study's name (default: the config's file name)")
    parser.add_argument("--output", type=Path, default=Path("runs"), help="the folder of studies (default runs)")
    parser.add_argument(
        "--storage",
        help="a database URL shared by processes and machines (default: SQLite runs/<study>/study.db; "
        "postgresql://... or mysql+pymysql://... for several machines)",
    )
    parser.add_argument("--pruner", choices=PRUNERS, default="median", help="stop poor trials early (default median)")
    parser.add_argument("--pruner-startup-trials", type=int, default=2, help="median: trials never pruned")
    parser.add_argument("--pruner-warmup-epochs", type=int, default=0, help="median: epochs never pruned")
    parser.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats")
    parser.add_argument("--seed", type=int, help="the sampler's seed (default: random; processes sharing a "
                        "study need different ones)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check the config and search file, run no trial")
    parser.add_argument("--no-baseline", action="store_true", help="no first trial with the config's own values")
    args, extra = parser.parse_known_args(argv)
    pruner = PrunerSettings(args.pruner, args.pruner_startup_trials, args.pruner_warmup_epochs)
    return TuneSettings(
        args.config, args.search, args.trials, args.timeout, args.study, args.output, args.storage, pruner,
        args.heartbeat, args.seed, tuple(extra), args.dry_run, not args.no_baseline,
    )  # fmt: skip


def tune_command(argv: list[str]) -> int:
    """Run ``segtune tune``; 0 when the study has its trials and at least one completed.

    Bad input raises one line (``OSError``, ``ValueError``) that ``segtune``'s main prints.
    """
    import_optuna()  # missing: one line saying how to install it, before anything else
    settings = parse(argv)
    space = load_search(settings.search)
    check_against_parser(space, settings.config, list(settings.overrides))  # before anything is written
    resolved = base_config(settings.config, list(settings.overrides))
    folder = settings.folder
    if settings.dry_run:
        keys = ", ".join(space.all_keys())
        print(f"study {settings.name} in {folder}: {settings.config} and {settings.search} parse ({keys})")
        return 0
    url = settings.storage or default_url(folder)
    if settings.storage is None and not (folder / "study.db").exists() and any(folder.glob("trial_*")):
        raise FileExistsError(f"{folder}: holds trial folders but no study.db: not overwritten; choose another --study")
    folder.mkdir(parents=True, exist_ok=True)
    storage = StorageSettings(url, settings.heartbeat, 3 * settings.heartbeat)
    study = open_study(settings.name, storage, settings.pruner, settings.seed)
    if settings.baseline and not study.get_trials(deepcopy=False):
        enqueue_baseline(study, space, resolved)
    shared = Study(
        settings.name, folder, settings.config.resolve(), settings.overrides, space, url, settings.pruner, resolved
    )
    _optimize(study, shared, settings)
    from segtune.tune.report import write_report

    best = write_report(study, folder)
    plots = "tune_history.png, tune_importance.png, tune_parallel.png"
    print(f"Report: {folder / 'tune_report.md'} (.csv, .json; {plots})")
    if best is None:
        print("No trial completed: no best.yaml.")
        return 1
    print(f"Best config: {best} (segtune fit --config {best})")
    return 0


def enqueue_baseline(study: Any, space: SearchSpace, resolved: dict[str, Any]) -> None:
    """Queue the config's own values as the study's first trial (user attribute ``baseline``)."""
    values = space.values_in(resolved)
    if values is None:
        log.info("no baseline trial: the config's value of a searched key lies outside its distribution")
        return
    params = {key: space.distribution(key).encoded(value) for key, value in values.items()}
    # skip_if_exists: a second process starting at the same moment queues nothing more
    study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=True)


def _optimize(study: Any, shared: Study, settings: TuneSettings) -> None:
    """Ask for trials until the study has ``settings.trials`` finished ones (this process's and others')."""
    optuna = import_optuna()
    TrialState = optuna.trial.TrialState

    from segtune.tune.report import write_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # segtune prints one line per trial instead
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    failures = [0]

    def objective(trial: Any) -> float:
        # which process runs it: another process sharing the study (or a test) can tell whose trial it is
        trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")
        values = shared.space.suggest(trial)
        try:
            result = run_trial(shared, trial.number, values)
        except TrialFailed as e:
            trial.set_user_attr("error", str(e))
            raise
        for key, value in result.items():
            trial.set_user_attr(key, value)
        if result["pruned_after_epoch"] is not None:
            raise optuna.TrialPruned(f"after epoch {result['pruned_after_epoch']}")
        return result[MONITOR]

    def progress(study: Any, trial: Any) -> None:
        failures[0] = failures[0] + 1 if trial.state == TrialState.FAIL else 0
        attrs = trial.user_attrs
        baseline = " (the config's own values)" if attrs.get("baseline") else ""
        line = f"trial {trial.number} {trial.state.name.lower()}{baseline}: {describe(trial.params)}"
        if attrs.get(MONITOR) is not None:
            line += f" -> {MONITOR} {attrs[MONITOR]:.4f}"
            if attrs.get("gain") is not None:
                line += f" ({attrs['gain']:+.4f} [{attrs['gain_low']:+.4f}, {attrs['gain_high']:+.4f}] over untuned)"
        if trial.state == TrialState.FAIL:
            line += f" -> {attrs.get('error', 'failed')}"
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if done:
            best = max(done, key=lambda t: t.value)
            line += f"; best {best.value:.4f} (trial {best.number})"
        print(line, flush=True)
        write_report(study, shared.folder, plots=False)  # the tables stay current if the process is killed
        total = len(study.get_trials(deepcopy=False, states=finished))
        if total >= settings.trials:
            study.stop()
        elif failures[0] >= MAX_FAILURES_IN_A_ROW:
            print(f"{failures[0]} trials in a row failed: stopping (see their fit.log)", flush=True)
            study.stop()

    already = len(study.get_trials(deepcopy=False, states=finished))
    if already >= settings.trials:
        print(f"study {settings.name}: {already} trials finished already (--trials {settings.trials})")
        return
    print(f"study {settings.name}: {already} of {settings.trials} trials finished ({shared.storage})", flush=True)
    study.optimize(objective, timeout=settings.timeout, catch=(TrialFailed,), callbacks=[progress])
