"""What the benchmarks share: the set-up of an alternating run on the built pipeline, the CPU time the hypervisor
stole during a measurement, and writing a result table.

Imported by the benchmark scripts, which run as ``python benchmarks/<name>.py`` (this folder is then on
``sys.path``).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


def alternating_run(doc: str) -> tuple[argparse.Namespace, dict[str, Any], Any]:
    """Set up a benchmark that alternates settings over ``--rounds`` rounds on this checkout's built pipeline:
    parse ``--rounds`` (default 2; ``doc``'s first line is the help text), work from the repository root with
    WARNING logging, load ``params.yaml`` and apply its compute policy to this process.

    Returns:
        ``(args, params, compute)``: the parsed arguments, the params dict and the applied
        :class:`domainlm.common.compute.ComputePolicy`.
    """
    from domainlm.common import params as P
    from domainlm.common.compute import resolve

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.chdir(ROOT)
    logging.basicConfig(level=logging.WARNING)
    prm = P.load_params()
    compute = resolve(prm.get("compute"))
    compute.apply()
    return args, prm, compute


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
