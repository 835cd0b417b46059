"""The package metadata tells the truth: every import is declared, every floor is installed."""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 runs the rest of the suite

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIRED = [Requirement(r) for r in PYPROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PYPROJECT["optional-dependencies"].items()}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _guarded(node: ast.Try) -> bool:
    """Whether a ``try`` catches ImportError, i.e. its imports are optional."""
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(n, ast.Name) and n.id in IMPORT_ERRORS for n in names):
            return True
    return False


def _imports(node: ast.AST, optional: bool = False) -> list[tuple[str, int, bool]]:
    """``(top-level module, line, optional)`` of every absolute import in ``node``, lazy ones included."""
    if isinstance(node, ast.Import):
        return [(alias.name.split(".")[0], node.lineno, optional) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [(node.module.split(".")[0], node.lineno, optional)] if node.level == 0 and node.module else []
    found = []
    if isinstance(node, ast.Try) and _guarded(node):
        for statement in node.body:  # what the try imports may be missing; the handlers run without it
            found += _imports(statement, optional=True)
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            found += _imports(part, optional)
        return found
    for child in ast.iter_child_nodes(node):
        found += _imports(child, optional)
    return found


def third_party_imports(package: Path) -> dict[str, list[tuple[str, bool]]]:
    """Top-level modules imported anywhere under ``package`` that are neither stdlib nor the package."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(package.rglob("*.py")):
        for module, line, optional in _imports(ast.parse(path.read_text(), str(path))):
            if module in sys.stdlib_module_names or module == package.name or module == "__future__":
                continue
            out.setdefault(module, []).append((f"{path.relative_to(package.parent)}:{line}", optional))
    return out


def test_import_scan_sees_lazy_and_optional_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text(
        "import os\nimport numpy as np\nfrom pkg import b\n"
        "def f():\n    from yaml import safe_load\n"
        "try:\n    import timm\nexcept ImportError:\n    timm = None\n"
    )
    found = third_party_imports(package)
    assert sorted(found) == ["numpy", "timm", "yaml"]
    assert found["yaml"] == [("pkg/a.py:5", False)] and found["timm"] == [("pkg/a.py:7", True)]


def test_every_imported_package_is_declared() -> None:
    providers = metadata.packages_distributions()
    required = {canonicalize_name(r.name) for r in REQUIRED}
    extras = {canonicalize_name(r.name) for reqs in EXTRAS.values() for r in reqs}
    missing = []
    for module, places in sorted(third_party_imports(ROOT / "segtune").items()):
        if module not in providers:
            missing.append(f"{module} (imported at {places[0][0]}) is not installed, so no distribution provides it")
            continue
        dists = {canonicalize_name(d) for d in providers[module]}
        optional = all(opt for _, opt in places)  # every import of it is guarded: an extra may provide it
        if not dists & (required | extras if optional else required):
            missing.append(f"{module} (imported at {places[0][0]}) comes from {sorted(dists)}, not declared")
    assert not missing, "pyproject.toml dependencies lack:\n" + "\n".join(missing)


def test_every_dependency_has_a_floor_and_torch_no_pin() -> None:
    for req in REQUIRED:
        floors = [s for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert floors, f"{req}: no lower bound"
    torch = next(r for r in REQUIRED if r.name == "torch")
    assert all(s.operator == ">=" for s in torch.specifier), "torch is pinned by constraints-cpu.txt, not here"


@pytest.mark.parametrize("extra", [None, *EXTRAS], ids=lambda e: e or "required")
def test_installed_versions_meet_the_floors(extra: str | None) -> None:
    reqs = REQUIRED if extra is None else EXTRAS[extra]
    below = []
    for req in reqs:
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if extra is None:
                below.append(f"{req}: not installed")
            continue  # an extra nobody installed here
        if not req.specifier.contains(Version(installed), prereleases=True):
            below.append(f"{req}: {installed} installed")
    assert not below, "installed versions outside the declared range:\n" + "\n".join(below)
