"""Reading checkpoints and writing output folders so that nothing a user had is lost.

- :func:`read_checkpoint_file`: the one place a checkpoint file is opened outside Lightning's own
  load (resume, ``--ckpt_path`` checks, export, convert); every failure is one line naming the file.
- :func:`output_folder`: an output folder (``segtune export``, ``segtune convert``) must be new or
  empty unless the user says ``--overwrite``; the files are written into a folder beside it and
  moved into place at the end, so a crash leaves the old folder or the new one, never a mix.
- :func:`read_yaml`: a YAML file a command reads (compare's matrix, tune's search space), each failure
  one line naming the file.
- :func:`write_atomically`: one file (a checkpoint, a figure, a json, a volume) written beside its
  path and renamed over it, so a reader never sees half a file and a failed write changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _pickled(error: BaseException) -> str | None:
    """What torch's weights-only refusal objects to (``Unsupported global: GLOBAL datetime.datetime``), or
    None when the refusal is of bytes that are no pickle at all (a text file: ``Unsupported operand``)."""
    found = re.search(r"(Unsupported global: [^ ]+ [^ ]+)", _ANSI.sub("", str(error)))
    return found.group(1) if found else None


def read_checkpoint_file(path: str | Path, weights_only: bool = True) -> Any:
    """Load a checkpoint file (memory-mapped when it can be: nothing is read twice into memory).

    Args:
        path: the file.
        weights_only: refuse pickled objects beyond tensors and plain values (segtune's default;
            the config's ``weights_only`` key).

    Raises:
        FileNotFoundError: the file is not there.
        ValueError: one line naming the file: empty, truncated or damaged, not a PyTorch file, or
            holding pickled objects that weights-only loading refuses.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the checkpoint file is empty (a copy or save that never finished)")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except (RuntimeError, OSError):  # legacy (pre-1.6) files and some file systems cannot be mapped; a damaged
            # file fails again below
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if _pickled(e) is None:
            raise ValueError(
                f"{path}: not a readable PyTorch checkpoint (damaged, truncated or another kind of file)"
            ) from None
        raise ValueError(
            f"{path}: holds pickled Python objects beyond tensors and plain values ({_pickled(e)}); segtune loads "
            "checkpoints weights-only and never runs code from a file: re-save it with tensors and plain values only"
        ) from None
    except Exception:  # truncated zip, text, another format: torch raises many kinds, none of them telling more
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint (damaged, truncated or another kind of file)"
        ) from None


def check_output_folder(output: Path, overwrite: bool) -> None:
    """Fail before any work when ``output`` cannot become the command's output folder.

    Raises:
        FileExistsError: ``output`` holds files and ``overwrite`` is off.
        NotADirectoryError: ``output`` (or a folder above it) is a file.
        PermissionError: the folder that would hold ``output`` cannot be written.
    """
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output}: is a file, not a folder; give --output a new or empty folder")
    if output.is_dir() and not overwrite:
        held = sorted(p.name for p in output.iterdir())
        if held:
            raise FileExistsError(
                f"{output}: the folder already holds {len(held)} files or folders (e.g. {', '.join(held[:3])}); give "
                "--output a new or empty folder, or add --overwrite to replace what this command writes there "
                "(other files stay)",
            )
    existing = output.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{output}: {existing} is a file, so the folder cannot be made there")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PermissionError(f"{output}: cannot be written in {existing} ({e.strerror or e})") from None


@contextlib.contextmanager
def output_folder(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A scratch folder beside ``output`` to write into; moved into place when the block ends without error.

    A new or empty ``output`` is replaced by one rename. With ``overwrite``, an ``output`` that holds
    files gets the new files, and keeps the files the command did not write (hard-linked, not copied);
    the old folder is swapped for the new one by two renames, then removed. An error inside the block
    removes the scratch folder and leaves ``output`` as it was.

    Raises:
        FileExistsError, NotADirectoryError, PermissionError: see :func:`check_output_folder`.
    """
    output = Path(output)
    check_output_folder(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o777 & ~umask)  # mkdtemp makes a 0700 folder; the output gets the usual permissions
    try:
        yield scratch
        _publish(scratch, output)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target, follow_symlinks=False)


def _publish(scratch: Path, output: Path) -> None:
    if not output.exists() or not any(output.iterdir()):
        os.replace(scratch, output)  # an empty folder is replaced atomically
        return
    for entry in output.iterdir():  # what the user had and this command did not write stays
        target = scratch / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))
    old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".old"))
    os.replace(output, old / output.name)
    os.replace(scratch, output)
    shutil.rmtree(old, ignore_errors=True)


def read_yaml(path: Path, what: str) -> Any:
    """The parsed YAML of ``path``.

    Args:
        path: the file.
        what: what it is, for the message when it is missing (``"compare config"``, ``"search file"``).

    Raises:
        FileNotFoundError, ValueError: one line naming the file (missing; invalid YAML).
    """
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None


def write_atomically(path: Path, write: Callable[[Path], None], suffix: str = ".tmp", fsync: bool = False) -> Path:
    """Write ``path`` through ``write(temporary)`` and rename the temporary file over it.

    The temporary file lies beside ``path`` (same filesystem, so the rename is atomic) and gets the
    permissions a new file would get; it is removed when ``write`` fails, leaving ``path`` as it was.

    Args:
        path: the file to write (its folder is made when missing).
        write: writes the content to the path it is given.
        suffix: the temporary file's suffix (writers that pick the format by extension need the real one).
        fsync: flush the file to disk before the rename (checkpoints: a crash right after must not
            leave an empty file under the name).

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    scratch = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o666 & ~umask)  # mkstemp makes 0600 files
    try:
        write(scratch)
        if fsync:
            with open(scratch, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return path
