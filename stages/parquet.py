"""Convert each domain's deduplicated JSONL into one Parquet file with an explicit Arrow schema.

Reads data/dedup/<domain>.jsonl in record batches with pyarrow's streaming JSON reader
(``pyarrow.json.open_json``) and writes them with ``pyarrow.parquet.ParquetWriter.write_batch``,
brotli for ``text`` and zstd for the other columns (Apache Arrow / Apache Parquet).
"""
from __future__ import annotations

import logging
import os
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from tqdm import tqdm

from stages.atomic import atomic_path, write_text
from stages.metrics import peak_rss_mb, write_metrics
from stages.params import domains as param_domains
from stages.params import section

log = logging.getLogger(__name__)

IN_DIR = Path("data/dedup")
OUT_DIR = Path("data/parquet")
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

#: What the JSON reader parses: the JSONL fields (``n_chars`` is derived, ``domain`` is
#: dictionary-encoded afterwards, since Arrow's JSON reader cannot convert to a dictionary
#: type). All nullable here so that a missing field becomes a null we can report by name.
JSON_FIELDS = ("id", "text", "domain", "label", "source")
_JSON_SCHEMA = pa.schema([pa.field(name, pa.string()) for name in JSON_FIELDS])

#: Columns worth Parquet dictionary encoding (few distinct values); ``id``/``text`` are unique.
_DICTIONARY_COLUMNS = ["domain", "label", "source"]

_MIN_BLOCK_BYTES = 1 << 20


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
    def from_params(cls, text_codec: str, default_codec: str, batch_rows: int) -> "ParquetLayout":
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
    return pq.ParquetWriter(
        str(path), DOC_SCHEMA, compression=dict(layout.codecs), use_dictionary=_DICTIONARY_COLUMNS
    )


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
            raise BadDocumentError(
                f"{path}: record {first_row + i} (id={rid!r}) has no {name!r} (missing or null)"
            )
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


def convert_domain(jsonl_path: str | os.PathLike, parquet_path: str | os.PathLike, domain: str,
                   layout: ParquetLayout) -> dict[str, int]:
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

    with atomic_path(parquet_path) as tmp, open_writer(tmp, layout) as writer, \
            tqdm(desc=f"parquet {domain}", unit="doc", leave=False) as progress:
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


def run(in_dir: str | os.PathLike, out_dir: str | os.PathLike, domains: Sequence[str], layout: ParquetLayout) -> dict:
    """Convert ``<in_dir>/<domain>.jsonl`` for every domain into ``<out_dir>/<domain>.parquet`` plus ``schema.txt``.

    Only the listed domains are read (the dedup folder also holds e.g. ``removed.jsonl``).
    ``out_dir`` is replaced as a whole, atomically.

    Returns:
        The metrics dict: ``{"domains": {d: {rows, chars, row_groups, jsonl_bytes, parquet_bytes,
        compression_ratio}}, "total": {...same...}, "wall_s", "docs_per_s", "peak_rss_mb"}``;
        ``compression_ratio`` = JSONL bytes / Parquet bytes (2.0 means half the size).

    Raises:
        ValueError: when ``domains`` is empty.
        FileNotFoundError: naming the domains whose ``<in_dir>/<domain>.jsonl`` is missing.
    """
    t0 = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not domains:
        raise ValueError("params.yaml `domains` is empty: nothing to convert")
    missing = [d for d in domains if not (in_dir / f"{d}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"domain(s) {missing} listed in params.yaml have no {in_dir}/<domain>.jsonl "
                                "(run the dedup stage first)")
    per_domain: dict[str, dict] = {}
    with atomic_path(out_dir, is_dir=True) as tmp_dir:
        write_text(tmp_dir / SCHEMA_FILE, schema_text())
        for domain in domains:
            stats = convert_domain(in_dir / f"{domain}.jsonl", tmp_dir / f"{domain}.parquet", domain, layout)
            stats["compression_ratio"] = _ratio(stats["jsonl_bytes"], stats["parquet_bytes"])
            per_domain[domain] = stats
            log.info("parquet %s: %d rows, %d -> %d bytes", domain, stats["rows"], stats["jsonl_bytes"],
                     stats["parquet_bytes"])
    keys = ("rows", "chars", "row_groups", "jsonl_bytes", "parquet_bytes")
    total = {k: sum(s[k] for s in per_domain.values()) for k in keys}
    total["compression_ratio"] = _ratio(total["jsonl_bytes"], total["parquet_bytes"])
    wall = time.perf_counter() - t0
    return {
        "domains": per_domain,
        "total": total,
        "wall_s": round(wall, 3),
        "docs_per_s": round(total["rows"] / wall, 1) if wall > 0 else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


def main() -> None:
    """DVC entry point: params ``domains`` + ``parquet`` -> data/parquet/, metrics/parquet.json."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = section("parquet")
    layout = ParquetLayout.from_params(p["text_codec"], p["default_codec"], p["batch_rows"])
    metrics = run(IN_DIR, OUT_DIR, param_domains(), layout)
    write_metrics("parquet", metrics)


if __name__ == "__main__":
    main()
