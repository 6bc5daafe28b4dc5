"""Tests for the split stage: stratified train/val/test splits per domain, with label overrides
(domainlm.documents.splitting, domainlm.documents.labels, stages/split.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from domainlm.common.paths import SPLITS
from domainlm.documents.labels import (
    LABELS_SCHEMA,
    OVERRIDES_SCHEMA,
    apply_overrides,
    read_label_table,
    read_overrides,
    write_empty_overrides,
)
from domainlm.documents.schema import (
    DOC_SCHEMA,
    SCHEMA_FILE,
    ParquetLayout,
    SchemaMismatchError,
    read_docs,
    read_layout,
    schema_text,
    write_docs,
)
from domainlm.documents.splitting import (
    DomainTooSmallError,
    hash_split_codes,
    read_release_splits,
    split_domain,
    split_indices,
    split_sizes,
    sticky_split_indices,
)
from stages.split import run

REPO = Path(__file__).resolve().parents[1]
LAYOUT = ParquetLayout.from_params("brotli", "zstd", 16)


def doc_table(domain: str, labels: list[str | None]) -> pa.Table:
    """A DOC_SCHEMA table with one document per label (Korean text, unique ids)."""
    texts = [f"{domain} 문서 {i}번: 한국어 본문입니다." for i in range(len(labels))]
    return pa.Table.from_pylist(
        [
            {"id": f"{domain}-{i:05d}", "text": t, "domain": domain, "label": lab, "n_chars": len(t), "source": "test"}
            for i, (t, lab) in enumerate(zip(texts, labels))
        ],
        schema=DOC_SCHEMA,
    )


def make_parquet_dir(root: Path, tables: dict[str, pa.Table]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / SCHEMA_FILE).write_text(schema_text(), encoding="utf-8")
    for domain, table in tables.items():
        write_docs(root / f"{domain}.parquet", table, LAYOUT)
    return root


def split_ids(out: Path, domain: str) -> dict[str, list[str]]:
    return {s: read_docs(out / domain / f"{s}.parquet")["id"].to_pylist() for s in SPLITS}


OFFICE_LABELS = ["shared"] * 160 + ["calc"] * 80 + ["writer"] * 60 + ["chart"] * 20 + [None] * 20


@pytest.fixture
def parquet_dir(tmp_path) -> Path:
    return make_parquet_dir(
        tmp_path / "parquet",
        {
            "law": doc_table("law", ["law"] * 40),
            "office_help": doc_table("office_help", OFFICE_LABELS),
        },
    )


def run_default(parquet_dir: Path, out: Path, seed: int = 42, **kw) -> dict:
    return run(
        parquet_dir,
        out,
        ["law", "office_help"],
        seed=seed,
        val_size=0.1,
        test_size=0.1,
        overrides_path=kw.pop("overrides_path", None),
        **kw,
    )


def test_splits_are_disjoint_cover_every_document_and_keep_the_schema(parquet_dir, tmp_path):
    metrics = run_default(parquet_dir, tmp_path / "split")
    for domain, n in (("law", 40), ("office_help", 340)):
        ids = split_ids(tmp_path / "split", domain)
        sets = {s: set(v) for s, v in ids.items()}
        assert sets["train"].isdisjoint(sets["val"]) and sets["train"].isdisjoint(sets["test"])
        assert sets["val"].isdisjoint(sets["test"])
        assert sum(len(v) for v in ids.values()) == n
        assert set().union(*sets.values()) == set(read_docs(parquet_dir / f"{domain}.parquet")["id"].to_pylist())
        for s in SPLITS:
            path = tmp_path / "split" / domain / f"{s}.parquet"
            assert pq.read_schema(path).equals(DOC_SCHEMA)
            assert read_layout(path).codecs["text"] == "BROTLI" and read_layout(path).codecs["id"] == "ZSTD"
            assert metrics["domains"][domain][s]["docs"] == len(ids[s])
    assert [metrics["domains"]["office_help"][s]["docs"] for s in SPLITS] == [272, 34, 34]
    assert [metrics["domains"]["law"][s]["docs"] for s in SPLITS] == [32, 4, 4]
    assert metrics["total"] == {"train": 304, "val": 38, "test": 38}


def test_same_seed_same_split_other_seed_other_split(parquet_dir, tmp_path):
    run_default(parquet_dir, tmp_path / "a", seed=7)
    run_default(parquet_dir, tmp_path / "b", seed=7)
    run_default(parquet_dir, tmp_path / "c", seed=8)
    for domain in ("law", "office_help"):
        a, b, c = (split_ids(tmp_path / x, domain) for x in "abc")
        assert a == b
        assert a["test"] != c["test"]
    for s in SPLITS:  # byte-identical files for the same seed
        assert (tmp_path / "a" / "law" / f"{s}.parquet").read_bytes() == (
            tmp_path / "b" / "law" / f"{s}.parquet"
        ).read_bytes()


def test_stratification_keeps_label_proportions(parquet_dir, tmp_path):
    metrics = run_default(parquet_dir, tmp_path / "split")
    overall = Counter("_null" if x is None else x for x in OFFICE_LABELS)
    n = len(OFFICE_LABELS)
    for s in SPLITS:
        part = read_docs(tmp_path / "split" / "office_help" / f"{s}.parquet")
        counts = Counter("_null" if x is None else x for x in part["label"].to_pylist())
        assert set(counts) == set(overall)  # every label, null included, is in every split
        for label, total in overall.items():
            expected = total / n * part.num_rows
            assert abs(counts[label] - expected) <= 1, (s, label, counts[label], expected)
        assert metrics["domains"]["office_help"][s]["labels"] == dict(sorted(counts.items()))
        shares = metrics["domains"]["office_help"][s]["label_share"]
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert metrics["domains"]["office_help"]["stratified"] == {"test": 1, "val": 1}


def test_unstratified_shuffle_would_be_detectably_worse_than_stratified():
    """Guards the stratification test: a seeded plain shuffle misses the ±1 bound for some seed."""
    labels = pa.array(OFFICE_LABELS)
    off = 0
    for seed in range(20):
        res = split_indices(labels, "office_help", seed=seed, val_size=0.1, test_size=0.1)
        for s in ("val", "test"):
            counts = Counter(OFFICE_LABELS[i] for i in res.indices[s])
            for label, total in Counter(OFFICE_LABELS).items():
                off = max(off, abs(counts[label] - total / len(OFFICE_LABELS) * len(res.indices[s])))
    assert off <= 1  # stratified over 20 seeds
    rng = np.random.default_rng(0)
    worst = 0
    for _ in range(20):
        idx = rng.permutation(len(OFFICE_LABELS))[:34]
        counts = Counter(OFFICE_LABELS[i] for i in idx)
        worst = max(worst, max(abs(counts[lab] - t / 340 * 34) for lab, t in Counter(OFFICE_LABELS).items()))
    assert worst > 1


def test_rare_labels_go_to_train_without_crashing():
    labels = ["calc"] * 30 + ["writer"] * 30 + ["draw", "math"]  # draw and math: one document each
    res = split_indices(pa.array(labels), "office_help", seed=1, val_size=0.1, test_size=0.1)
    train = {labels[i] for i in res.indices["train"]}
    held = [labels[i] for s in ("val", "test") for i in res.indices[s]]
    assert {"draw", "math"} <= train and "draw" not in held and "math" not in held
    assert res.rare_to_train == 2
    assert res.stratified == {"test": True, "val": True}
    assert [len(res.indices[s]) for s in SPLITS] == [48, 7, 7]  # 62 docs: ceil(6.2) held out twice


def test_more_labels_than_held_out_docs_falls_back_to_unstratified_split():
    labels = [lab for lab in ["a", "b", "c", "d", "e"] for _ in range(2)]  # 10 docs, 5 labels, 1 test doc
    res = split_indices(pa.array(labels), "office_help", seed=3, val_size=0.1, test_size=0.1)
    assert res.stratified == {"test": False, "val": False}
    assert [len(res.indices[s]) for s in SPLITS] == [8, 1, 1]
    assert sorted(i for s in SPLITS for i in res.indices[s]) == list(range(10))


def test_all_null_labels_split_fine():
    res = split_indices(pa.array([None] * 20, pa.string()), "faq", seed=0, val_size=0.1, test_size=0.2)
    assert [len(res.indices[s]) for s in SPLITS] == [14, 2, 4]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_small_domain_error_names_the_domain(n):
    with pytest.raises(DomainTooSmallError, match=rf"domain 'bill' has {n} document"):
        split_indices(pa.array(["bill"] * n, pa.string()), "bill", seed=0, val_size=0.1, test_size=0.1)


@pytest.mark.parametrize(
    "n,val,test,expected",
    [
        (30, 0.1, 0.1, (24, 3, 3)),
        (31, 0.1, 0.1, (23, 4, 4)),
        (137, 0.1, 0.1, (109, 14, 14)),
        (100, 0.07, 0.14, (79, 7, 14)),
    ],
)
def test_split_sizes_round_held_out_counts_up_exactly(n, val, test, expected):
    assert split_sizes(n, val, test, "law") == expected  # 0.07 * 100 is 7.000000000000001 in floats


def test_three_docs_is_just_enough():
    res = split_indices(pa.array(["bill"] * 3), "bill", seed=0, val_size=0.1, test_size=0.1)
    assert [len(res.indices[s]) for s in SPLITS] == [1, 1, 1]


def test_too_small_domain_in_run_names_it_and_writes_nothing(tmp_path):
    pdir = make_parquet_dir(
        tmp_path / "parquet", {"law": doc_table("law", ["law"] * 10), "bill": doc_table("bill", ["bill"] * 2)}
    )
    with pytest.raises(DomainTooSmallError, match="'bill'"):
        run(pdir, tmp_path / "split", ["law", "bill"], seed=0, val_size=0.1, test_size=0.1, overrides_path=None)
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize("val,test,match", [(0, 0.1, "val_size"), (0.1, 1.0, "test_size"), (0.5, 0.5, "< 1")])
def test_bad_fractions_are_rejected(val, test, match):
    with pytest.raises(ValueError, match=match):
        split_sizes(100, val, test, "law")


def test_listed_domain_without_parquet_is_an_error_naming_it(parquet_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="'faq'"):
        run(parquet_dir, tmp_path / "split", ["law", "faq"], seed=0, val_size=0.1, test_size=0.1, overrides_path=None)


def test_stale_schema_file_is_rejected(parquet_dir, tmp_path):
    (parquet_dir / SCHEMA_FILE).write_text("id: string\n", encoding="utf-8")
    with pytest.raises(SchemaMismatchError, match="schema.txt"):
        run_default(parquet_dir, tmp_path / "split")


def test_input_with_another_schema_is_rejected_naming_file(parquet_dir, tmp_path):
    table = doc_table("law", ["law"] * 5).drop_columns(["n_chars"])
    pq.write_table(table, parquet_dir / "law.parquet")
    with pytest.raises(SchemaMismatchError, match=r"law.parquet: field 'n_chars' is missing"):
        run_default(parquet_dir, tmp_path / "split")


def test_duplicate_id_in_a_domain_is_an_error():
    table = doc_table("law", ["law"] * 6)
    table = pa.concat_tables([table, table.slice(0, 1)])
    with pytest.raises(ValueError, match=r"domain 'law': id 'law-00000' occurs more than once"):
        split_domain(table, "law", seed=0, val_size=0.1, test_size=0.1)


# --- label overrides ------------------------------------------------------------------------


def overrides_table(pairs: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"id": [p[0] for p in pairs], "label": [p[1] for p in pairs]}, schema=OVERRIDES_SCHEMA)


def test_apply_overrides_replaces_labels_and_counts_unknown_ids():
    table = doc_table("office_help", ["calc", "writer", None, "draw"])
    ov = overrides_table(
        [("office_help-00001", "calc"), ("office_help-00002", "math"), ("nobody", "calc"), ("also-nobody", "draw")]
    )
    out, applied, unknown = apply_overrides(table, ov)
    assert out["label"].to_pylist() == ["calc", "calc", "math", "draw"]
    assert (applied, unknown) == (2, 2)
    assert out.schema.equals(DOC_SCHEMA)
    assert out["id"].to_pylist() == table["id"].to_pylist() and out["text"].equals(table["text"])


def test_apply_overrides_with_empty_overrides_changes_nothing():
    table = doc_table("law", ["law", None])
    out, applied, unknown = apply_overrides(table, overrides_table([]))
    assert out.equals(table) and (applied, unknown) == (0, 0)


def test_run_applies_overrides_after_splitting_so_no_document_changes_split(parquet_dir, tmp_path):
    # Relabel 30 'shared' documents as 'math': labels change, split membership does not.
    pairs = [(f"office_help-{i:05d}", "math") for i in range(30)] + [
        ("law-00003", "law-special"),
        ("ghost-1", "x"),
        ("ghost-2", "y"),
    ]
    ov_path = tmp_path / "labels" / "overrides.parquet"
    ov_path.parent.mkdir()
    pq.write_table(overrides_table(pairs), ov_path)
    metrics = run_default(
        parquet_dir,
        tmp_path / "split",
        overrides_path=ov_path,
        labels_path=tmp_path / "labels" / "split_labels.parquet",
    )
    assert metrics["overrides"] == {"rows": 33, "applied": 31, "unknown_ids": 2}
    assert metrics["domains"]["office_help"]["overrides_applied"] == 30
    run_default(parquet_dir, tmp_path / "plain", overrides_path=None, labels_path=tmp_path / "plain_labels.parquet")
    for domain in ("law", "office_help"):
        for s in SPLITS:
            # The document files do not see overrides: byte for byte what a run without them writes,
            # so the LM stages that read them stay up to date across refinement rounds.
            assert (tmp_path / "split" / domain / f"{s}.parquet").read_bytes() == (
                tmp_path / "plain" / domain / f"{s}.parquet"
            ).read_bytes()
    table = read_label_table(tmp_path / "labels" / "split_labels.parquet")
    plain = read_label_table(tmp_path / "plain_labels.parquet")
    assert table.schema == LABELS_SCHEMA
    assert table.select(["id", "domain", "split", "source_label"]).equals(
        plain.select(["id", "domain", "split", "source_label"])
    )
    labels = dict(zip(table["id"].to_pylist(), table["label"].to_pylist()))
    source = dict(zip(table["id"].to_pylist(), table["source_label"].to_pylist()))
    assert plain["label"].to_pylist() == plain["source_label"].to_pylist()
    for s in SPLITS:
        ids = split_ids(tmp_path / "split", "office_help")[s]
        assert (
            table.filter(pc.and_(pc.equal(table["split"], s), pc.equal(table["domain"], "office_help")))[
                "id"
            ].to_pylist()
            == ids
        )  # same documents, same order as the document files
        assert metrics["domains"]["office_help"][s]["labels"].get("math", 0) == sum(
            1 for i in ids if i in {p[0] for p in pairs}
        )
    assert all(
        labels[f"office_help-{i:05d}"] == "math" and source[f"office_help-{i:05d}"] == "shared" for i in range(30)
    )
    assert labels["office_help-00030"] == "shared"
    assert labels["law-00003"] == "law-special" and labels["law-00004"] == "law"
    assert source["law-00003"] == "law"


def test_label_table_rejects_duplicates_and_missing_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the split stage"):
        read_label_table(tmp_path / "none.parquet")
    pq.write_table(pa.table({"id": ["a"], "label": ["x"]}), tmp_path / "thin.parquet")
    with pytest.raises(ValueError, match="domain"):
        read_label_table(tmp_path / "thin.parquet")
    pq.write_table(pa.table({c: ["a", "a"] for c in LABELS_SCHEMA.names}), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="id 'a' appears more than once"):
        read_label_table(tmp_path / "dup.parquet")


@pytest.mark.parametrize(
    "table,match",
    [
        (pa.table({"id": ["a", "a"], "label": ["x", "y"]}), "id 'a' has more than one override"),
        (pa.table({"id": ["a", "b"], "label": ["x", None]}), "row 1 has a null 'label'"),
        (pa.table({"id": ["a"]}), "column 'label'"),
        (pa.table({"id": [1], "label": ["x"]}), "column 'id' is int64"),
    ],
)
def test_bad_overrides_file_is_rejected(tmp_path, table, match):
    path = tmp_path / "overrides.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=match) as err:
        read_overrides(path)
    assert "overrides.parquet" in str(err.value)


# --- the stage as DVC runs it ---------------------------------------------------------------


def _jsonl(path: Path, domain: str, labels: list[str | None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = doc_table(domain, labels).drop_columns(["n_chars"]).to_pylist()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _stage_repo(tmp_path: Path) -> Path:
    """A throwaway repository with the real stage and package code, the real parquet/split stage
    definitions from dvc.yaml, and small data/dedup inputs."""
    repo = tmp_path / "repo"
    for code in ("stages", "domainlm"):
        shutil.copytree(REPO / code, repo / code, ignore=shutil.ignore_patterns("__pycache__"))
    _jsonl(repo / "data" / "dedup" / "law.jsonl", "law", ["law"] * 12)
    _jsonl(repo / "data" / "dedup" / "office_help.jsonl", "office_help", ["calc"] * 20 + ["writer"] * 20)
    params = {
        "domains": ["law", "office_help"],
        "parquet": {"batch_rows": 8, "text_codec": "brotli", "default_codec": "zstd"},
        "split": {"seed": 42, "val_size": 0.1, "test_size": 0.1},
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    write_empty_overrides(repo / "data" / "labels" / "overrides.parquet")  # split's dep; starts empty
    (repo / "data" / "release").mkdir(parents=True)  # split's dep: before a release is cut, only the manifest
    (repo / "data" / "release" / "release.json").write_text('{"release": 0}\n', encoding="utf-8")
    return repo


def test_main_modules_write_declared_outs(tmp_path):
    repo = _stage_repo(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    for mod in ("stages.parquet", "stages.split"):
        subprocess.run([sys.executable, "-m", mod], cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    metrics = json.loads((repo / "metrics" / "split.json").read_text(encoding="utf-8"))
    assert metrics["total"] == {"train": 40, "val": 6, "test": 6}  # law 8/2/2, office_help 32/4/4
    assert sorted(p.name for p in (repo / "data" / "split").iterdir()) == ["law", "office_help"]
    assert sorted(p.name for p in (repo / "data" / "split" / "law").iterdir()) == [
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]
    assert read_label_table(repo / "data" / "labels" / "split_labels.parquet").num_rows == 52


@pytest.mark.slow
def test_dvc_repro_runs_parquet_and_split_and_is_then_up_to_date(tmp_path):
    """Real DVC with the stage definitions copied from the project's dvc.yaml."""
    dvc = Path(sys.executable).with_name("dvc")
    repo = _stage_repo(tmp_path)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    pipeline = {"stages": {name: stages[name] for name in ("parquet", "split")}}
    for stage in pipeline["stages"].values():  # run the stage modules with this interpreter
        stage["cmd"] = stage["cmd"].replace("python ", f"{sys.executable} ", 1)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [str(dvc), "init", "-q"], [str(dvc), "repro", "-q", "split"]):
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr + proc.stdout
    assert (repo / "dvc.lock").exists()
    status = subprocess.run(
        [str(dvc), "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    assert read_docs(repo / "data" / "split" / "office_help" / "train.parquet").num_rows == 32


def test_streamed_split_files_equal_write_docs_of_the_taken_rows_byte_for_byte(tmp_path):
    """The split stage streams row groups into the split files (ids and labels decide, texts are never all in
    memory); the files must be those the in-memory ``write_docs(table.take(indices))`` writes."""
    from domainlm.documents.splitting import split_codes, write_split_files

    layout = ParquetLayout.from_params("brotli", "zstd", 7)  # row groups of 7: splits straddle input groups
    table = doc_table("office_help", OFFICE_LABELS)
    src = tmp_path / "office_help.parquet"
    write_docs(src, table, layout)
    ids_labels = read_docs(src, columns=["id", "label"])
    parts, result = split_domain(ids_labels, "office_help", seed=5, val_size=0.1, test_size=0.1)
    assert parts["train"].column_names == ["id", "label"]
    out = {s: tmp_path / "stream" / f"{s}.parquet" for s in SPLITS}
    written = write_split_files(src, out, split_codes(result, table.num_rows), read_layout(src))
    assert written == {s: len(result.indices[s]) for s in SPLITS}
    for s in SPLITS:
        reference = tmp_path / "ref" / f"{s}.parquet"
        write_docs(reference, read_docs(src).take(pa.array(result.indices[s])), read_layout(src))
        assert out[s].read_bytes() == reference.read_bytes(), s
    with pytest.raises(ValueError, match="split codes"):
        write_split_files(
            src,
            {s: tmp_path / "bad" / f"{s}.parquet" for s in SPLITS},
            split_codes(result, table.num_rows)[:-1],
            layout,
        )
    assert not list((tmp_path / "bad").glob("*.parquet"))  # nothing half-written


# --- the sticky split: the LM release pins each document's split ----------------------------


def hash_rule(seed: int, doc_id: str, val_size: float, test_size: float) -> str:
    """The documented hash rule, written out independently of the implementation."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_size else "val" if u < test_size + val_size else "train"


def docs_with_ids(domain: str, ids: list[str], labels: list[str | None]) -> pa.Table:
    """A DOC_SCHEMA table like :func:`doc_table`, with the given ids."""
    table = doc_table(domain, labels)
    return table.set_column(table.schema.get_field_index("id"), DOC_SCHEMA.field("id"), pa.array(ids, pa.string()))


def new_docs(domain: str, tag: str, n: int, labels: tuple[str, ...] = ("calc", "writer")) -> pa.Table:
    return docs_with_ids(
        domain, [f"{domain}-{tag}-{i:05d}" for i in range(n)], [labels[i % len(labels)] for i in range(n)]
    )


def interleave(old: pa.Table, new: pa.Table, every: int = 5) -> pa.Table:
    """``old`` in its order with the rows of ``new`` slotted in after every ``every`` old rows."""
    parts, j = [], 0
    for i in range(0, old.num_rows, every):
        parts.append(old.slice(i, every))
        if j < new.num_rows:
            parts.append(new.slice(j, 1))
            j += 1
    parts.append(new.slice(j))
    return pa.concat_tables(parts)


def label_splits(path: Path) -> dict[str, str]:
    table = read_label_table(path)
    return dict(zip(table["id"].to_pylist(), table["split"].to_pylist()))


@pytest.fixture
def released(parquet_dir, tmp_path) -> Path:
    """A first run on ``parquet_dir``, and a release cut from its label table (a byte copy)."""
    run_default(parquet_dir, tmp_path / "day0", labels_path=tmp_path / "day0_labels.parquet")
    release = tmp_path / "release" / "split_labels.parquet"
    release.parent.mkdir()
    shutil.copyfile(tmp_path / "day0_labels.parquet", release)
    return release


def test_released_documents_keep_their_split_and_file_order_when_new_documents_arrive(parquet_dir, released, tmp_path):
    old_office = read_docs(parquet_dir / "office_help.parquet")
    pdir = make_parquet_dir(
        tmp_path / "day1_parquet",
        {
            "law": read_docs(parquet_dir / "law.parquet"),
            "office_help": interleave(old_office, new_docs("office_help", "new", 60)),
        },
    )
    metrics = run_default(
        pdir, tmp_path / "day1", labels_path=tmp_path / "day1_labels.parquet", release_labels_path=released
    )
    before, after = label_splits(released), label_splits(tmp_path / "day1_labels.parquet")
    assert all(after[i] == s for i, s in before.items())  # no released document changes split
    for s in SPLITS:
        old = read_docs(tmp_path / "day0" / "office_help" / f"{s}.parquet")
        new = read_docs(tmp_path / "day1" / "office_help" / f"{s}.parquet")
        assert new.filter(pc.is_in(new["id"], value_set=old["id"])).equals(old)  # a subset, same order
        # law got no new documents: its files are byte for byte the released ones
        assert (tmp_path / "day1" / "law" / f"{s}.parquet").read_bytes() == (
            tmp_path / "day0" / "law" / f"{s}.parquet"
        ).read_bytes()
    office = metrics["domains"]["office_help"]
    assert (office["sticky"], office["release_docs"], office["new_docs"], office["dropped_release_docs"]) == (
        1,
        340,
        60,
        0,
    )
    assert office["stratified"] == {"test": 0, "val": 0} and office["rare_to_train"] == 0
    assert metrics["domains"]["law"]["sticky"] == 1 and metrics["domains"]["law"]["new_docs"] == 0
    assert metrics["release"] == {"docs": 380, "new": 60, "dropped": 0}
    assert sum(office[s]["docs"] for s in SPLITS) == 400


def test_new_documents_follow_the_hash_rule_whatever_else_arrives(parquet_dir, released, tmp_path):
    old_office = read_docs(parquet_dir / "office_help.parquet")
    shared = new_docs("office_help", "shared", 80)
    arrivals = {
        "a": pa.concat_tables([new_docs("office_help", "only-a", 50), shared]),
        "b": pa.concat_tables([shared.slice(40), new_docs("office_help", "only-b", 300), shared.slice(0, 40)]),
    }
    got = {}
    for tag, extra in arrivals.items():
        pdir = make_parquet_dir(
            tmp_path / f"parquet_{tag}",
            {"law": read_docs(parquet_dir / "law.parquet"), "office_help": interleave(old_office, extra, 3)},
        )
        run_default(
            pdir, tmp_path / f"out_{tag}", labels_path=tmp_path / f"labels_{tag}.parquet", release_labels_path=released
        )
        got[tag] = label_splits(tmp_path / f"labels_{tag}.parquet")
        for i in extra["id"].to_pylist():
            assert got[tag][i] == hash_rule(42, i, 0.1, 0.1), i
    assert all(got["a"][i] == got["b"][i] for i in shared["id"].to_pylist())
    assert len({got["a"][i] for i in shared["id"].to_pylist()}) > 1  # not everything in one split


def test_hash_rule_shares_match_the_fractions_over_many_new_ids():
    n = 20_000
    ids = pa.array([f"faq-{i:07d}" for i in range(n)])
    labels = ["a", "b"] * (n // 2)
    release = pa.table({"id": ["faq-old"], "domain": ["faq"], "split": ["test"]})  # covers faq; no longer present
    res = sticky_split_indices(ids, release, "faq", seed=3, val_size=0.15, test_size=0.05)
    shares = {s: len(res.indices[s]) / n for s in SPLITS}
    assert shares["val"] == pytest.approx(0.15, abs=0.01) and shares["test"] == pytest.approx(0.05, abs=0.01)
    assert shares["train"] == pytest.approx(0.80, abs=0.01)
    for s in SPLITS:  # stratified in expectation: each label's share of a split is about its overall share
        part = Counter(labels[i] for i in res.indices[s])
        assert part["a"] / len(res.indices[s]) == pytest.approx(0.5, abs=0.03)
    assert (res.sticky, res.release_docs, res.new_docs, res.dropped_release_docs) == (True, 0, n, 1)
    codes = hash_split_codes(ids, seed=3, val_size=0.15, test_size=0.05)
    assert [SPLITS[c] for c in codes[:200]] == [hash_rule(3, f"faq-{i:07d}", 0.15, 0.05) for i in range(200)]
    assert sorted(np.concatenate([res.indices[s] for s in SPLITS]).tolist()) == list(range(n))


def test_domain_absent_from_the_release_gets_the_stratified_split(parquet_dir, tmp_path):
    run_default(parquet_dir, tmp_path / "plain", labels_path=tmp_path / "plain_labels.parquet")
    labels = read_label_table(tmp_path / "plain_labels.parquet")
    release = tmp_path / "release" / "split_labels.parquet"
    release.parent.mkdir()
    pq.write_table(labels.filter(pc.equal(labels["domain"], "law")), release)  # the release covers law only
    metrics = run_default(
        parquet_dir, tmp_path / "sticky", labels_path=tmp_path / "sticky_labels.parquet", release_labels_path=release
    )
    for s in SPLITS:
        assert (tmp_path / "sticky" / "office_help" / f"{s}.parquet").read_bytes() == (
            tmp_path / "plain" / "office_help" / f"{s}.parquet"
        ).read_bytes()
    office = metrics["domains"]["office_help"]
    assert (office["sticky"], office["release_docs"], office["new_docs"], office["dropped_release_docs"]) == (
        0,
        0,
        0,
        0,
    )
    assert office["stratified"] == {"test": 1, "val": 1}
    assert metrics["domains"]["law"]["sticky"] == 1 and metrics["release"] == {"docs": 40, "new": 0, "dropped": 0}
    # no release file (before a release is cut): byte for byte today's stratified split everywhere
    metrics = run_default(parquet_dir, tmp_path / "none", release_labels_path=tmp_path / "release" / "missing.parquet")
    assert metrics["release"] == {"docs": 0, "new": 0, "dropped": 0}
    for domain in ("law", "office_help"):
        assert metrics["domains"][domain]["sticky"] == 0
        for s in SPLITS:
            assert (tmp_path / "none" / domain / f"{s}.parquet").read_bytes() == (
                tmp_path / "plain" / domain / f"{s}.parquet"
            ).read_bytes()


def test_dropped_and_moved_release_documents_are_counted(parquet_dir, released, tmp_path):
    law = read_docs(parquet_dir / "law.parquet")
    office = read_docs(parquet_dir / "office_help.parquet")
    moved = docs_with_ids("office_help", ["law-00000"], ["calc"])  # the release records it under law
    pdir = make_parquet_dir(
        tmp_path / "day1_parquet",
        {
            "law": law.slice(5),
            "office_help": pa.concat_tables([office.slice(0, 300), moved, new_docs("office_help", "n", 7)]),
        },
    )
    metrics = run_default(
        pdir, tmp_path / "day1", labels_path=tmp_path / "day1_labels.parquet", release_labels_path=released
    )
    law_m, office_m = metrics["domains"]["law"], metrics["domains"]["office_help"]
    assert (law_m["release_docs"], law_m["new_docs"], law_m["dropped_release_docs"]) == (35, 0, 5)
    assert (office_m["release_docs"], office_m["new_docs"], office_m["dropped_release_docs"]) == (300, 8, 40)
    assert office_m["other_domain_docs"] == 1 and law_m["other_domain_docs"] == 0
    assert metrics["release"] == {"docs": 335, "new": 8, "dropped": 45}
    assert label_splits(tmp_path / "day1_labels.parquet")["law-00000"] == hash_rule(42, "law-00000", 0.1, 0.1)


def test_sticky_domain_with_an_empty_split_warns_instead_of_raising(parquet_dir, released, tmp_path, caplog):
    # Every released law document is gone; two new ones cannot fill three splits.
    pdir = make_parquet_dir(
        tmp_path / "day1_parquet",
        {"law": new_docs("law", "n", 2, ("law",)), "office_help": read_docs(parquet_dir / "office_help.parquet")},
    )
    with caplog.at_level("WARNING"):
        metrics = run_default(pdir, tmp_path / "day1", release_labels_path=released)
    law = metrics["domains"]["law"]
    assert (law["docs"], law["release_docs"], law["new_docs"], law["dropped_release_docs"]) == (2, 0, 2, 40)
    assert sum(law[s]["docs"] for s in SPLITS) == 2 and min(law[s]["docs"] for s in SPLITS) == 0
    assert "sticky split has empty" in caplog.text and "law" in caplog.text
    for s in SPLITS:
        assert read_docs(tmp_path / "day1" / "law" / f"{s}.parquet").num_rows == law[s]["docs"]


@pytest.mark.parametrize(
    "table,match",
    [
        (pa.table({"id": ["a"], "domain": ["law"]}), "column 'split'"),
        (pa.table({"id": ["a"], "domain": ["law"], "split": ["dev"]}), "split 'dev'"),
        (pa.table({"id": ["a", "a"], "domain": ["law", "law"], "split": ["train", "test"]}), "id 'a' appears"),
        (pa.table({"id": ["a"], "domain": pa.array([None], pa.string()), "split": ["val"]}), "null 'domain'"),
    ],
)
def test_bad_release_label_table_is_rejected(tmp_path, table, match):
    path = tmp_path / "split_labels.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=match) as err:
        read_release_splits(path)
    assert "split_labels.parquet" in str(err.value)
    assert read_release_splits(tmp_path / "missing.parquet") is None and read_release_splits(None) is None
