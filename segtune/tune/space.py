"""The search space of ``segtune tune``: a YAML file mapping config keys to distributions.

.. code-block:: yaml

    model.init_args.lr: {log_uniform: [1.0e-5, 1.0e-3]}
    trainer.max_epochs: {int: [2, 8]}
    data.init_args.prompts.box_jitter: {uniform: [0.0, 0.1]}
    model.class_path:                      # a choice may carry keys only that choice takes
      choice:
        segtune.methods.DecoderOnly: {}
        segtune.methods.LoRA:
          model.init_args.r: {choice: [4, 8, 16]}

A key is any key ``segtune fit`` takes (``--<key> <value>``). ``choice`` is a list of values, or a
mapping from each value to the keys sampled only when that value is chosen (a conditional block).
Optuna samples it define-by-run (:meth:`SearchSpace.suggest`); this module only reads and checks.
Every bad entry stops with one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segtune.files import read_yaml

#: The distributions a key may have, and what each takes.
KINDS = {
    "log_uniform": "[low, high], 0 < low < high",
    "uniform": "[low, high], low < high",
    "int": "[low, high], whole numbers, low < high",
    "choice": "a list of values, or a mapping of value -> keys sampled only with that value",
}
#: Values Optuna stores as they are in a categorical distribution; others (lists, mappings) go as JSON text.
PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Distribution:
    """One key's distribution.

    Args:
        key: the config key (``model.init_args.lr``).
        kind: one of :data:`KINDS`.
        low: the lower bound (numeric kinds).
        high: the upper bound (numeric kinds).
        choices: the values (``choice``).
        branches: for a ``choice`` given as a mapping, the keys sampled only with each value (by index).
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    branches: tuple[tuple[Distribution, ...], ...] = ()

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this distribution can give."""
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def encoded(self, value: Any) -> Any:
        """``value`` as Optuna stores it (a choice that is no plain value: its JSON text)."""
        return value if self.kind != "choice" or isinstance(value, PLAIN) else json.dumps(value)

    def candidates(self) -> list[Any]:
        """The values checked against the parser before any trial: both bounds, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for this key's value (Optuna names the parameter by the key)."""
        if self.kind == "log_uniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high)
        # Optuna's categorical values must be plain: a list or mapping travels as its JSON text
        encoded = [c if isinstance(c, PLAIN) else json.dumps(c) for c in self.choices]
        picked = trial.suggest_categorical(self.key, encoded)
        return self.choices[encoded.index(picked)]


@dataclass(frozen=True)
class SearchSpace:
    """The keys of a search file, in its order.

    Args:
        path: the file (named in every error).
        keys: the top-level distributions (a ``choice`` may hold conditional ones in its branches).
    """

    path: Path
    keys: tuple[Distribution, ...] = field(default_factory=tuple)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One trial's values: every key, and the keys of each chosen branch (define-by-run)."""
        values: dict[str, Any] = {}
        pending = list(self.keys)
        while pending:
            dist = pending.pop(0)
            values[dist.key] = dist.suggest(trial)
            if dist.branches:
                pending += dist.branches[dist.choices.index(values[dist.key])]
        return values

    def values_in(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The values a resolved config gives the keys (through the branch its own choice picks), or None when
        one is missing or outside its distribution."""
        values: dict[str, Any] = {}
        pending = list(self.keys)
        while pending:
            dist = pending.pop(0)
            node: Any = config
            for part in dist.key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return None
                node = node[part]
            if not dist.contains(node):
                return None
            values[dist.key] = node
            if dist.branches:
                pending += dist.branches[dist.choices.index(node)]
        return values

    def all_keys(self) -> list[str]:
        """Every key, conditional ones included."""
        out: list[str] = []
        pending = list(self.keys)
        while pending:
            dist = pending.pop(0)
            out.append(dist.key)
            pending += [d for branch in dist.branches for d in branch]
        return list(dict.fromkeys(out))

    def distribution(self, key: str) -> Distribution | None:
        """The (first) distribution of ``key``."""
        pending = list(self.keys)
        while pending:
            dist = pending.pop(0)
            if dist.key == key:
                return dist
            pending += [d for branch in dist.branches for d in branch]
        return None

    def combinations(self) -> list[list[Distribution]]:
        """Every set of keys one trial may sample: one per path through the conditional branches."""
        combos: list[list[Distribution]] = [[]]
        for dist in self.keys:
            combos = [[*c, *rest] for c in combos for rest in _paths(dist)]
        return combos


def _paths(dist: Distribution) -> list[list[Distribution]]:
    if not dist.branches:
        return [[dist]]
    out = []
    for value, branch in zip(dist.choices, dist.branches, strict=True):
        fixed = Distribution(dist.key, "choice", choices=(value,))  # this branch's value only
        combos: list[list[Distribution]] = [[fixed]]
        for inner in branch:
            combos = [[*c, *rest] for c in combos for rest in _paths(inner)]
        out += combos
    return out


def load_search(path: str | Path) -> SearchSpace:
    """Read and check a search file (everything but what the CLI's parser decides: see
    :func:`segtune.tune.checks.check_against_parser`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file and the key: invalid YAML, not a mapping, no keys, an unknown
            distribution, an empty choice, inverted or non-numeric bounds, a key given twice in one path.
    """
    path = Path(path)
    raw = read_yaml(path, "search file")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: a search file maps config keys to distributions, e.g. model.init_args.lr: "
                         "{log_uniform: [1.0e-5, 1.0e-3]}")  # fmt: skip
    space = SearchSpace(path, tuple(_distribution(path, str(k), v, ()) for k, v in raw.items()))
    for combo in space.combinations():
        seen = [d.key for d in combo]
        twice = sorted({k for k in seen if seen.count(k) > 1})
        if twice:
            raise ValueError(f"{path}: {twice[0]}: given twice for one trial (at the top and in a choice's block)")
    return space


def _distribution(path: Path, key: str, spec: Any, parents: tuple[str, ...]) -> Distribution:
    where = f"{path}: {key}"
    if key.startswith("trainer.callbacks") or key in ("config", "ckpt_path"):
        raise ValueError(f"{where}: not searchable (set it in the config)")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        kinds = ", ".join(f"{{{k}: {v}}}" for k, v in KINDS.items())
        raise ValueError(f"{where}: a distribution is one of {kinds}; got {spec!r}")
    kind, value = next(iter(spec.items()))
    if kind == "choice":
        if isinstance(value, dict):
            choices = tuple(value)
            blocks = [block or {} for block in value.values()]
            for choice, block in zip(choices, blocks, strict=True):
                if not isinstance(block, dict):
                    raise ValueError(f"{where}: the block of choice {choice!r} must map keys to distributions")
            branches = tuple(
                tuple(_distribution(path, str(k), v, (*parents, key)) for k, v in block.items()) for block in blocks
            )
        elif isinstance(value, list):
            choices, branches = tuple(value), ()
        else:
            raise ValueError(f"{where}: choice takes a list of values (or a mapping of value -> keys), got {value!r}")
        if not choices:
            raise ValueError(f"{where}: empty choice")
        if len({json.dumps(c, sort_keys=True, default=str) for c in choices}) < len(choices):
            raise ValueError(f"{where}: a choice lists one value twice")
        return Distribution(key, kind, choices=choices, branches=branches)
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{where}: {kind} takes {KINDS[kind]}, got {value!r}")
    low, high = value
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not numeric:
        raise ValueError(f"{where}: {kind} bounds must be finite numbers, got {value!r}")
    if kind == "int" and not all(float(v).is_integer() for v in value):
        raise ValueError(f"{where}: int bounds must be whole numbers, got {value!r}")
    if low >= high:
        raise ValueError(f"{where}: inverted bounds [{low}, {high}]: low must be below high")
    if kind == "log_uniform" and low <= 0:
        raise ValueError(f"{where}: log_uniform needs low > 0, got {low}")
    if kind == "int":
        return Distribution(key, kind, int(low), int(high))
    return Distribution(key, kind, float(low), float(high))
