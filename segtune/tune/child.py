"""A trial whose fit needs processes of its own (DDP, several devices) runs as ``python -m segtune fit``.

Lightning's ``ddp`` starts its other ranks by running the script again with its command line, which in the tune
process is ``segtune tune``'s, not the trial's fit: a multi-process fit cannot run inside the Optuna loop, which
calls fit as a function. Such a trial's fit runs instead as a child process with the very arguments an in-process
trial gets (its ``command.txt``), so it is the same ordinary fit: its :class:`segtune.tune.callbacks.TrialPruning`
loads the study from the storage URL, study name and trial number in those arguments, reports each validation's
score from rank 0 and broadcasts the prune decision to the other ranks, as optuna-integration's Lightning callback
does under DDP (which needs an RDB storage too: every ``segtune tune`` storage is one).

The trial runner reads the child's run folder as it reads an in-process trial's: the objective is the best
``val_dice`` of ``metrics.csv``, which rank 0 writes at each validation whatever the pruner, rather than the
values reported to the study, which a trial no longer RUNNING (or a score that is not finite) does not get; a
pruned fit says so in ``pruned.json``. A single-process trial (one device, strategy ``auto``) stays in the tune
process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Strategies that run one process; any other (``ddp``, ``ddp_spawn``, ``fsdp``, ``deepspeed_*``, a class path)
#: gets a child: one more start-up of torch is cheap beside a fit that needed another strategy.
ONE_PROCESS_STRATEGIES = ("auto", "single_device", "lightning.pytorch.strategies.SingleDeviceStrategy")
#: Seconds a stopped trial's processes get to end after SIGTERM before SIGKILL.
STOP_GRACE_S = 10
#: The environment variable that gives a trial's fit the process id of the ``segtune tune`` that started it.
PARENT_VARIABLE = "SEGTUNE_TUNE_PARENT"
#: Linux's prctl option: the signal a process gets when its parent ends.
PR_SET_PDEATHSIG = 1


def trainer_settings(resolved: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer section a trial's fit sees: the resolved base config's (overrides included) with the trial's
    searched ``trainer.*`` values on top."""
    trainer = dict(resolved.get("trainer") or {})
    trainer.update({k.removeprefix("trainer."): v for k, v in values.items() if k.startswith("trainer.")})
    return trainer


def unsupported(trainer: Mapping[str, Any]) -> str | None:
    """Why ``segtune tune`` cannot run a fit with this trainer section, or None.

    Several nodes: Lightning starts the ranks of its own machine only and waits for the other nodes' at the first
    synchronisation (a fit with ``num_nodes 2`` on one machine waits there for good), and nothing in ``segtune
    tune`` starts a trial's processes on other machines.
    """
    nodes = int(trainer.get("num_nodes") or 1)
    if nodes > 1:
        return (
            f"num_nodes {nodes}: segtune tune starts a trial's processes on this machine only; run one segtune tune "
            "per machine on one --storage instead"
        )
    return None


def needs_own_process(trainer: Mapping[str, Any]) -> str | None:
    """Why a fit with this trainer section needs processes of its own (``"devices 2"``, ``"strategy ddp"``), or
    None when it runs in one process.

    Args:
        trainer: the ``trainer`` section of a fit config (:func:`trainer_settings`).
    """
    strategy = trainer.get("strategy", "auto")
    name = strategy.get("class_path") if isinstance(strategy, Mapping) else strategy
    if name is not None and name not in ONE_PROCESS_STRATEGIES:
        return f"strategy {name}"
    nodes = int(trainer.get("num_nodes") or 1)
    if nodes > 1:  # never started (:func:`unsupported`), but not in this process either
        return f"num_nodes {nodes}"
    devices = device_count(trainer.get("devices", "auto"), trainer.get("accelerator", "auto"))
    if devices > 1:
        return f"devices {trainer.get('devices')}"
    return None


def device_count(devices: Any, accelerator: Any) -> int:
    """How many devices Lightning's ``devices`` setting asks for: an int, a list of indices, ``"0,1"`` (indices),
    ``"2"`` (a count), or ``"auto"``/``-1`` (every GPU there is, one CPU)."""
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:  # Lightning reads "0,1" and "1," as device indices
            return len([part for part in text.split(",") if part.strip()])
        devices = text if text == "auto" else int(text)
    if isinstance(devices, list | tuple):
        return len(devices)
    if devices == "auto" or devices == -1 or devices is None:
        if str(accelerator) in ("auto", "gpu", "cuda"):
            import torch

            return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
        return 1
    return int(devices)


def fit_in_child(args: list[str], log_file: Path) -> int:
    """Run ``python -m segtune <args>`` with its output in ``log_file``; its exit status.

    The child gets a process group of its own, which its ranks join: when ``segtune tune`` stops while the fit runs
    (Ctrl-C, SIGTERM, an error), the whole fit stops with it, ranks included, instead of training on for a trial
    the study has marked failed. SIGTERM meanwhile raises KeyboardInterrupt, as Ctrl-C does, so that the trial is
    marked FAIL and the fit stopped before the tune process ends (Python's default would end it on the spot).
    """
    command = [sys.executable, "-m", "segtune", *args]
    environment = {**os.environ, PARENT_VARIABLE: str(os.getpid())}
    with open(log_file, "w") as out, _sigterm_interrupts():
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=environment,
        )  # fmt: skip
        try:
            return child.wait()
        finally:
            if child.poll() is None:
                _stop(child)


def end_with_parent() -> None:
    """In a trial's fit started by :func:`fit_in_child` (and in each of its ranks): end when the process that
    started it ends, even by ``kill -9``, which no handler sees. Otherwise a killed ``segtune tune`` leaves its
    trial training on, writing into a folder whose trial the next ``segtune tune`` marks failed.

    Linux only (``prctl(PR_SET_PDEATHSIG)``: each process gets SIGTERM when its parent ends, so rank 0 ends with
    ``segtune tune`` and the other ranks with rank 0); elsewhere, and outside a tune, nothing is done.
    """
    started_by = os.environ.get(PARENT_VARIABLE)
    if not started_by or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the fit ends when the next tune marks its trial failed
        return
    try:
        os.kill(int(started_by), 0)  # it ended before the signal was asked for
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)
    except (PermissionError, ValueError):
        pass


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile (main thread only: signal handlers can be set there alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left of it after :data:`STOP_GRACE_S`."""
    log.warning("stopping the trial's fit (process %d and its ranks)", child.pid)
    _signal_group(child, signal.SIGTERM)
    try:
        child.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(child, signal.SIGKILL)
    child.wait()


def _signal_group(child: subprocess.Popen[bytes], sent: signal.Signals) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(child.pid, sent)
        elif child.poll() is None:  # no process groups (Windows): the child alone
            child.kill()
    except ProcessLookupError:  # every process of the group has ended
        pass
