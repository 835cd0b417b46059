"""``segtune``: one LightningCLI with fit / validate / test / predict.

The config picks the method (``model.class_path``) and the data (``data.class_path``); the only
addition to plain LightningCLI is the link that gives the data the model's preprocessing.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from segtune.callbacks import ExportBestAdapter, PredictionWriter, ReportBestCheckpoint, TestReport, ValidationImages
from segtune.commands import export_command, models_command
from segtune.compare import compare_command
from segtune.data.datamodule import SegmentationDataModule
from segtune.methods.base import SegmentationModule
from segtune.models.loading import preprocessing_for

DESCRIPTION = (
    "Fine-tune SAM-family models. Also: `segtune models` (list presets, --download NAME), "
    "`segtune export --ckpt_path CKPT --output DIR [--merge]` and `segtune compare --config C [--dry-run]`."
)


def _preprocessing_dict(model: str) -> dict:
    # A dict, not the dataclass: jsonargparse validates it into ``Preprocessing`` and can serialise it.
    return asdict(preprocessing_for(model))


class SegtuneCLI(LightningCLI):
    """LightningCLI with the model -> data preprocessing link."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.preprocessing", compute_fn=_preprocessing_dict)


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
                save_last=True,
                auto_insert_metric_name=False,
                filename="best-epoch{epoch:02d}-val_dice{val_dice:.4f}",
            ),  # fmt: skip
            ReportBestCheckpoint(),
            ExportBestAdapter(),
            TestReport(),
            PredictionWriter(),
            ValidationImages(),
        ],
    }


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``args`` replaces ``sys.argv[1:]``, for tests)."""
    argv = sys.argv[1:] if args is None else list(args)
    commands = {"models": models_command, "export": export_command, "compare": compare_command}
    if argv and argv[0] in commands:
        raise SystemExit(commands[argv[0]](argv[1:]))
    _show_segtune_logs()
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


def _show_segtune_logs() -> None:
    # Skips, counts and parameter totals are logged at INFO; Python shows only WARNING by default.
    logger = logging.getLogger("segtune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
