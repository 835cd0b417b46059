"""``segtune``: one LightningCLI with fit / validate / test / predict.

The config picks the method (``model.class_path``) and the data (``data.class_path``); the only
addition to plain LightningCLI is the link that gives the data the model's preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from segtune.callbacks import ReportBestCheckpoint
from segtune.data.datamodule import SegmentationDataModule
from segtune.methods.base import SegmentationModule
from segtune.models.loading import preprocessing_for


def _preprocessing_dict(model: str) -> dict:
    # A dict, not the dataclass: jsonargparse validates it into ``Preprocessing`` and can serialise it.
    return asdict(preprocessing_for(model))


class SegtuneCLI(LightningCLI):
    """LightningCLI with the model -> data preprocessing link."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.preprocessing", compute_fn=_preprocessing_dict)


def trainer_defaults() -> dict:
    """Runs land in ``runs/<name>/version_N/``; best (highest ``val_dice``) and last checkpoints."""
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
        ],
    }


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``args`` replaces ``sys.argv[1:]``, for tests)."""
    SegtuneCLI(
        SegmentationModule,
        SegmentationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        args=args,
    )
