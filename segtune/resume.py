"""Resuming a run in place: ``--ckpt_path last``, the random generators, and the metrics history.

``segtune fit --config X --ckpt_path last`` continues the newest ``last.ckpt`` of that config's
runs in its own ``version_N`` folder. Two callbacks make the continuation exact: the random
number generators' states ride in every checkpoint, and so do the rows of ``metrics.csv`` that
were written up to it (Lightning's CSVLogger deletes that file when it reopens a folder).
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger

from segtune.files import read_checkpoint_file

log = logging.getLogger(__name__)


def resume_in_place(config: Any) -> None:
    """Point ``ckpt_path: last`` at the newest ``version_*/checkpoints/last.ckpt`` of the config's
    logger folder and make the logger write to that same version folder.

    Lightning alone would look for ``last`` in a new ``version_N`` folder and start from scratch.

    Args:
        config: the subcommand's parsed config (``ckpt_path`` and ``trainer.logger`` are changed).

    The checkpoint is read before anything else happens: a damaged one (a killed copy, a full disk)
    stops the run in one line naming it and what else there is to resume from, with every file of
    the run folder as it was (Lightning would otherwise rewrite ``config.yaml`` and ``metrics.csv``
    before it finds the damage).

    Raises:
        FileNotFoundError: naming the folder when there is no ``last.ckpt`` to resume from.
        ValueError: naming the newest ``last.ckpt`` when it cannot be read.
    """
    logger = config["trainer"]["logger"]
    init = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    root = Path(init.get("save_dir") or "runs") / (init.get("name") or "")
    candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"{root}: no version_*/checkpoints/last.ckpt to resume from (--ckpt_path last)")
    try:
        read_checkpoint_file(candidates[-1], weights_only=bool(config.get("weights_only", True)))
    except ValueError as e:
        others = sorted(candidates[-1].parent.glob("best-*.ckpt")) + candidates[-2::-1]
        instead = (
            f"; resume from another with --ckpt_path, e.g. {', '.join(map(str, others[:3]))} (a new run folder)"
            if others
            else "; no other checkpoint of this config to resume from"
        )
        raise ValueError(f"{e}. Nothing was changed{instead}") from None
    config["ckpt_path"] = str(candidates[-1])
    logger["init_args"]["version"] = candidates[-1].parents[1].name
    log.info("resuming %s in %s", candidates[-1], candidates[-1].parents[1])


class RestoreRNG(Callback):
    """Keep the random number generators' states in checkpoints, so a resumed fit draws the same
    shuffles, prompt jitters and augmentations as an uninterrupted one (bit-identical on CPU)."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        version, internal, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # plain lists and tensors: the checkpoint stays loadable with weights_only=True
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "python": [version, list(internal), gauss],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        name, keys, *rest = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))


class MetricsHistory(Callback):
    """Keep ``metrics.csv`` whole across a resume, and flush it at every epoch end.

    CSVLogger keeps up to 100 rows in memory and deletes ``metrics.csv`` when it reopens a run
    folder. This callback writes the rows at every epoch end (so a killed run keeps the metrics of
    every finished epoch), stores the rows written so far in each checkpoint, and writes them back
    when a fit resumes from one.
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, str]] = []

    @staticmethod
    def _csv_loggers(trainer: Trainer) -> list[CSVLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        rows: list[dict[str, str]] = []
        for logger in self._csv_loggers(trainer) if trainer.is_global_zero else []:
            logger.save()
            path = Path(logger.experiment.metrics_file_path)
            if path.is_file():
                with open(path, newline="") as f:
                    rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
            break  # one history: the first CSV logger's
        # plain strings: the checkpoint stays loadable with weights_only=True
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"rows": rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows = list(state_dict.get("rows", []))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows, self._rows = self._rows, []
        for logger in self._csv_loggers(trainer)[:1] if rows else []:
            for row in rows:
                values: dict[str, Any] = {k: float(v) for k, v in row.items() if k != "step"}
                if "epoch" in values:
                    values["epoch"] = int(values["epoch"])
                logger.experiment.log_metrics(values, int(row["step"]))
            logger.save()
