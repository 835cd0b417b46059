"""Two models scored on the same instances: the paired difference of their per-instance scores, with a
seeded bootstrap 95% interval over instances, overall and per class. numpy only, no Lightning.

A mean over a few dozen instances moves by a few hundredths from one split to the next, so
"better" is reported with its interval: a difference whose interval includes 0 is within the
noise of the split it was measured on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Bootstrap resamples: the interval's ends move by about 0.001 of the scores' spread between seeds.
RESAMPLES = 10_000
#: Resampled instance indices drawn per chunk (bounds memory at ~32 MiB for any number of instances).
CHUNK = 2**22


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``after - before`` over the instances both scored, and its 95% bootstrap interval.

    Args:
        mean: mean per-instance difference.
        low: 2.5th percentile of the bootstrap distribution of that mean.
        high: 97.5th percentile.
        instances: how many instances were paired.
    """

    mean: float
    low: float
    high: float
    instances: int

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [95% CI {self.low:+.4f}, {self.high:+.4f}] over {self.instances} instances"

    def as_dict(self) -> dict[str, Any]:
        """``{"mean", "low", "high", "instances"}``, for json files."""
        return asdict(self)


def paired_difference(
    before: Mapping[Hashable, float | None],
    after: Mapping[Hashable, float | None],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedDifference | None:
    """The paired difference ``after - before`` over the instances both scored, with a percentile bootstrap.

    Instances are resampled with replacement ``resamples`` times; the interval is the 2.5th and
    97.5th percentiles of the resampled means. Instances one side did not score (``None``, NaN:
    excluded by ``empty_target``, or missing) are left out.

    Args:
        before: score of each instance (by any sortable key, e.g. ``(image_id, instance)``).
        after: the other model's score of each instance, by the same keys.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed: the same inputs always give the same interval.

    Returns:
        The difference, or ``None`` when no instance was scored by both.
    """
    keys = sorted(k for k, v in before.items() if _finite(v) and _finite(after.get(k)))
    if not keys:
        return None
    diff = np.array([after[k] - before[k] for k in keys], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    per_chunk = max(1, CHUNK // len(diff))
    for start in range(0, resamples, per_chunk):
        n = min(per_chunk, resamples - start)
        means[start : start + n] = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(float(diff.mean()), float(low), float(high), len(keys))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def paired_rows(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], score: str = "dice", seed: int = 0
) -> dict[str, Any]:
    """:func:`paired_difference` of one score over per-instance rows, overall and per class.

    Rows are :func:`segtune.reports.instance_rows` (``image_id``, ``instance``, ``class`` and the
    score), or for volumes :func:`segtune.volume_scoring.case_report_rows` (``image_id`` the case,
    ``instance`` the class: one row per (case, class)); the two lists are paired by ``(image_id, instance)``.

    Returns:
        ``{"overall": ..., "per_class": {name: ...}}``, each a :meth:`PairedDifference.as_dict` or ``None``.
    """

    def by_key(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[tuple[int, int], float | None]]:
        out: dict[str, dict[tuple[int, int], float | None]] = defaultdict(dict)
        for row in rows:
            out[row["class"]][(int(row["image_id"]), int(row["instance"]))] = row[score]
        return out

    first, second = by_key(before), by_key(after)
    every_first = {k: v for group in first.values() for k, v in group.items()}
    every_second = {k: v for group in second.values() for k, v in group.items()}

    def difference(a: Mapping, b: Mapping) -> dict[str, Any] | None:
        found = paired_difference(a, b, seed=seed)
        return found.as_dict() if found else None

    return {
        "overall": difference(every_first, every_second),
        "per_class": {name: difference(first[name], second.get(name, {})) for name in sorted(first)},
    }


def format_interval(difference: Mapping[str, Any] | None) -> str:
    """``+0.0350 [+0.0100, +0.0610]``, or ``-`` when nothing was paired."""
    if not difference:
        return "-"
    return f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]"
