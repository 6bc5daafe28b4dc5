"""Stage metrics: one JSON file per stage under ``metrics/``, read by ``dvc metrics show/diff``.

Conventions: nested dicts of numbers with stable keys; rates are fractions in [0, 1];
durations are seconds; names carry their unit (``docs_per_s``, ``peak_rss_mb``).
"""

from __future__ import annotations

import csv
import io
import os
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from domainlm.common.atomic import write_json
from domainlm.common.paths import METRICS_DIR


def write_metrics(name: str, values: dict[str, Any], root: str | os.PathLike = METRICS_DIR) -> Path:
    """Write ``values`` to ``<root>/<name>.json`` atomically; ``name`` may contain ``/``."""
    return write_json(Path(root) / f"{name}.json", values)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaves of a nested dict as ``{"a.b": value}`` (the key form of ``dvc metrics`` and MLflow)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def flatten_numbers(obj: Mapping[str, Any]) -> dict[str, float]:
    """Numeric leaves of a nested dict as ``{"a.b": value}`` (booleans, strings and None left out)."""
    return {k: v for k, v in flatten(obj).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def rows_to_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """CSV text of ``rows`` (``None`` → empty field); columns default to the keys in the order first seen.

    The form of every ``plots/*.csv`` and ``metrics/summary.csv`` this pipeline writes.
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
