"""The two callbacks a ``segtune tune`` trial's fit runs with, beside the config's own.

Both are ordinary config entries (the trial's ``config.yaml`` shows them), so a trial is the same fit
in this process or in another one; ``best.yaml`` puts the config's own callbacks back
(:func:`segtune.tune.trial.reproducible_config`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from segtune.callbacks import run_folder
from segtune.files import write_atomically
from segtune.tune.child import end_with_parent
from segtune.tune.storage import PrunerSettings, import_optuna
from segtune.untuned import UntunedScore

log = logging.getLogger(__name__)

#: Written into a pruned trial's run folder: the epoch it was stopped after, and its score there.
PRUNED_FILE = "pruned.json"


class TrialPruning(Callback):
    """Report each validation's score to the trial's study and stop the fit when the study's pruner says so.

    The documented equivalent of optuna-integration's Lightning callback: ``trial.report`` then
    ``trial.should_prune`` after every validation epoch. A pruned fit stops at the end of that epoch
    (its checkpoints and metrics stay) and writes :data:`PRUNED_FILE`; the trial runner marks the
    trial PRUNED. Under DDP the first process asks and tells the others.

    Args:
        storage: the study's storage URL.
        study: the study's name.
        trial: the trial's number.
        pruner: ``median``, ``hyperband`` or ``none`` (:class:`segtune.tune.storage.PrunerSettings`).
        startup_trials: median: trials that finish before any is pruned.
        warmup_epochs: median: epochs never pruned.
        monitor: the score reported.
    """

    def __init__(
        self, storage: str, study: str, trial: int, pruner: str = "median", startup_trials: int = 2,
        warmup_epochs: int = 0, monitor: str = "val_dice",
    ) -> None:  # fmt: skip
        self.storage, self.study, self.number = storage, study, trial
        self.pruner = pruner
        self.startup_trials, self.warmup_epochs = startup_trials, warmup_epochs
        self.monitor = monitor
        self._trial: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        end_with_parent()  # a fit that segtune tune started in a process of its own ends with it

    def _optuna_trial(self) -> Any:
        """The running trial, or None when it is no longer running (a rerun of a finished trial's config)."""
        if self._trial is None:
            optuna = import_optuna()
            TrialState = optuna.trial.TrialState

            pruner = PrunerSettings(self.pruner, self.startup_trials, self.warmup_epochs).make()
            study = optuna.load_study(study_name=self.study, storage=self.storage, pruner=pruner)
            found = [t for t in study.get_trials(deepcopy=False) if t.number == self.number]
            if not found or found[0].state != TrialState.RUNNING:
                log.info("trial %d of study %s is not running: its scores are not reported", self.number, self.study)
                self._trial = False
            else:
                self._trial = optuna.trial.Trial(study, found[0]._trial_id)
        return self._trial or None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune, score = False, None
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            trial = self._optuna_trial()
            if trial is not None and value is not None and math.isfinite(float(value)):
                score = float(value)
                trial.report(score, step=trainer.current_epoch)
                prune = trial.should_prune()
        prune = trainer.strategy.broadcast(prune)
        if not prune:
            return
        trainer.should_stop = True
        if trainer.is_global_zero:
            epoch = trainer.current_epoch
            log.info("trial %d pruned after epoch %d (%s %.4f)", self.number, epoch, self.monitor, score)
            folder = run_folder(trainer)
            content = json.dumps({"epoch": trainer.current_epoch, self.monitor: score}, indent=2)
            write_atomically(folder / PRUNED_FILE, lambda scratch: scratch.write_text(content))


class StudyUntuned(UntunedScore):
    """:class:`segtune.untuned.UntunedScore` whose untuned scores are measured once per study.

    The first trial scores the untuned model as every fit does and keeps what it measured in
    ``scores`` (the per-row validation scores the paired interval needs); the trials after it read
    them instead of scoring again, so only the first pays for the untuned pass. The tune runner gives
    trials that could score differently untuned (another model, other data) another file.
    A trial that read the scores keeps no untuned checkpoint: its best checkpoint is its best epoch.

    Args:
        scores: the study's file of untuned scores (json).
        seed: the bootstrap's seed.
    """

    def __init__(self, scores: str, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.scores = Path(scores)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.untuned is None and trainer.global_step == 0 and self.scores.is_file():
            self.untuned = {**json.loads(self.scores.read_text()), "checkpoint": None}
            log.info("untuned model: the study's scores, measured once (%s)", self.scores)
        measured = self.untuned is None
        super().on_train_start(trainer, pl_module)
        if measured and self.untuned is not None and trainer.is_global_zero and not self.scores.is_file():
            kept = {k: v for k, v in self.untuned.items() if k != "checkpoint"}
            self.scores.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.scores, lambda scratch: scratch.write_text(json.dumps(kept)))
