"""``segtune``: one LightningCLI with fit / validate / test / predict.

The config picks the method (``model.class_path``) and the data (``data.class_path``); the only
addition to plain LightningCLI is the link that gives the data the model's preprocessing.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from segtune.callbacks import (
    AtomicCheckpointIO,
    ExportBestAdapter,
    FlushLogsEachEpoch,
    PredictionWriter,
    ReportBestCheckpoint,
    RestoreRNG,
    TestReport,
    ValidationImages,
)
from segtune.commands import export_command, models_command
from segtune.compare import compare_command
from segtune.data.datamodule import SegmentationDataModule
from segtune.methods.base import SegmentationModule
from segtune.models.loading import ModelNotFoundError, preprocessing_for

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Fine-tune SAM-family models. Also: `segtune models` (list presets, --download NAME), "
    "`segtune export --ckpt_path CKPT --output DIR [--merge]` and `segtune compare --config C [--dry-run]`."
)


def _preprocessing_dict(model: str) -> dict | None:
    # A dict, not the dataclass: jsonargparse validates it into ``Preprocessing`` and can serialise it.
    try:
        return asdict(preprocessing_for(model))
    except ModelNotFoundError as e:
        _MISSING_MODELS[model] = e  # reported in one line by before_instantiate_classes, not as a parser error
        return None


# Models the argument link could not resolve, so the hub is not asked twice (it retries for ~30 s offline).
_MISSING_MODELS: dict[str, ModelNotFoundError] = {}


class SegtuneCLI(LightningCLI):
    """LightningCLI with the model -> data preprocessing link."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.preprocessing", compute_fn=_preprocessing_dict)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model = config["model"]["init_args"]["model"]
        if model in _MISSING_MODELS:  # a missing model: one line, before any work
            raise _MISSING_MODELS.pop(model)
        if config.get("weights_only") is None:
            # segtune's checkpoints hold only tensors and plain values: never unpickle anything else
            config["weights_only"] = True
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            self._resume_in_place(config)

    def _resume_in_place(self, config) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this config's runs, continued in its own folder.

        Lightning alone would look in a new ``version_N`` folder and start from scratch.
        """
        logger = config["trainer"]["logger"]
        init = logger.get("init_args", {}) if hasattr(logger, "get") else {}
        root = Path(init.get("save_dir") or "runs") / (init.get("name") or "")
        candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"{root}: no version_*/checkpoints/last.ckpt to resume from (--ckpt_path last)")
        config["ckpt_path"] = str(candidates[-1])
        logger["init_args"]["version"] = candidates[-1].parents[1].name
        log.info("resuming %s in %s", candidates[-1], candidates[-1].parents[1])
        # CSVLogger deletes metrics.csv when it reopens a folder: keep the finished epochs' rows
        metrics = candidates[-1].parents[1] / "metrics.csv"
        if metrics.is_file():
            epoch = torch.load(candidates[-1], map_location="cpu", weights_only=True, mmap=True)["epoch"]
            with open(metrics) as f:
                self._rows_before_resume = [r for r in csv.DictReader(f) if int(r.get("epoch") or 0) <= epoch]

    def _restore_rows(self) -> None:
        rows, self._rows_before_resume = getattr(self, "_rows_before_resume", []), []
        for logger in self.trainer.loggers if rows else []:
            if isinstance(logger, CSVLogger):
                for row in rows:
                    values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
                    values["epoch"] = int(values.get("epoch", 0))
                    logger.experiment.log_metrics(values, int(row["step"]))
                logger.save()

    def _check_run_folder(self) -> None:
        loggers = self.trainer.loggers
        check_writable(Path((loggers[0].save_dir if loggers else None) or self.trainer.default_root_dir))

    def before_fit(self) -> None:
        self._check_run_folder()
        self._restore_rows()

    before_validate = before_test = before_predict = _check_run_folder


def trainer_defaults() -> dict:
    """Runs land in ``runs/<name>/version_N/``: best (highest ``val_dice``) and last checkpoints, the
    LoRA adapter, validation pictures, test reports and predictions."""
    return {
        "default_root_dir": "runs",
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "runs", "name": "segtune"},
        },
        "callbacks": [
            ModelCheckpoint(
                monitor="val_dice",
                mode="max",
                auto_insert_metric_name=False,
                filename="best-epoch{epoch:02d}-val_dice{val_dice:.4f}",
            ),  # fmt: skip
            # last.ckpt after every epoch: ModelCheckpoint(save_last=True) only refreshes it when a new
            # best is saved, which would make a resume repeat every epoch since the best one.
            ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False),
            ReportBestCheckpoint(),
            ExportBestAdapter(),
            TestReport(),
            PredictionWriter(),
            ValidationImages(),
            RestoreRNG(),
            FlushLogsEachEpoch(),
        ],
        "plugins": [AtomicCheckpointIO()],
    }


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``args`` replaces ``sys.argv[1:]``, for tests)."""
    argv = sys.argv[1:] if args is None else list(args)
    commands = {"models": models_command, "export": export_command, "compare": compare_command}
    if argv and argv[0] in commands:
        raise SystemExit(commands[argv[0]](argv[1:]))
    _show_segtune_logs()
    try:
        SegtuneCLI(
            SegmentationModule,
            SegmentationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults(),
            save_config_kwargs={"overwrite": True},
            args=args,
            parser_kwargs={"description": DESCRIPTION},
        )
    except USER_ERRORS as e:
        if os.environ.get("SEGTUNE_DEBUG"):
            raise
        print(f"segtune: error: {one_line(e)} (SEGTUNE_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


# What bad input raises: files and folders (missing, unreadable, unwritable), values (a json, an
# image, a mask, a config value), a model that cannot be found, a non-finite loss, a checkpoint
# holding more than tensors and plain values (refused by weights_only loading). They reach the
# user as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, FloatingPointError, pickle.UnpicklingError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; a DataLoader worker's error keeps only the original message."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        return lines[-1]  # "ValueError: <file>: <what is wrong>", the last line of the worker's traceback
    return lines[0] if lines else type(error).__name__


def check_writable(folder: Path) -> None:
    """Fail before any work when the run folder cannot be created or written.

    Raises:
        PermissionError: naming the folder.
    """
    # Probe the nearest existing folder: creating the run folder itself here would take a
    # version_N before the logger does (and each DDP process would take its own).
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PermissionError(
            f"{folder}: the run folder cannot be written ({e.strerror or e}); "
            "set trainer.logger.init_args.save_dir to a writable folder"
        ) from None


def _show_segtune_logs() -> None:
    # Skips, counts and parameter totals are logged at INFO; Python shows only WARNING by default.
    logger = logging.getLogger("segtune")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be redirected after the handler is made)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass
