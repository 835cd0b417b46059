"""Where a study lives: an Optuna RDB storage (SQLite in the study folder by default), its pruner, and
its interrupted trials.

Optuna keeps every trial in the database as it runs, so a study survives its process: ``kill -9``
then the same command again continues it. A trial whose process died stays RUNNING in the database;
the storage's heartbeat tells it apart from a trial another live process is running (on this
machine or another, sharing a PostgreSQL or MySQL URL): each live trial writes a heartbeat every
``heartbeat_s`` seconds, and only a trial whose heartbeat is older than ``grace_s`` is marked FAIL
(:func:`optuna.storages.fail_stale_trials`, which ``Study.optimize`` also runs before each trial).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The database file a study folder holds when no ``--storage`` is given.
DATABASE = "study.db"
#: What a missing Optuna says.
MISSING = "segtune tune needs Optuna: pip install segtune[tune]"
#: Tries to open a new database that another process is creating at the same moment.
SCHEMA_ATTEMPTS = 5
#: ``--pruner`` values.
PRUNERS = ("median", "hyperband", "none")


def import_optuna() -> Any:
    """The ``optuna`` module (the ``tune`` extra), imported when a study needs it.

    Raises:
        SystemExit: one line saying how to install it, when it is not installed.
    """
    try:
        import optuna
    except ImportError:
        raise SystemExit(f"segtune: error: {MISSING}") from None
    return optuna


@dataclass(frozen=True)
class PrunerSettings:
    """How trials are pruned after each validation.

    Args:
        kind: ``median`` (Optuna's MedianPruner: stop a trial whose val_dice at an epoch is below the median
            of earlier trials' at that epoch), ``hyperband`` (HyperbandPruner, epochs as the resource) or ``none``.
        startup_trials: median: trials that finish before any is pruned.
        warmup_epochs: median: epochs of each trial that are never pruned.
    """

    kind: str = "median"
    startup_trials: int = 2
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PRUNERS:
            raise ValueError(f"--pruner {self.kind}: one of {', '.join(PRUNERS)}")
        if self.startup_trials < 0 or self.warmup_epochs < 0:
            raise ValueError("--pruner-startup-trials and --pruner-warmup-epochs must be >= 0")

    def make(self) -> Any:
        """The Optuna pruner."""
        optuna = import_optuna()

        if self.kind == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs)
        if self.kind == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
        return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class StorageSettings:
    """The study's database.

    Args:
        url: an SQLAlchemy URL (``sqlite:///runs/study/study.db``, ``postgresql://user:pw@host/db``,
            ``mysql+pymysql://user:pw@host/db``).
        heartbeat_s: how often a running trial writes its heartbeat.
        grace_s: a RUNNING trial whose heartbeat is older than this is one whose process died: marked FAIL.
    """

    url: str
    heartbeat_s: int = 10
    grace_s: int = 30

    def __post_init__(self) -> None:
        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise ValueError(f"--heartbeat {self.heartbeat_s}: 1 or more, and the grace period must exceed it")

    def make(self) -> Any:
        """The Optuna RDB storage with the heartbeat on."""
        optuna = import_optuna()

        # SQLite: two processes write the same file; wait for the other's lock instead of failing at once
        engine = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else None
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                with warnings.catch_warnings():  # the heartbeat is "experimental" (from Optuna 2.9, unchanged since)
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        self.url, engine_kwargs=engine, heartbeat_interval=self.heartbeat_s, grace_period=self.grace_s
                    )
            except Exception as e:
                # Two processes opening a new database at once both create its tables; the second fails on the
                # first's (sqlalchemy's IntegrityError or OperationalError): the tables are there a moment later.
                if not type(e).__module__.startswith("sqlalchemy") or attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")


def default_url(folder: Path) -> str:
    """The SQLite URL of ``folder/study.db`` (absolute: trials may change the working directory)."""
    return f"sqlite:///{(folder / DATABASE).resolve()}"


def open_study(name: str, storage: StorageSettings, pruner: PrunerSettings, seed: int | None = None) -> Any:
    """Create the study or load it (another process, or an earlier run of the same command, may have made it),
    maximising val_dice, then mark FAIL the trials whose process died (their heartbeat expired).

    ``seed`` seeds Optuna's TPE sampler (offset by the trials the study has); None: a random seed, which processes
    sharing a study need (two with one seed would draw the same first values).
    """
    optuna = import_optuna()

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # segtune prints one line per trial instead
    study = optuna.create_study(
        study_name=name, storage=storage.make(), pruner=pruner.make(), direction="maximize", load_if_exists=True
    )
    if seed is not None:
        # offset by the trials already there: a resumed study draws new values, not its first run's again
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:  # made elsewhere: its pruner would keep the worst
        raise ValueError(f"study {name} in {storage.url} minimises its objective; segtune tune maximises val_dice")
    fail_interrupted(study)
    return study


def fail_interrupted(study: Any) -> list[int]:
    """Mark FAIL the RUNNING trials whose heartbeat expired (their process died); the numbers of those failed.

    A RUNNING trial with a fresh heartbeat belongs to a live process and is left alone.
    """
    optuna = import_optuna()
    TrialState = optuna.trial.TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9; Study.optimize calls it the same way
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = sorted(before & {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))})
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for number in failed:
        log.warning("trial %d was interrupted (its process stopped): marked FAIL; the study goes on", number)
    for number in sorted(after):
        log.info("trial %d is running in another process (its heartbeat is fresh)", number)
    return failed
