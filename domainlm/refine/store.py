"""The ``sentences`` table of label refinement: a SQLite database written with sqlite-utils.

One row per labelled document of the split outputs. Each refinement iteration changes labels in
one transaction (``Database.atomic()``), so a crash part-way leaves the table as it was.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sqlite_utils
from tqdm.auto import tqdm

from domainlm.common.atomic import atomic_path
from domainlm.common.paths import SPLITS, split_path
from domainlm.documents.labels import read_label_table

log = logging.getLogger(__name__)

TABLE = "sentences"
COLUMNS = {
    "id": str,
    "text": str,
    "domain": str,
    "split": str,
    "original_label": str,
    "current_label": str,
    "confidence": float,
    "label_last_updated": str,
    "updated_iteration": int,
}
SNAPSHOT_SCHEMA = pa.schema(
    [pa.field("id", pa.string()), pa.field("current_label", pa.string()), pa.field("confidence", pa.float64())]
)


def utc_now() -> str:
    """The current time as ISO-8601 UTC with seconds, e.g. ``2024-05-01T12:00:00+00:00``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def split_files(split_root: str | os.PathLike, domains: Iterable[str]) -> list[tuple[str, Path]]:
    """``(split, path)`` of every ``<split_root>/<domain>/<split>.parquet``, domains in order.

    Raises:
        FileNotFoundError: naming the first split file that is missing.
    """
    out = []
    for d in domains:
        for s in SPLITS:
            p = split_path(split_root, d, s)
            if not p.exists():
                raise FileNotFoundError(f"split output {p} is missing: run the split stage first")
            out.append((s, p))
    return out


@dataclass
class LoadReport:
    """What :func:`iter_split_rows` read: ``rows`` loaded, ``unlabelled`` documents left out
    (a null label cannot be refined), per split counts."""

    rows: int = 0
    unlabelled: int = 0
    per_split: dict[str, int] | None = None


def iter_split_rows(
    files: list[tuple[str, Path]], chunksize: int, report: LoadReport, labels: Mapping[str, str | None] | None = None
) -> Iterator[dict]:
    """Yield one ``sentences`` row per labelled document, reading each parquet file in
    record batches of ``chunksize`` rows (pyarrow), so memory stays bounded.

    A document's label is ``labels[id]`` when ``labels`` is given (the split stage's label table,
    overrides applied: :func:`label_map`), else the file's own ``label`` column. Documents with a
    null label are counted in ``report.unlabelled`` (and logged), not loaded.

    Raises:
        ValueError: naming the file when a required column (id, text, domain, label) is missing,
            an id appears twice across the split outputs, or an id has no entry in ``labels``.
    """
    seen: set[str] = set()
    now = utc_now()
    report.per_split = {s: 0 for s in SPLITS}
    for split, path in files:
        pf = pq.ParquetFile(path)
        missing = {"id", "text", "domain", "label"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        for batch in pf.iter_batches(batch_size=chunksize, columns=["id", "text", "domain", "label"]):
            for rec in batch.to_pylist():
                if labels is not None:
                    if rec["id"] not in labels:
                        raise ValueError(
                            f"{path}: document id {rec['id']!r} has no row in the label table (re-run the split stage)"
                        )
                    rec["label"] = labels[rec["id"]]
                if rec["label"] is None:
                    report.unlabelled += 1
                    continue
                if rec["id"] in seen:
                    raise ValueError(f"{path}: document id {rec['id']!r} appears twice in the split outputs")
                seen.add(rec["id"])
                report.rows += 1
                report.per_split[split] += 1
                yield {
                    "id": rec["id"],
                    "text": rec["text"],
                    "domain": rec["domain"],
                    "split": split,
                    "original_label": rec["label"],
                    "current_label": rec["label"],
                    "confidence": None,
                    "label_last_updated": now,
                    "updated_iteration": None,
                }
    if report.unlabelled:
        log.warning("%d documents have no label and are not refined", report.unlabelled)


def label_map(path: str | os.PathLike) -> dict[str, str | None]:
    """``{id: label}`` from the split stage's label table (overrides applied;
    :func:`domainlm.documents.labels.read_label_table`, whose errors it raises)."""
    table = read_label_table(path)
    return dict(zip(table["id"].to_pylist(), table["label"].to_pylist()))


def create_store(path: str | os.PathLike, rows: Iterable[dict], *, chunksize: int = 500) -> Path:
    """Create the ``sentences`` database at ``path`` from ``rows`` (dicts with :data:`COLUMNS`).

    Rows are inserted ``chunksize`` at a time (sqlite-utils ``insert_all``). The database is
    built beside ``path`` and moved into place when complete (:func:`domainlm.common.atomic.atomic_path`),
    replacing any older one. Indexes: ``current_label`` and ``split``.

    Returns:
        ``path``.

    Raises:
        ValueError: when ``rows`` is empty (nothing to refine).
    """
    with atomic_path(path) as tmp:
        db = sqlite_utils.Database(tmp)
        try:
            table = db[TABLE]
            table.create(COLUMNS, pk="id", not_null={"text", "domain", "split", "original_label", "current_label"})
            table.insert_all(tqdm(rows, desc="load sentences", unit="doc"), batch_size=chunksize)
            if table.count == 0:
                raise ValueError("no labelled documents to refine")
            table.create_index(["current_label"])
            table.create_index(["split"])
        finally:
            db.close()
    return Path(path)


@dataclass
class Labels:
    """The refinable state, in ``rowid`` (load) order: ``ids``, ``splits``, ``original`` and
    ``current`` labels (object arrays of str, shape ``(n,)``) and ``texts`` (list of str)."""

    ids: np.ndarray
    texts: list[str]
    splits: np.ndarray
    original: np.ndarray
    current: np.ndarray


def read_labels(db: sqlite_utils.Database) -> Labels:
    """Read every row of ``sentences`` in load order (``rowid``)."""
    rows = db.execute(f"SELECT id, text, split, original_label, current_label FROM {TABLE} ORDER BY rowid").fetchall()
    cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
    return Labels(
        np.array(cols[0], dtype=object),
        list(cols[1]),
        np.array(cols[2], dtype=object),
        np.array(cols[3], dtype=object),
        np.array(cols[4], dtype=object),
    )


def read_current(db: sqlite_utils.Database) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, current_labels)`` in load order (object arrays of str)."""
    rows = db.execute(f"SELECT id, current_label FROM {TABLE} ORDER BY rowid").fetchall()
    return np.array([r[0] for r in rows], dtype=object), np.array([r[1] for r in rows], dtype=object)


@dataclass(frozen=True)
class RowUpdate:
    """New state of one row after an iteration: its label (``None`` = unchanged) and confidence."""

    id: str
    confidence: float
    label: str | None = None


def apply_updates(
    db: sqlite_utils.Database, updates: Iterable[RowUpdate], iteration: int, now: str | None = None
) -> int:
    """Write one iteration's results in ONE transaction (sqlite-utils ``Database.atomic()``).

    Every update sets ``confidence``; an update with a ``label`` also sets ``current_label``,
    ``label_last_updated`` (= ``now``, ISO-8601 UTC) and ``updated_iteration`` (= ``iteration``).
    If anything raises before the end, including the ``updates`` iterable itself, the
    transaction is rolled back and the table is exactly as before the call.

    Returns:
        The number of labels changed.

    Raises:
        KeyError: naming an id that is not in the table (after rolling back).
    """
    now = now or utc_now()
    changed = 0
    with db.atomic():
        for u in updates:
            if u.label is None:
                cur = db.execute(f"UPDATE {TABLE} SET confidence = ? WHERE id = ?", [u.confidence, u.id])
            else:
                cur = db.execute(
                    f"UPDATE {TABLE} SET current_label = ?, confidence = ?, label_last_updated = ?, "
                    f"updated_iteration = ? WHERE id = ?",
                    [u.label, u.confidence, now, iteration, u.id],
                )
                changed += 1
            if cur.rowcount != 1:
                raise KeyError(f"sentence id {u.id!r} is not in the {TABLE} table")
    return changed


def write_snapshot(db: sqlite_utils.Database, path: str | os.PathLike) -> Path:
    """Write ``id, current_label, confidence`` of every row (load order) to a parquet file, atomically."""
    rows = db.execute(f"SELECT id, current_label, confidence FROM {TABLE} ORDER BY rowid").fetchall()
    table = pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.string()),
            "current_label": pa.array([r[1] for r in rows], pa.string()),
            "confidence": pa.array([r[2] for r in rows], pa.float64()),
        },
        schema=SNAPSHOT_SCHEMA,
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def changed_labels(db: sqlite_utils.Database) -> pa.Table:
    """Rows whose ``current_label`` differs from ``original_label``: ``id, label`` strings, by id."""
    rows = db.execute(
        f"SELECT id, current_label FROM {TABLE} WHERE current_label != original_label ORDER BY id"
    ).fetchall()
    return pa.table(
        {"id": pa.array([r[0] for r in rows], pa.string()), "label": pa.array([r[1] for r in rows], pa.string())}
    )
