"""``segtune``: one LightningCLI with fit / validate / test / predict, plus the ``models``,
``export``, ``compare`` and ``convert`` commands.

The config picks the method (``model.class_path``) and the data (``data.class_path``). What this
module adds to plain LightningCLI: the base config :file:`segtune/defaults.yaml` (callbacks,
checkpoint policy, logger, plugins, ``max_epochs``; all shown by ``--print_config``), the argument
link that gives the data the model's preprocessing, ``--ckpt_path last`` (resolved by
:mod:`segtune.resume`), the precision of a config that sets none (:func:`default_precision`,
logged) and one-line errors for bad input.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from segtune.callbacks import SaveConfig
from segtune.compare import compare_command
from segtune.data.datamodule import SegmentationDataModule
from segtune.export import export_command
from segtune.files import read_checkpoint_file
from segtune.methods.base import SegmentationModule
from segtune.models.command import models_command
from segtune.models.convert import convert_command
from segtune.models.loading import ModelNotFoundError, preprocessing_for
from segtune.resume import resume_in_place
from segtune.tune.command import tune_command

DESCRIPTION = (
    "Fine-tune SAM-family models. Also: `segtune models` (list presets, --download NAME), "
    "`segtune export --ckpt_path CKPT --output DIR [--merge | --onnx]`, `segtune compare --config C [--dry-run]` and "
    "`segtune convert --checkpoint FILE --output DIR` (native SAM/SAM2/MobileSAM weights to a model folder), "
    "`segtune tune --config C --search S [--trials N]` (hyperparameter search on Optuna)."
)
#: The base config every Trainer subcommand starts from.
DEFAULTS = Path(__file__).with_name("defaults.yaml")
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: ``--ckpt_path`` values Lightning resolves itself (not file names).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
#: The first line of jsonargparse's error for a value no type of a union accepts; the real message follows.
UNION_ERROR = "Does not validate against any of the Union subtypes"

# What bad input raises: files and folders (missing, unreadable, unwritable), values (a json, an
# image, a mask, a config value), a model that cannot be found, a non-finite loss, a checkpoint
# holding more than tensors and plain values (refused by weights_only loading). They reach the
# user as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, FloatingPointError, pickle.UnpicklingError)
UNUSED_PARAMETERS = "parameters that were not used in producing the loss"  # in Lightning's DDP error

log = logging.getLogger(__name__)


def default_precision(accelerator: Any) -> tuple[str, str]:
    """The precision of a run whose config leaves ``trainer.precision`` null, and why.

    ``bf16-mixed`` when the run may use a CUDA GPU (``accelerator`` auto, gpu or cuda) that supports
    bf16 natively (Ampere and newer): it roughly halves activation memory and speeds up SAM's
    encoder, and bf16 keeps fp32's range, so no loss scaling is needed. ``bf16-mixed`` also for a CPU
    run on a CPU that computes bf16 natively (avx512_bf16 or AMX): measured on an AMD EPYC with
    avx512_bf16, segtune's training steps took 1.1x-1.6x less time than in fp32 for ViT-B and
    LiteMedSAM (full fine-tune, LoRA, frozen encoder) and a real LiteMedSAM fit scored the same
    held-out Dice within its bootstrap interval (docs/running.md, "Defaults you can see and change"). A model
    of a few hundred thousand parameters is slower under bf16 (the quickstart's configs set
    ``32-true``). Otherwise ``32-true``: fp16 without bf16 needs loss scaling that a first run should
    not depend on.
    """
    gpu_allowed = accelerator in (None, "auto", "gpu", "cuda")
    if gpu_allowed and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed", f"{torch.cuda.get_device_name()} supports bf16"
    if accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available()):
        native = cpu_bf16()
        if native:
            return "bf16-mixed", f"the CPU computes bf16 natively ({native})"
        return "32-true", "a CPU without native bf16" if gpu_allowed else f"accelerator {accelerator}, no native bf16"
    return "32-true", "no CUDA GPU with bf16" if gpu_allowed else f"accelerator {accelerator}"


def cpu_bf16() -> str | None:
    """The instruction set with which this CPU computes bf16 natively (``AMX`` or ``avx512_bf16``), or None."""
    checks = (("AMX", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, check in checks:
        supported = getattr(torch.cpu, check, None)  # torch's own CPU probes; absent in some builds
        if supported is not None and supported():
            return name
    return None


class SegtuneCLI(LightningCLI):
    """LightningCLI with the model -> data preprocessing link and ``--ckpt_path last``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A model that cannot be resolved is remembered here and reported in one line before any
        # work, instead of as a parser error; the hub is not asked twice (it retries ~30 s offline).
        self._missing_models: dict[str, ModelNotFoundError] = {}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.preprocessing", compute_fn=self._preprocessing)

    def _preprocessing(self, model: str) -> dict | None:
        # A dict, not the dataclass: jsonargparse validates it into ``Preprocessing`` and can serialise it.
        try:
            return asdict(preprocessing_for(model))
        except ModelNotFoundError as e:
            self._missing_models[model] = e
            return None

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here with a bare torch.load: a damaged, empty or
        # foreign file stops first in one line naming it, before any run folder is made.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else {}
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES:
            read_checkpoint_file(ckpt_path, weights_only=bool(config.get("weights_only", True)))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model = config["model"]["init_args"]["model"]
        if model in self._missing_models:
            raise self._missing_models[model]
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            resume_in_place(config)
        trainer = config["trainer"]
        if self.subcommand == "fit":
            check_trains_something(trainer)
        if trainer.get("precision") is None:
            trainer["precision"], why = default_precision(trainer.get("accelerator"))
            log.info("precision %s (%s; trainer.precision sets another)", trainer["precision"], why)
        else:
            log.info("precision %s (trainer.precision)", trainer["precision"])

    def _check_run_folder(self) -> None:
        loggers = self.trainer.loggers
        check_writable(Path((loggers[0].save_dir if loggers else None) or self.trainer.default_root_dir))

    before_fit = before_validate = before_test = before_predict = _check_run_folder


def run() -> None:
    """The ``segtune`` command (and ``python -m segtune``): :func:`main`, then a quick exit."""
    try:
        main()
    finally:
        # The process ends next: interpreter shutdown would otherwise spend 1-2 s of a 2-core machine
        # garbage-collecting torch's and transformers' objects (atexit handlers still run).
        gc.freeze()


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``args`` replaces ``sys.argv[1:]``, for tests)."""
    argv = sys.argv[1:] if args is None else list(args)
    commands = {
        "models": models_command,
        "export": export_command,
        "compare": compare_command,
        "convert": convert_command,
        "tune": tune_command,
    }
    try:
        if argv and argv[0] in commands:
            raise SystemExit(commands[argv[0]](argv[1:]))
        _show_segtune_logs()
        SegtuneCLI(
            SegmentationModule,
            SegmentationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # segtune's methods configure their own optimiser and schedule (warm-up, cosine, only
            # trainable parameters): LightningCLI's --optimizer/--lr_scheduler would silently replace them.
            auto_configure_optimizers=False,
            save_config_callback=SaveConfig,  # config.yaml, and the config in a W&B run
            save_config_kwargs={"overwrite": True},
            args=args,
            parser_kwargs={
                "description": DESCRIPTION,
                **{sub: {"default_config_files": [str(DEFAULTS)]} for sub in TRAINER_SUBCOMMANDS},
            },
        )
    except USER_ERRORS as e:
        if os.environ.get("SEGTUNE_DEBUG"):
            raise
        print(f"segtune: error: {one_line(e)} (SEGTUNE_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
    except RuntimeError as e:
        # Lightning's DDP message for parameters without gradient, with what causes it in segtune
        if os.environ.get("SEGTUNE_DEBUG") or UNUSED_PARAMETERS not in str(e):
            raise
        print(
            "segtune: error: DDP: some trainable parameters got no gradient in a training step (with box prompts, "
            "the prompt encoder's point embeddings): leave prompt_encoder out of model.init_args.train_parts or "
            "set trainer.strategy: ddp_find_unused_parameters_true (SEGTUNE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    A DataLoader worker's error keeps only the original message; jsonargparse's error for a value
    that no type of a union accepts (a class whose ``__init__`` refused its arguments, a dataclass
    whose check failed) keeps the message of the type that was meant, not the list of types tried.
    """
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        return lines[-1]  # "ValueError: <file>: <what is wrong>", the last line of the worker's traceback
    if lines and lines[0].startswith(UNION_ERROR):
        # "Errors:" then one "- <message>" per subtype tried; NoneType's ("Expected a <class 'NoneType'>") is noise
        tried = [ln[2:] for ln in lines if ln.startswith("- ") and "NoneType" not in ln]
        if tried:
            return tried[0]
    return lines[0] if lines else type(error).__name__


def check_trains_something(trainer: dict[str, Any]) -> None:
    """Refuse a ``fit`` whose trainer settings run no training step (it would write no checkpoint, silently).

    Raises:
        ValueError: naming the setting.
    """
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if trainer.get(key) == 0:
            raise ValueError(f"trainer.{key} is 0: fit would train nothing and write no checkpoint; set 1 or more")


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
    """Writes to whatever ``sys.stderr`` is now (it may be redirected after the handler is made), unless the
    root logger already prints to the console: segtune's records propagate there too, and a user's
    ``logging.basicConfig()`` (or a library's root-level log call, which makes one) would otherwise show every
    line, the fit's "no epoch beat the untuned model" warning among them, twice."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # basicConfig's console handler is a plain StreamHandler; file handlers and pytest's capture are subclasses
        if any(type(h) is logging.StreamHandler for h in logging.getLogger().handlers):
            return
        super().emit(record)
