"""Stand-ins for the imports the reference implementations make only for pre/post-processing.

Meta's ``segment-anything`` and ``sam2`` and MobileSAM's code import torchvision (image transforms,
NMS for automatic mask generation) and MobileSAM imports timm (drop-path, weight init helpers, model
registry). None of it runs on the path the equivalence tests take (a model forward in eval mode,
drop-path 0), and neither package can be installed here (torchvision has no CPU build for this
torch). :func:`reference_imports` puts placeholder modules in ``sys.modules`` while the references
import and takes them out again, so that transformers never sees a torchvision or timm that is not there.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _Placeholder(types.ModuleType):
    """A module whose every attribute is a placeholder (never called on the tested path)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _unavailable(f"{self.__name__}.{name}")


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name} is a test stand-in: torchvision is not installed")

    return call


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


class _DropPath(nn.Module):
    """timm's DropPath at rate 0 (the references build MobileSAM with drop_path_rate 0)."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _timm() -> dict[str, types.ModuleType]:
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = _DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}


@contextmanager
def reference_imports() -> Iterator[None]:
    """Within the block, ``torchvision`` and the timm helpers import as stand-ins (real ones win)."""
    before = set(sys.modules)
    finder = _Finder()
    missing_tv = importlib.util.find_spec("torchvision") is None
    missing_timm = importlib.util.find_spec("timm") is None
    if missing_tv:
        sys.meta_path.append(finder)
    if missing_timm:
        for name, module in _timm().items():
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
    try:
        yield
    finally:
        if missing_tv:
            sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("torchvision", "timm"):
                del sys.modules[name]
        if missing_timm:
            for name in _timm():
                sys.modules.pop(name, None)
