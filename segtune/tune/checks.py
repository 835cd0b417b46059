"""Every key of a search space checked against ``segtune fit``'s parser before the first trial.

A key fit does not know, or a value its parser refuses, would otherwise fail trial after trial. The
parse is ``fit --print_config`` in this process (:func:`segtune.compare.dry_parse`, about 0.15 s):
nothing is instantiated. Each path through the conditional blocks is parsed with every key at its
first candidate value, then its second, ... (both bounds of a range, every choice); only when a parse
fails is each key parsed alone, to name the one the parser refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from segtune.compare import dry_parse, parser_error
from segtune.tune.space import Distribution, SearchSpace

#: Lines of jsonargparse's error that say where, not what: left out of the one line.
_NOISE = ("error:", "Does not validate", "Subtypes:", "Errors:", "Given value", "Parser key", "NoneType", "tip:")


def as_argument(value: Any) -> str:
    """A config value as ``segtune fit`` reads it from the command line (strings as they are, others as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def key_arguments(values: dict[str, Any]) -> list[str]:
    """``--key value`` arguments for ``fit``, class paths first: a class's own keys parse only after it is chosen."""
    ordered = sorted(values, key=lambda k: not k.endswith("class_path"))
    return [arg for key in ordered for arg in (f"--{key}", as_argument(values[key]))]


def base_config(config: Path, overrides: list[str]) -> dict[str, Any]:
    """The fully resolved config of ``segtune fit --config config <overrides>`` (``--print_config``).

    Raises:
        ValueError: one line with the parser's error.
    """
    parsed = dry_parse(["fit", "--config", str(config), *overrides])
    if not parsed.ok:
        raise ValueError(f"{config}: segtune fit refuses it: {parser_error(parsed.stderr)}")
    return yaml.safe_load(parsed.config)


def check_against_parser(space: SearchSpace, config: Path, overrides: list[str]) -> None:
    """Parse every key of ``space`` at each of its candidate values on top of ``config``.

    Raises:
        ValueError: ``<search file>: <key>: <what the parser said>``, for the first key refused.
    """
    for combo in space.combinations():
        rounds = max(len(d.candidates()) for d in combo)
        for i in range(rounds):
            values = {d.key: _nth(d, i) for d in combo}
            if dry_parse(["fit", "--config", str(config), *overrides, *key_arguments(values)]).ok:
                continue
            _name_the_key(space.path, config, overrides, combo, values)


def _nth(dist: Distribution, i: int) -> Any:
    candidates = dist.candidates()
    return candidates[i % len(candidates)]


def _name_the_key(
    path: Path, config: Path, overrides: list[str], combo: list[Distribution], values: dict[str, Any]
) -> None:
    """Parse the keys of a refused set one by one (class paths kept: the others may belong to one) and raise
    the first refusal as one line."""
    classes = {k: v for k, v in values.items() if k.endswith("class_path")}
    for dist in combo:
        alone = {**classes, dist.key: values[dist.key]}
        parsed = dry_parse(["fit", "--config", str(config), *overrides, *key_arguments(alone)])
        if not parsed.ok:
            raise ValueError(f"{path}: {dist.key}: {_refusal(parsed.stderr, dist.key, values[dist.key])}")
    # every key parses alone: together they do not (two keys that exclude each other)
    keys = ", ".join(d.key for d in combo)
    raise ValueError(f"{path}: {keys}: segtune fit refuses these values together: {values}")


def _refusal(stderr: str, key: str, value: Any) -> str:
    """What the parser said about ``key`` at ``value``, on one line: the innermost line of its error (the
    class tried, then what it refused), or that fit takes no such key."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), len(lines))
    said = [ln.removeprefix("- ") for ln in lines[start:] if not any(n in ln for n in _NOISE)]
    tried = [ln.split("'")[1] for ln in said if ln.startswith("Problem with given class_path") and "'" in ln]
    said = [ln for ln in said if not ln.startswith("Problem with given class_path")] or said
    if "nrecognized arguments" in stderr:
        return "not a key segtune fit takes"
    if any("is not accepted" in ln for ln in said):
        taker = tried[0] if tried else "the model class"
        return f"not a key {taker} takes (a key only some classes take goes in that choice's block)"
    return f"segtune fit refuses {as_argument(value)!r}: {said[0] if said else parser_error(stderr)}"
