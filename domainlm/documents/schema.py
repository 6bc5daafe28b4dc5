"""The document table contract: its Arrow schema and the Parquet files that hold it (Apache Arrow / Parquet).

Every stage from ``parquet`` on reads and writes documents through these functions: the schema is
checked on every read and write, and each file carries per-column codecs (:class:`ParquetLayout`).
``<folder>/schema.txt`` (:data:`SCHEMA_FILE`) records the schema a folder of document files was
written with.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from domainlm.common.atomic import atomic_path

#: The schema file written beside the document files (``data/parquet/schema.txt``).
SCHEMA_FILE = "schema.txt"

#: The document table every stage from ``parquet`` on reads and writes. ``n_chars`` is
#: ``len(text)`` in Unicode code points (not bytes, not grapheme clusters; an NFC Hangul syllable
#: is one code point, its conjoining jamo would be two or three); ``label`` is the only
#: nullable column. ``domain`` is dictionary-encoded (int32 indices): one value per file.
DOC_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("domain", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("n_chars", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)

#: The JSONL fields a document file is built from (``n_chars`` is derived, ``domain`` is
#: dictionary-encoded afterwards, since Arrow's JSON reader cannot convert to a dictionary type).
JSON_FIELDS = ("id", "text", "domain", "label", "source")

#: Columns worth Parquet dictionary encoding (few distinct values); ``id``/``text`` are unique.
_DICTIONARY_COLUMNS = ["domain", "label", "source"]


class SchemaMismatchError(ValueError):
    """A Parquet file's Arrow schema differs from :data:`DOC_SCHEMA`."""


class BadDocumentError(ValueError):
    """A JSONL record breaks the data contract (missing field, wrong domain, duplicate id...)."""


@dataclass(frozen=True)
class ParquetLayout:
    """How a document file is written: per-column codecs and rows per row group.

    Attributes:
        codecs: column name -> Parquet codec name (``"brotli"``, ``"zstd"``, ...), one entry
            for every column of :data:`DOC_SCHEMA`.
        row_group_rows: rows per Parquet row group (the unit readers stream and skip by).
    """

    codecs: dict[str, str]
    row_group_rows: int

    @classmethod
    def from_params(cls, text_codec: str, default_codec: str, batch_rows: int) -> ParquetLayout:
        """``text`` gets ``text_codec``, every other column ``default_codec``.

        Raises:
            ValueError: for a codec pyarrow does not know or a non-positive ``batch_rows``.
        """
        for name, codec in (("text_codec", text_codec), ("default_codec", default_codec)):
            try:
                available = pa.Codec.is_available(codec)
            except ValueError:
                available = False
            if not available:
                raise ValueError(f"parquet.{name}={codec!r} is not a codec this pyarrow supports")
        if int(batch_rows) < 1:
            raise ValueError(f"parquet.batch_rows must be >= 1, got {batch_rows!r}")
        codecs = {f.name: (text_codec if f.name == "text" else default_codec) for f in DOC_SCHEMA}
        return cls(codecs=codecs, row_group_rows=int(batch_rows))


def schema_text(schema: pa.Schema = DOC_SCHEMA) -> str:
    """The schema as written to ``data/parquet/schema.txt`` (Arrow's ``to_string``, no metadata)."""
    return schema.to_string(show_schema_metadata=False, show_field_metadata=False) + "\n"


def check_schema(schema: pa.Schema, path: str | os.PathLike, expected: pa.Schema = DOC_SCHEMA) -> None:
    """Raise unless ``schema`` has exactly the fields of ``expected`` (names, order, types, nullability).

    Schema and field metadata are ignored.

    Raises:
        SchemaMismatchError: naming ``path`` and the first field that is missing, unexpected,
            out of order, of another type or of another nullability.
    """
    got = {f.name: f for f in schema}
    want = {f.name: f for f in expected}
    for name in want:
        if name not in got:
            raise SchemaMismatchError(f"{path}: field {name!r} is missing (expected {_describe(want[name])})")
    for name in got:
        if name not in want:
            raise SchemaMismatchError(f"{path}: field {name!r} is not in the document schema")
    for f in expected:
        g = got[f.name]
        if not g.type.equals(f.type) or g.nullable != f.nullable:
            raise SchemaMismatchError(f"{path}: field {f.name!r} is {_describe(g)}, expected {_describe(f)}")
    if schema.names != expected.names:
        repeated = sorted({n for n in schema.names if schema.names.count(n) > 1})
        if repeated:
            raise SchemaMismatchError(f"{path}: field {repeated[0]!r} appears more than once")
        pos = next(i for i, (a, b) in enumerate(zip(schema.names, expected.names)) if a != b)
        raise SchemaMismatchError(
            f"{path}: field {schema.names[pos]!r} is at position {pos}, expected {expected.names[pos]!r} there"
        )


def _describe(field: pa.Field) -> str:
    return f"{field.type}{'' if field.nullable else ' not null'}"


def read_docs(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a document Parquet file after checking its schema against :data:`DOC_SCHEMA`.

    Args:
        path: a file written by this stage (or by ``split``).
        columns: optional projection; ``None`` reads all columns.

    Returns:
        A ``pa.Table`` with the :data:`DOC_SCHEMA` types (``domain`` stays dictionary<int32,string>).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        SchemaMismatchError: when the file's schema differs, naming the file and the field.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    check_schema(pq.read_schema(path), path)
    return pq.read_table(path, columns=list(columns) if columns is not None else None)


def iter_doc_batches(
    path: str | os.PathLike, batch_rows: int = 512, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a document Parquet file as record batches of at most ``batch_rows`` rows.

    Uses ``ParquetFile.iter_batches``, so memory stays around one row group whatever the file
    size. The schema is checked first (see :func:`read_docs` for the errors raised).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    pf = pq.ParquetFile(path)
    check_schema(pf.schema_arrow, path)
    yield from pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns is not None else None)


def read_layout(path: str | os.PathLike) -> ParquetLayout:
    """The per-column codecs and row-group size of an existing Parquet file (from its footer).

    Codec names are pyarrow's upper-case names (``"BROTLI"``, ``"ZSTD"``); the row-group size
    is that of the first row group (the writer's setting; only the last group may be shorter).
    """
    md = pq.ParquetFile(path).metadata
    codecs: dict[str, str] = {}
    rows = 0
    if md.num_row_groups:
        rg = md.row_group(0)
        rows = rg.num_rows
        for i in range(rg.num_columns):
            col = rg.column(i)
            codecs[col.path_in_schema] = col.compression
    return ParquetLayout(codecs=codecs, row_group_rows=max(rows, 1))


def open_writer(path: str | os.PathLike, layout: ParquetLayout) -> pq.ParquetWriter:
    """A ``ParquetWriter`` for :data:`DOC_SCHEMA` with per-column codecs from ``layout``.

    Dictionary (Parquet page) encoding is used for ``domain``, ``label`` and ``source`` only;
    the Arrow schema is stored in the footer, so readers get the dictionary type back.
    """
    return pq.ParquetWriter(str(path), DOC_SCHEMA, compression=dict(layout.codecs), use_dictionary=_DICTIONARY_COLUMNS)


def write_docs(path: str | os.PathLike, table: pa.Table, layout: ParquetLayout) -> int:
    """Write a :data:`DOC_SCHEMA` table to ``path`` atomically, ``layout.row_group_rows`` rows per group.

    Returns:
        Bytes on disk of the written file.

    Raises:
        SchemaMismatchError: when ``table`` does not have the document schema.
    """
    check_schema(table.schema, f"table for {path}")
    with atomic_path(path) as tmp:
        with open_writer(tmp, layout) as writer:
            writer.write_table(table, row_group_size=layout.row_group_rows)
    return Path(path).stat().st_size


def check_schema_file(path: str | os.PathLike) -> None:
    """Check that a folder's ``schema.txt`` (written by the ``parquet`` stage) matches :data:`DOC_SCHEMA`.

    Raises:
        FileNotFoundError: when ``path`` does not exist (re-run the parquet stage).
        SchemaMismatchError: naming ``path`` when its text differs from :func:`schema_text`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: re-run the parquet stage")
    if path.read_text(encoding="utf-8") != schema_text():
        raise SchemaMismatchError(
            f"{path} differs from domainlm.documents.schema.DOC_SCHEMA: the Parquet files were written by another "
            "schema version; re-run the parquet stage"
        )
