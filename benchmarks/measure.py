"""What the benchmarks share: the CPU time the hypervisor stole during a measurement, and writing a result table.

Imported by the benchmark scripts, which run as ``python benchmarks/<name>.py`` (this folder is then on
``sys.path``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence


def steal_s(stat: str | Path = "/proc/stat") -> float:
    """CPU seconds stolen by the hypervisor since boot, summed over cores (the ``steal`` column of ``/proc/stat``'s
    ``cpu`` line, in USER_HZ = 100 ticks per second); 0 where the kernel does not report it. A difference over a
    timed run tells whether the machine was really idle."""
    fields = Path(stat).read_text().splitlines()[0].split()
    return int(fields[8]) / 100.0 if len(fields) > 8 else 0.0


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the same keys, the first row's order) as a CSV with a header; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
