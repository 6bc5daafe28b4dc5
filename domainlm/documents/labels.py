"""The label contract: label overrides and the label table, shared by ``split`` and ``refine_labels``.

- **Overrides** (``data/labels/overrides.parquet``, ``dvc add``-ed): ``id``, ``label`` (strings, unique
  ids). ``refine_labels promote`` writes them; ``split`` applies them to the label table only.
- **The label table** (``data/labels/split_labels.parquet``, written by ``split``): one row per document
  in document-file order (domains, then train/val/test): ``id``, ``domain``, ``split``,
  ``source_label`` (the label the document was ingested with) and ``label`` (after overrides).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from domainlm.common.atomic import atomic_path
from domainlm.common.paths import OVERRIDES_PATH

#: Metrics key for documents whose label is null.
NULL_LABEL_KEY = "_null"

OVERRIDES_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("label", pa.string())])
#: The label table: one row per document, in document-file order (domains, then train/val/test).
#: ``source_label`` is the label the document was ingested with, ``label`` the one after overrides.
LABELS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source_label", pa.string()),
        pa.field("label", pa.string()),
    ]
)


def duplicate_id(ids: pa.ChunkedArray | pa.Array) -> str | None:
    """The first id (in ``pyarrow.compute.value_counts`` order) that occurs more than once, or None."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    return next(v["values"] for v in pc.value_counts(ids).to_pylist() if v["counts"] > 1)


def read_overrides(path: str | os.PathLike) -> pa.Table:
    """Read a label-override table (``id: string``, ``label: string``), checking it.

    Returns:
        ``pa.Table`` with exactly the columns ``id`` and ``label`` (strings).

    Raises:
        ValueError: naming ``path`` when a column is missing or not a string, an id or label is
            null, or an id appears twice (an override must be unambiguous).
    """
    schema = pq.read_schema(path)
    for f in OVERRIDES_SCHEMA:
        if f.name not in schema.names:
            raise ValueError(f"{path}: label overrides need a column {f.name!r}")
        if not schema.field(f.name).type.equals(pa.string()):
            raise ValueError(f"{path}: column {f.name!r} is {schema.field(f.name).type}, expected string")
    table = pq.read_table(path, columns=["id", "label"])
    for name in ("id", "label"):
        if table[name].null_count:
            i = pc.index(pc.is_null(table[name]), True).as_py()
            raise ValueError(f"{path}: row {i} has a null {name!r}")
    dup = duplicate_id(table["id"])
    if dup is not None:
        raise ValueError(f"{path}: id {dup!r} has more than one override")
    return table


def apply_overrides(table: pa.Table, overrides: pa.Table) -> tuple[pa.Table, int, int]:
    """Replace the ``label`` of every document whose ``id`` has an override.

    Args:
        table: documents (:data:`domainlm.documents.schema.DOC_SCHEMA`).
        overrides: ``id: string``, ``label: string`` (unique ids; see :func:`read_overrides`).

    Returns:
        ``(table, n_applied, n_unknown)``: the table with the new labels (same schema, same row
        order), how many of its documents got an override (even one equal to the old label), and
        how many override ids match no document in ``table``.
    """
    overrides = overrides.select(["id", "label"]).cast(OVERRIDES_SCHEMA)
    pos = pc.index_in(table["id"], value_set=overrides["id"])  # row of the override, or null
    has_override = pc.is_valid(pos)
    new_label = pc.if_else(has_override, pc.take(overrides["label"], pos), table["label"])
    n_applied = pc.sum(has_override.cast(pa.int64())).as_py() or 0
    matched = pc.is_in(overrides["id"], value_set=table["id"])
    n_unknown = overrides.num_rows - (pc.sum(matched.cast(pa.int64())).as_py() or 0)
    label_idx = table.schema.get_field_index("label")
    out = table.set_column(label_idx, table.schema.field("label"), new_label.cast(pa.string()))
    return out, n_applied, n_unknown


def write_label_table(path: str | os.PathLike, table: pa.Table) -> Path:
    """Write the label table (:data:`LABELS_SCHEMA`) to ``path`` atomically (zstd Parquet)."""
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(LABELS_SCHEMA), tmp, compression="zstd")
    return Path(path)


def read_label_table(path: str | os.PathLike) -> pa.Table:
    """Read the label table the split stage wrote (:data:`LABELS_SCHEMA`).

    Raises:
        FileNotFoundError: when ``path`` does not exist (run the split stage first).
        ValueError: naming ``path`` when a column of :data:`LABELS_SCHEMA` is missing or an id
            appears twice.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"label table {path} is missing: run the split stage first")
    names = pq.read_schema(path).names
    missing = [f.name for f in LABELS_SCHEMA if f.name not in names]
    if missing:
        raise ValueError(f"{path}: the label table needs column(s) {missing}")
    table = pq.read_table(path, columns=LABELS_SCHEMA.names).cast(LABELS_SCHEMA)
    dup = duplicate_id(table["id"])
    if dup is not None:
        raise ValueError(f"{path}: id {dup!r} appears more than once")
    return table


def write_empty_overrides(path: str | Path = OVERRIDES_PATH) -> Path:
    """Create an empty override file (schema ``id: string, label: string``), atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(OVERRIDES_SCHEMA.empty_table(), tmp)
    return Path(path)
