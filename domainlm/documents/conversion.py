"""JSONL -> Parquet conversion of one domain's documents, streamed in record batches.

Reads with pyarrow's streaming JSON reader (``pyarrow.json.open_json``, explicit schema), checks each
batch against the data contract, and writes :data:`~domainlm.documents.schema.DOC_SCHEMA` row groups
with ``pyarrow.parquet.ParquetWriter.write_batch`` (Apache Arrow / Apache Parquet).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from tqdm import tqdm

from domainlm.common.atomic import atomic_path
from domainlm.documents.schema import DOC_SCHEMA, JSON_FIELDS, BadDocumentError, ParquetLayout, open_writer

#: What the JSON reader parses: every :data:`~domainlm.documents.schema.JSON_FIELDS` field as a
#: nullable string, so that a missing field becomes a null we can report by name.
_JSON_SCHEMA = pa.schema([pa.field(name, pa.string()) for name in JSON_FIELDS])
#: Smallest JSON block (bytes): Arrow's reader cannot parse a record larger than one block.
_MIN_BLOCK_BYTES = 1 << 20


def longest_line_bytes(path: str | os.PathLike) -> int:
    """Length in bytes of the longest line of ``path`` (newline included)."""
    longest = 0
    with open(path, "rb") as fh:
        for line in fh:
            longest = max(longest, len(line))
    return longest


def read_jsonl_batches(path: str | os.PathLike, block_bytes: int | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a JSONL file as record batches of the JSON fields (all ``string``, nullable).

    Uses ``pyarrow.json.open_json`` with an explicit schema; fields outside
    :data:`JSON_FIELDS` are ignored. Arrow's reader cannot parse a record larger than one
    block, so the block size defaults to the longest line (at least 1 MiB).

    Raises:
        ValueError: naming ``path`` when a line is not a JSON object or a field is not a string.
    """
    if block_bytes is None:
        block_bytes = max(_MIN_BLOCK_BYTES, longest_line_bytes(path) + 1)
    try:
        reader = pa_json.open_json(
            str(path),
            read_options=pa_json.ReadOptions(block_size=block_bytes),
            parse_options=pa_json.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore"),
        )
        yield from reader
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{path}: cannot parse as JSONL of documents: {exc}") from exc


def to_doc_batch(batch: pa.RecordBatch, domain: str, path: str | os.PathLike, first_row: int = 0) -> pa.RecordBatch:
    """Turn a batch of JSON fields into a :data:`DOC_SCHEMA` batch.

    Adds ``n_chars`` (``pyarrow.compute.utf8_length``: code points, int32) and dictionary-encodes
    ``domain`` (int32 indices).

    Args:
        batch: record batch with the :data:`JSON_FIELDS` columns (strings).
        domain: the domain the file holds; every record's ``domain`` must equal it.
        path: the source file, for error messages.
        first_row: 0-based record number of ``batch``'s first row within the file.

    Raises:
        BadDocumentError: naming the file, the record number and the field, when a required
            field is missing or null, a record's ``domain`` is not ``domain``, or ``text`` is
            not NFC (the data contract).
    """
    for name in ("id", "text", "domain", "source"):
        col = batch.column(name)
        if col.null_count:
            i = pc.index(pc.is_null(col), True).as_py()
            rid = batch.column("id")[i].as_py()
            raise BadDocumentError(f"{path}: record {first_row + i} (id={rid!r}) has no {name!r} (missing or null)")
    wrong = pc.not_equal(batch.column("domain"), domain)
    if pc.any(wrong).as_py():
        i = pc.index(wrong, True).as_py()
        raise BadDocumentError(
            f"{path}: record {first_row + i} (id={batch.column('id')[i].as_py()!r}) has domain "
            f"{batch.column('domain')[i].as_py()!r}, but the file is for domain {domain!r}"
        )
    text = batch.column("text")
    # unicodedata, not pyarrow.compute.utf8_normalize: in pyarrow 25 that kernel returns the
    # decomposed form for every `form` (apache/arrow#51225), so it cannot test for NFC.
    for i, t in enumerate(text.to_pylist()):
        if not unicodedata.is_normalized("NFC", t):
            raise BadDocumentError(
                f"{path}: record {first_row + i} (id={batch.column('id')[i].as_py()!r}) has text not in "
                "Unicode NFC (the dedup stage writes NFC; re-run validate/dedup)"
            )
    arrays = [
        batch.column("id"),
        text,
        pc.dictionary_encode(batch.column("domain")).cast(DOC_SCHEMA.field("domain").type),
        batch.column("label"),
        pc.utf8_length(text).cast(pa.int32()),
        batch.column("source"),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=DOC_SCHEMA)


def rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Regroup record batches into batches of exactly ``rows`` rows (the last may be shorter).

    The JSON reader cuts batches by bytes; this makes every Parquet row group ``rows`` long.
    """
    buf: list[pa.RecordBatch] = []
    n = 0
    for batch in batches:
        buf.append(batch)
        n += batch.num_rows
        while n >= rows:
            table = pa.Table.from_batches(buf)
            yield table.slice(0, rows).combine_chunks().to_batches()[0]
            rest = table.slice(rows)
            buf = rest.combine_chunks().to_batches() if rest.num_rows else []
            n = rest.num_rows
    if n:
        yield pa.Table.from_batches(buf).combine_chunks().to_batches()[0]


def convert_domain(
    jsonl_path: str | os.PathLike, parquet_path: str | os.PathLike, domain: str, layout: ParquetLayout
) -> dict[str, int]:
    """Convert one domain's JSONL file to a Parquet file of :data:`DOC_SCHEMA` (atomic write).

    Records are streamed: at most one JSON block plus one row group is held in memory.

    Returns:
        ``{"rows", "chars", "row_groups", "jsonl_bytes", "parquet_bytes"}``.

    Raises:
        BadDocumentError: for a record breaking the data contract or an id seen twice in the file.
        ValueError: for unparseable JSON (naming the file).
    """
    jsonl_path, parquet_path = Path(jsonl_path), Path(parquet_path)
    seen: set[str] = set()
    rows = chars = groups = 0

    def doc_batches() -> Iterator[pa.RecordBatch]:
        first = 0
        for raw in read_jsonl_batches(jsonl_path):
            yield to_doc_batch(raw, domain, jsonl_path, first)
            first += raw.num_rows

    with (
        atomic_path(parquet_path) as tmp,
        open_writer(tmp, layout) as writer,
        tqdm(desc=f"parquet {domain}", unit="doc", leave=False) as progress,
    ):
        for batch in rebatch(doc_batches(), layout.row_group_rows):
            for i, rid in enumerate(batch.column("id").to_pylist()):
                if rid in seen:
                    raise BadDocumentError(f"{jsonl_path}: record {rows + i} repeats id {rid!r}")
                seen.add(rid)
            writer.write_batch(batch)
            rows += batch.num_rows
            chars += pc.sum(batch.column("n_chars")).as_py() or 0
            groups += 1
            progress.update(batch.num_rows)
    return {
        "rows": rows,
        "chars": chars,
        "row_groups": groups,
        "jsonl_bytes": jsonl_path.stat().st_size,
        "parquet_bytes": parquet_path.stat().st_size,
    }
