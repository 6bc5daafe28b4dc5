"""Tests for the parquet stage: JSONL -> Parquet with the document schema and per-column codecs
(domainlm.documents.conversion, domainlm.documents.schema, stages/parquet.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domainlm.documents.conversion import convert_domain
from domainlm.documents.schema import (
    DOC_SCHEMA,
    SCHEMA_FILE,
    BadDocumentError,
    ParquetLayout,
    SchemaMismatchError,
    iter_doc_batches,
    read_docs,
    read_layout,
    schema_text,
    write_docs,
)
from stages.parquet import run

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "대한민국은 민주공화국이다.",
    "모든 국민은 법 앞에 평등하다. 누구든지 성별·종교 또는 사회적 신분에 의하여 차별을 받지 아니한다.",
    "셀 서식 대화 상자를 엽니다. Format - Cells 😀",
    "日本語のテキストと English words, café.",
    "مرحبا بالعالم",
    "한",
]


def make_records(domain: str, n: int, *, label=None, start: int = 0) -> list[dict]:
    """``n`` contract-conforming records; ``label`` None -> the domain name, a callable -> label(i)."""
    out = []
    for i in range(start, start + n):
        lab = domain if label is None else label(i)
        out.append(
            {
                "id": f"{domain}-{i:04d}",
                "text": f"{TEXTS[i % len(TEXTS)]} #{i}",
                "domain": domain,
                "label": lab,
                "source": f"test:{domain}",
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


LAYOUT_ARGS = {"text_codec": "brotli", "default_codec": "zstd", "batch_rows": 4}  # the stage run's arguments
LAYOUT = ParquetLayout.from_params(**LAYOUT_ARGS)


def test_round_trip_keeps_schema_values_dictionary_domain_and_null_labels(tmp_path):
    records = make_records("office_help", 9, label=lambda i: None if i % 3 == 0 else ["calc", "writer"][i % 2])
    records[1]["extra_field"] = {"ignored": True}  # fields outside the contract are dropped
    src = write_jsonl(tmp_path / "office_help.jsonl", records)
    stats = convert_domain(src, tmp_path / "office_help.parquet", "office_help", LAYOUT)

    table = read_docs(tmp_path / "office_help.parquet")
    assert table.schema.equals(DOC_SCHEMA)
    assert table.schema.field("domain").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("label").nullable and not table.schema.field("id").nullable
    assert table.column("domain").chunk(0).dictionary.to_pylist() == ["office_help"]
    got = table.to_pylist()
    assert [r["id"] for r in got] == [r["id"] for r in records]
    assert [r["text"] for r in got] == [r["text"] for r in records]
    assert [r["label"] for r in got] == [r["label"] for r in records]
    assert sum(r["label"] is None for r in got) == 3
    assert {r["domain"] for r in got} == {"office_help"}
    # n_chars counts code points: Hangul syllables, emoji and Arabic are one each
    assert [r["n_chars"] for r in got] == [len(r["text"]) for r in records]
    assert stats["rows"] == 9 and stats["chars"] == sum(len(r["text"]) for r in records)


def test_n_chars_counts_code_points_not_bytes(tmp_path):
    src = write_jsonl(
        tmp_path / "law.jsonl",
        [
            {"id": "a", "text": "한국어", "domain": "law", "label": "law", "source": "s"},
            {"id": "b", "text": "😀x", "domain": "law", "label": "law", "source": "s"},
        ],
    )
    convert_domain(src, tmp_path / "law.parquet", "law", LAYOUT)
    assert read_docs(tmp_path / "law.parquet")["n_chars"].to_pylist() == [3, 2]


@pytest.mark.parametrize("text_codec,default_codec", [("brotli", "zstd"), ("gzip", "snappy")])
def test_per_column_codecs_are_set_in_every_column_chunk(tmp_path, text_codec, default_codec):
    src = write_jsonl(tmp_path / "law.jsonl", make_records("law", 10))
    layout = ParquetLayout.from_params(text_codec, default_codec, 4)
    convert_domain(src, tmp_path / "law.parquet", "law", layout)
    md = pq.ParquetFile(tmp_path / "law.parquet").metadata
    assert md.num_row_groups == 3  # 4 + 4 + 2 rows
    seen = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            seen.setdefault(rg.column(c).path_in_schema, set()).add(rg.column(c).compression)
    assert seen.pop("text") == {text_codec.upper()}
    assert set(seen) == {"id", "domain", "label", "n_chars", "source"}
    assert all(v == {default_codec.upper()} for v in seen.values()), seen


def test_row_groups_have_batch_rows_rows(tmp_path):
    src = write_jsonl(tmp_path / "faq.jsonl", make_records("faq", 11))
    convert_domain(src, tmp_path / "faq.parquet", "faq", ParquetLayout.from_params("brotli", "zstd", 3))
    md = pq.ParquetFile(tmp_path / "faq.parquet").metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [3, 3, 3, 2]
    assert read_layout(tmp_path / "faq.parquet").row_group_rows == 3
    batches = list(iter_doc_batches(tmp_path / "faq.parquet", batch_rows=2, columns=["id", "text"]))
    assert max(b.num_rows for b in batches) == 2 and sum(b.num_rows for b in batches) == 11
    assert batches[0].schema.names == ["id", "text"]


def test_record_longer_than_default_json_block_is_read(tmp_path):
    # Arrow's JSON reader fails on a record larger than its block ("straddling object");
    # the block size follows the longest line.
    big = "가나다라마바사" * 200_000  # 1.4M chars, ~4.2 MB of UTF-8
    records = make_records("bill", 2) + [
        {"id": "bill-big", "text": big, "domain": "bill", "label": "bill", "source": "s"}
    ]
    src = write_jsonl(tmp_path / "bill.jsonl", records)
    convert_domain(src, tmp_path / "bill.parquet", "bill", LAYOUT)
    table = read_docs(tmp_path / "bill.parquet")
    assert table["n_chars"].to_pylist()[-1] == len(big)
    assert table["text"][2].as_py() == big


def _write_with_schema(path: Path, schema: pa.Schema, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


ROW = {"id": "x", "text": "본문", "domain": "law", "label": None, "n_chars": 2, "source": "s"}


@pytest.mark.parametrize(
    "change,field_name",
    [
        (lambda s: s.set(s.get_field_index("label"), pa.field("label", pa.int64())), "label"),
        (lambda s: s.set(s.get_field_index("domain"), pa.field("domain", pa.string(), nullable=False)), "domain"),
        (lambda s: s.remove(s.get_field_index("n_chars")), "n_chars"),
        (lambda s: s.append(pa.field("extra", pa.string())), "extra"),
        (lambda s: s.set(s.get_field_index("id"), pa.field("id", pa.string(), nullable=True)), "id"),
    ],
)
def test_schema_mismatch_on_read_names_file_and_field(tmp_path, change, field_name):
    schema = change(DOC_SCHEMA)
    row = {k: v for k, v in ROW.items() if k in schema.names}
    if "label" in row and schema.field("label").type == pa.int64():
        row["label"] = 7
    if "extra" in schema.names:
        row["extra"] = "e"
    path = _write_with_schema(tmp_path / "bad.parquet", schema, [row])
    with pytest.raises(SchemaMismatchError) as err:
        read_docs(path)
    assert "bad.parquet" in str(err.value) and repr(field_name) in str(err.value)
    with pytest.raises(SchemaMismatchError, match="bad.parquet"):
        next(iter_doc_batches(path))


def test_schema_with_a_repeated_field_is_rejected(tmp_path):
    schema = DOC_SCHEMA.append(pa.field("source", pa.string(), nullable=False))
    arrays = [
        pa.array(["law"]).dictionary_encode() if f.name == "domain" else pa.array([ROW[f.name]], f.type) for f in schema
    ]
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), tmp_path / "bad.parquet")
    with pytest.raises(SchemaMismatchError, match=r"bad.parquet: field 'source' appears more than once"):
        read_docs(tmp_path / "bad.parquet")


def test_schema_with_fields_in_another_order_is_rejected(tmp_path):
    names = DOC_SCHEMA.names
    reordered = pa.schema([DOC_SCHEMA.field(n) for n in [names[1], names[0], *names[2:]]])
    path = _write_with_schema(tmp_path / "order.parquet", reordered, [ROW])
    with pytest.raises(SchemaMismatchError, match=r"order.parquet: field 'text' is at position 0"):
        read_docs(path)


def test_read_docs_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_docs(tmp_path / "nope.parquet")


@pytest.mark.parametrize(
    "mutate,expect",
    [
        (lambda r: r.pop("text"), r"record 1 \(id='law-0001'\) has no 'text'"),
        (lambda r: r.update(source=None), r"record 1 \(id='law-0001'\) has no 'source'"),
        (lambda r: r.update(domain="bill"), r"record 1 \(id='law-0001'\) has domain 'bill'.*domain 'law'"),
        (lambda r: r.update(id="law-0000"), r"record 1 repeats id 'law-0000'"),
        (lambda r: r.update(text="\u1112\u1161\u11ab"), r"record 1 \(id='law-0001'\) has text not in Unicode NFC"),
    ],
)
def test_bad_records_raise_naming_file_record_and_field(tmp_path, mutate, expect):
    records = make_records("law", 3)
    mutate(records[1])
    src = write_jsonl(tmp_path / "law.jsonl", records)
    with pytest.raises(BadDocumentError, match=expect) as err:
        convert_domain(src, tmp_path / "law.parquet", "law", LAYOUT)
    assert "law.jsonl" in str(err.value)
    assert not (tmp_path / "law.parquet").exists()  # atomic: nothing half-written left behind
    assert [p.name for p in tmp_path.iterdir()] == ["law.jsonl"]


@pytest.mark.parametrize(
    "line", ['{"id": "a", "text": "t", "domain": "law", "label": 3, "source": "s"}', '{"id": "a", "text": "t", broken']
)
def test_unparseable_jsonl_names_the_file(tmp_path, line):
    src = tmp_path / "law.jsonl"
    src.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="law.jsonl"):
        convert_domain(src, tmp_path / "law.parquet", "law", LAYOUT)


def test_layout_rejects_unknown_codec_and_bad_batch_rows():
    with pytest.raises(ValueError, match="text_codec"):
        ParquetLayout.from_params("nosuchcodec", "zstd", 10)
    with pytest.raises(ValueError, match="batch_rows"):
        ParquetLayout.from_params("brotli", "zstd", 0)


def test_stage_run_checks_its_layout_arguments_before_writing(tmp_path):
    write_jsonl(tmp_path / "in" / "law.jsonl", make_records("law", 3))
    with pytest.raises(ValueError, match="text_codec"):
        run(tmp_path / "in", tmp_path / "out", ["law"], **{**LAYOUT_ARGS, "text_codec": "nosuchcodec"})
    with pytest.raises(ValueError, match="batch_rows"):
        run(tmp_path / "in", tmp_path / "out", ["law"], **{**LAYOUT_ARGS, "batch_rows": 0})
    assert not (tmp_path / "out").exists()


def test_write_docs_rejects_a_table_of_another_schema(tmp_path):
    table = pa.table({"id": ["a"], "text": ["t"]})
    with pytest.raises(SchemaMismatchError, match="'domain' is missing"):
        write_docs(tmp_path / "x.parquet", table, LAYOUT)
    assert not (tmp_path / "x.parquet").exists()


def test_run_converts_every_domain_and_reports_metrics(tmp_path):
    write_jsonl(tmp_path / "in" / "law.jsonl", make_records("law", 7))
    write_jsonl(tmp_path / "in" / "office_help.jsonl", make_records("office_help", 12, label=lambda i: "calc"))
    (tmp_path / "in" / "removed.jsonl").write_text('{"id": "x", "kind": "near"}\n', encoding="utf-8")  # not a domain
    metrics = run(tmp_path / "in", tmp_path / "out", ["law", "office_help"], **LAYOUT_ARGS)

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["law.parquet", "office_help.parquet", SCHEMA_FILE]
    assert (out / SCHEMA_FILE).read_text(encoding="utf-8") == schema_text()
    assert "domain: dictionary<values=string, indices=int32, ordered=0> not null" in schema_text()
    assert metrics["domains"]["law"]["rows"] == 7 and metrics["domains"]["office_help"]["rows"] == 12
    for d in ("law", "office_help"):
        m = metrics["domains"][d]
        assert m["parquet_bytes"] == (out / f"{d}.parquet").stat().st_size
        assert m["jsonl_bytes"] == (tmp_path / "in" / f"{d}.jsonl").stat().st_size
        assert m["compression_ratio"] == pytest.approx(m["jsonl_bytes"] / m["parquet_bytes"], rel=1e-3)
    assert metrics["total"]["rows"] == 19
    assert metrics["wall_s"] >= 0 and metrics["peak_rss_mb"] > 0


def test_run_failure_leaves_previous_output_untouched(tmp_path):
    write_jsonl(tmp_path / "in" / "law.jsonl", make_records("law", 3))
    run(tmp_path / "in", tmp_path / "out", ["law"], **LAYOUT_ARGS)
    before = (tmp_path / "out" / "law.parquet").read_bytes()
    bad = make_records("faq", 2)
    bad[0]["domain"] = "law"
    write_jsonl(tmp_path / "in" / "faq.jsonl", bad)
    with pytest.raises(BadDocumentError, match="faq.jsonl"):
        run(tmp_path / "in", tmp_path / "out", ["law", "faq"], **LAYOUT_ARGS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["law.parquet", SCHEMA_FILE]
    assert (tmp_path / "out" / "law.parquet").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_listed_domain_without_jsonl_is_an_error_naming_it(tmp_path):
    write_jsonl(tmp_path / "in" / "law.jsonl", make_records("law", 3))
    with pytest.raises(FileNotFoundError, match=r"\['faq'\].*in/<domain>.jsonl"):
        run(tmp_path / "in", tmp_path / "out", ["law", "faq"], **LAYOUT_ARGS)
    with pytest.raises(ValueError, match="domains"):
        run(tmp_path / "in", tmp_path / "out", [], **LAYOUT_ARGS)
    assert not (tmp_path / "out").exists()


def test_main_as_a_module_writes_declared_outs(tmp_path):
    """``python -m stages.parquet`` from a repository root: data/parquet/ and metrics/parquet.json."""
    write_jsonl(tmp_path / "data" / "dedup" / "law.jsonl", make_records("law", 5))
    (tmp_path / "params.yaml").write_text(
        "domains: [law]\nparquet:\n  batch_rows: 2\n  text_codec: brotli\n  default_codec: zstd\n", encoding="utf-8"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "stages.parquet"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120
    )
    assert read_docs(tmp_path / "data" / "parquet" / "law.parquet").num_rows == 5
    assert pq.ParquetFile(tmp_path / "data" / "parquet" / "law.parquet").metadata.num_row_groups == 3
    metrics = json.loads((tmp_path / "metrics" / "parquet.json").read_text(encoding="utf-8"))
    assert metrics["domains"]["law"]["rows"] == 5
    assert metrics["stage"]["wall_s"] >= 0 and metrics["stage"]["peak_rss_mb"] > 0  # added by stage_run
