"""``--write``: a benchmark's tables appended to ``benchmarks/RESULTS.md`` under a dated heading."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append_section(title: str, notes: list[str], body: str, path: Path = RESULTS) -> Path:
    """Append ``## <today>: <title>``, the command that ran, ``notes`` (lines) and ``body`` to ``path``.

    Args:
        title: what was measured and where (after the date).
        notes: lines under the command: what the numbers are, the load seen.
        body: the tables.
        path: the results file.
    """
    script = Path(sys.argv[0]).name
    header = [
        f"## {datetime.date.today().isoformat()}: {title}",
        "",
        f"Command: `python benchmarks/{script} {' '.join(sys.argv[1:])}`  ",
        *notes,
    ]
    path.write_text(path.read_text().rstrip() + "\n\n" + "\n".join(header) + "\n\n" + body + "\n")
    print(f"written to {path}")
    return path
