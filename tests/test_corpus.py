"""corpus: real Korean documents from the packages that ship them, and user JSONL with a field mapping."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import boto3
import pytest

from domainlm.documents import corpus, sources
from domainlm.documents.jsonl import input_root

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "corpus"  # shared with `make repro`; filled on first use


@pytest.fixture(scope="module")
def konlpy_wheel():
    return sources.fetch_wheel(sources.KONLPY_REQUIREMENT, CACHE, "law")


def test_constitution_splits_into_preamble_and_articles(konlpy_wheel):
    with zipfile.ZipFile(konlpy_wheel.root) as zf:
        text = zf.read("konlpy/data/corpus/kolaw/constitution.txt").decode("utf-8")
    docs = sources.split_constitution(text)
    keys = [k for k, _ in docs]
    assert len(docs) == 137 and len(set(keys)) == 137
    assert keys[0] == "preamble" and docs[0][1].startswith("유구한 역사와 전통에")
    assert keys[1] == "art-001" and docs[1][1].startswith("제1조 ① 대한민국은 민주공화국이다.")
    assert sum(k.startswith("art-") for k in keys) == 130
    assert sum(k.startswith("addenda-art-") for k in keys) == 6
    # chapter headings between articles are not part of any article
    assert not any("제2장 국민의 권리와 의무" in body for _, body in docs)
    assert "부칙" not in docs[130][1]


def test_html_to_text_drops_chrome_and_unescapes():
    page = """<html><head><title>T</title><style>p{}</style></head><body>
    <header id="TopLeftHeader"><p>LibreOffice 7.4 Help</p></header>
    <div class="navheader"><table><tr><td>이전</td></tr></table></div>
    <h1>셀 서식</h1><script>var x = "<p>no</p>";</script>
    <p>A &amp; B &lt;표&gt;&nbsp;끝</p><div><div>중첩</div></div>
    <footer><p>This page is: /text/scalc/x.xhp</p></footer></body></html>"""
    assert sources.html_to_text(page) == "셀 서식\nA & B <표> 끝\n중첩"


def test_builtin_sources_give_real_labelled_documents(tmp_path):
    domains = ["law", "bill", "office_help", "faq"]
    specs = {
        "law": {"type": "kolaw"},
        "bill": {"type": "kobill"},
        "office_help": {"type": "libreoffice_help"},
        "faq": {"type": "debian_faq"},
    }
    manifest = corpus.build_corpus(specs, domains, tmp_path, CACHE, max_docs_per_domain=40)
    recs = {
        d: [json.loads(line) for line in (tmp_path / f"{d}.jsonl").read_text(encoding="utf-8").splitlines()]
        for d in domains
    }
    assert [len(recs[d]) for d in domains] == [40, 10, 40, 16]
    assert manifest["domains"]["office_help"]["documents_available"] > 2500
    assert manifest["domains"]["office_help"]["version"].startswith("4:7.")
    assert manifest["domains"]["law"]["version"] == "0.6.0"
    assert json.loads((tmp_path / "MANIFEST.json").read_text())["totals"]["documents"] == 106
    help_labels = {r["label"] for r in recs["office_help"]}
    assert (
        help_labels <= set(sources.HELP_MODULE_LABELS.values()) and len(help_labels) >= 5
    )  # strided slice keeps the mix
    for d in ("law", "bill", "faq"):
        assert {r["label"] for r in recs[d]} == {d}
    for rs in recs.values():
        for r in rs:
            assert set(r) >= {"id", "text", "domain", "label", "source"}
            assert r["source"]
    hangul = sum(1 for r in recs["office_help"] for ch in r["text"] if "가" <= ch <= "힣")
    assert hangul > 1000
    assert all(len({r["id"] for r in rs}) == len(rs) for rs in recs.values())


def test_jsonl_source_with_field_mapping_keeps_bad_lines_for_validate(tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    (src / "a.jsonl").write_text(
        json.dumps({"doc_id": "n1", "body": "뉴스 본문입니다.", "topic": "경제"}, ensure_ascii=False) + "\nnot json\n",
        encoding="utf-8",
    )
    (src / "b.jsonl").write_text(json.dumps({"doc_id": "n2", "body": "둘째", "topic": None}) + "\n", encoding="utf-8")
    out = tmp_path / "raw"
    out.mkdir()
    spec = {"type": "jsonl", "uri": str(src / "*.jsonl"), "fields": {"id": "doc_id", "text": "body", "label": "topic"}}
    manifest = corpus.build_corpus({"news": spec}, ["news"], out, CACHE)
    lines = (out / "news.jsonl").read_text(encoding="utf-8").splitlines()
    assert manifest["domains"]["news"]["lines"] == 3 and len(lines) == 3
    first = json.loads(lines[0])
    assert first == {
        "id": "n1",
        "text": "뉴스 본문입니다.",
        "label": "경제",
        "domain": "news",
        "source": str(src / "a.jsonl"),
    }
    assert lines[1] == "not json"


def test_jsonl_source_from_s3(tmp_path, s3_env):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="users")
    s3.put_object(
        Bucket="users",
        Key="news/2026-01.jsonl",
        Body=(json.dumps({"doc_id": 1, "body": "에스쓰리에서 온 글"}, ensure_ascii=False) + "\n").encode(),
    )
    out = tmp_path / "raw"
    out.mkdir()
    spec = {"type": "jsonl", "uri": "s3://users/news/*.jsonl", "fields": {"id": "doc_id", "text": "body"}}
    corpus.build_corpus({"news": spec}, ["news"], out, CACHE)
    rec = json.loads((out / "news.jsonl").read_text(encoding="utf-8"))
    assert rec["text"] == "에스쓰리에서 온 글" and rec["source"] == "s3://users/news/2026-01.jsonl"


def test_unavailable_source_names_itself_and_the_way_out(tmp_path):
    with pytest.raises(sources.SourceUnavailable) as info:
        corpus.build_corpus(
            {"faq": {"type": "debian_faq", "package": "debian-faq-xx-no-such-package"}},
            ["faq"],
            tmp_path,
            tmp_path / "cache",
        )
    msg = str(info.value)
    assert "'faq'" in msg and "debian-faq-xx-no-such-package" in msg and "corpus.sources" in msg


def test_domains_and_sources_must_agree(tmp_path):
    with pytest.raises(ValueError, match=r"No source for \['faq'\]"):
        corpus.build_corpus({"law": {"type": "kolaw"}}, ["law", "faq"], tmp_path, CACHE)


def test_evenly_spaced_is_deterministic_and_bounded():
    items = list(range(100))
    assert corpus.evenly_spaced(items, 4) == [0, 25, 50, 75]
    assert corpus.evenly_spaced(items, None) == items and corpus.evenly_spaced(items[:3], 10) == [0, 1, 2]


def test_a_sources_own_max_docs_wins(tmp_path):
    specs = {"law": {"type": "kolaw", "max_docs": 5}, "faq": {"type": "debian_faq"}}
    manifest = corpus.build_corpus(specs, ["law", "faq"], tmp_path, CACHE, max_docs_per_domain=12)
    assert manifest["domains"]["law"]["documents"] == 5 and manifest["domains"]["faq"]["documents"] == 12


@pytest.mark.parametrize(
    "uri, root",
    [
        ("s3://bucket/news/*.jsonl", "s3://bucket/news"),
        ("s3://bucket/news/2026-*/part-?.jsonl.gz", "s3://bucket/news"),
        ("data/incoming/news.jsonl", "data/incoming/news.jsonl"),
        ("data/incoming/**/*.jsonl", "data/incoming"),
        ("/abs/in/", "/abs/in"),
    ],
)
def test_input_root_is_the_folder_before_the_first_wildcard(uri, root):
    assert input_root(uri) == root


def test_external_inputs_lists_only_jsonl_sources_once():
    specs = {
        "law": {"type": "kolaw"},
        "news": {"type": "jsonl", "uri": "s3://b/news/*.jsonl"},
        "blog": {"type": "jsonl", "uri": "s3://b/news/blog-*.jsonl"},
        "mail": {"type": "jsonl", "uri": "in/m.jsonl"},
    }
    assert corpus.external_inputs(specs) == ["s3://b/news", "in/m.jsonl"]


# --------------------------------------------------------------------------------------------- several sources
def write_jsonl(path: Path, records: list) -> Path:
    """``records`` as JSONL (a str is written as a raw line); the parent folder is made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_list_of_jsonl_sources_concatenates_in_list_order(tmp_path):
    write_jsonl(tmp_path / "base" / "a.jsonl", [{"id": "b1", "text": "기본 하나"}, {"id": "b2", "text": "기본 둘"}])
    write_jsonl(tmp_path / "daily" / "2026-01-02.jsonl", [{"doc_id": "d1", "body": "새 글"}])
    out = tmp_path / "raw"
    out.mkdir()
    specs = {
        "news": [
            {"type": "jsonl", "uri": str(tmp_path / "base" / "*.jsonl")},
            {"type": "jsonl", "uri": str(tmp_path / "daily" / "*.jsonl"), "fields": {"id": "doc_id", "text": "body"}},
        ]
    }
    manifest = corpus.build_corpus(specs, ["news"], out, CACHE)
    recs = read_jsonl(out / "news.jsonl")
    assert [r["id"] for r in recs] == ["b1", "b2", "d1"]
    assert recs[2]["text"] == "새 글" and recs[2]["source"] == str(tmp_path / "daily" / "2026-01-02.jsonl")
    entry = manifest["domains"]["news"]
    assert [s["lines"] for s in entry["sources"]] == [2, 1]
    assert (entry["lines_read"], entry["lines"], entry["updated"], entry["repeated"]) == (3, 3, 0, 0)
    assert entry["chars"] == len("기본 하나") + len("기본 둘") + len("새 글")
    assert manifest["totals"]["documents"] == 3
    assert not list(out.glob(".*")), "the spool file is removed"


def test_a_later_record_of_an_id_replaces_the_earlier_and_is_counted(tmp_path, caplog):
    write_jsonl(
        tmp_path / "base.jsonl",
        [
            {"id": "a", "text": "처음 글", "label": "x"},
            {"id": 7, "text": "같은 글"},
            "not json",
            {"text": "아이디 없음"},
            {"id": "c", "text": "그대로"},
        ],
    )
    write_jsonl(
        tmp_path / "day" / "d1.jsonl",
        [
            {"id": "a", "text": "고친 글", "label": "x"},  # text differs: updated
            {"id": "7", "text": "같은 글"},  # identical but for source (and 7 == "7"): repeated
            {"id": "c", "text": "그대로", "label": "y"},  # relabelled: updated
            {"id": "n", "text": "새 글"},
            {"id": "n", "text": "새 글 고침"},  # later in the same source: updated
        ],
    )
    out = tmp_path / "raw"
    out.mkdir()
    specs = {
        "news": [
            {"type": "jsonl", "uri": str(tmp_path / "base.jsonl")},
            {"type": "jsonl", "uri": str(tmp_path / "day" / "*.jsonl")},
        ]
    }
    with caplog.at_level("INFO", logger="domainlm.documents.corpus"):
        manifest = corpus.build_corpus(specs, ["news"], out, CACHE)
    lines = (out / "news.jsonl").read_text(encoding="utf-8").splitlines()
    # the later record is written at its own (later) position; lines without an id pass through unchanged
    assert lines[0] == "not json"
    recs = [None] + [json.loads(line) for line in lines[1:]]
    assert [r.get("id") for r in recs[1:]] == [None, "a", "7", "c", "n"]
    assert recs[1] == {"text": "아이디 없음", "domain": "news", "source": str(tmp_path / "base.jsonl")}
    assert recs[2]["text"] == "고친 글" and recs[4]["label"] == "y" and recs[5]["text"] == "새 글 고침"
    assert recs[3]["source"] == str(tmp_path / "day" / "d1.jsonl")
    entry = manifest["domains"]["news"]
    assert (entry["lines_read"], entry["lines"], entry["updated"], entry["repeated"]) == (10, 6, 3, 1)
    assert entry["lines_read"] == entry["lines"] + entry["updated"] + entry["repeated"]
    assert entry["examples"] == {"updated": ["a", "c", "n"], "repeated": ["7"]}
    assert entry["chars"] == sum(len(r["text"]) for r in recs[1:])
    assert "4 of 10 lines replaced" in caplog.text and "'a'" in caplog.text
    assert json.loads((out / "MANIFEST.json").read_text())["domains"]["news"]["updated"] == 3


def test_a_builtin_source_and_a_daily_drop_in_one_domain(tmp_path):
    write_jsonl(
        tmp_path / "in" / "d1.jsonl",
        [{"id": "law-art-045", "text": "제45조 고친 조문", "label": "law"}, {"id": "law-new-1", "text": "새 조문"}],
    )
    out = tmp_path / "raw"
    out.mkdir()
    spec = [{"type": "kolaw", "max_docs": 3}, {"type": "jsonl", "uri": str(tmp_path / "in" / "*.jsonl")}]
    manifest = corpus.build_corpus({"law": spec}, ["law"], out, CACHE, max_docs_per_domain=1)
    single = tmp_path / "single"
    single.mkdir()
    corpus.build_corpus({"law": {"type": "kolaw", "max_docs": 3}}, ["law"], single, CACHE)
    package_recs = read_jsonl(single / "law.jsonl")
    assert "law-art-045" in [r["id"] for r in package_recs]
    recs = read_jsonl(out / "law.jsonl")
    # a source's own max_docs wins; max_docs_per_domain (1) applies to each other source of the list
    assert [r["id"] for r in recs] == [r["id"] for r in package_recs if r["id"] != "law-art-045"] + ["law-art-045"]
    assert recs[-1]["text"] == "제45조 고친 조문"
    entry = manifest["domains"]["law"]
    assert [s["type"] for s in entry["sources"]] == ["kolaw", "jsonl"]
    assert entry["sources"][0]["version"] == "0.6.0" and entry["sources"][1]["lines"] == 1
    assert (entry["lines_read"], entry["lines"], entry["updated"], entry["repeated"]) == (4, 3, 1, 0)


def test_the_single_form_writes_its_source_as_it_is(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "하나"}, {"id": "a", "text": "둘"}, "not json"])
    out_single, out_list = tmp_path / "single", tmp_path / "list"
    out_single.mkdir()
    out_list.mkdir()
    spec = {"type": "jsonl", "uri": str(src)}
    single = corpus.build_corpus({"news": spec}, ["news"], out_single, CACHE)
    assert single["domains"]["news"] == {"type": "jsonl", "uri": str(src), "lines": 3}
    assert len((out_single / "news.jsonl").read_text(encoding="utf-8").splitlines()) == 3  # validate keeps the first
    listed = corpus.build_corpus({"news": [spec]}, ["news"], out_list, CACHE)
    assert listed["domains"]["news"]["updated"] == 1 and listed["domains"]["news"]["lines"] == 2
    from stages.corpus import corpus_metrics

    assert corpus_metrics(single)["domains"]["news"] == {"documents": 3, "chars": 0, "updated": 0, "repeated": 0}
    metrics = corpus_metrics(listed)
    assert metrics["domains"]["news"]["updated"] == 1 and metrics["totals"]["updated"] == 1


@pytest.mark.parametrize(
    "spec, match",
    [
        ([], r"corpus\.sources\.news is an empty list"),
        ([{"type": "kolaw"}, "incoming/*.jsonl"], r"corpus\.sources\.news\[1\] is a str .*not a mapping"),
        ("incoming/*.jsonl", r"corpus\.sources\.news is a str"),
    ],
)
def test_bad_source_lists_name_the_domain(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        corpus.build_corpus({"news": spec}, ["news"], tmp_path, CACHE)
    with pytest.raises(ValueError, match=match):
        corpus.external_inputs({"news": spec})
    assert not list(tmp_path.iterdir()), "nothing is written before the specs are checked"


def test_external_inputs_lists_the_jsonl_entries_of_lists():
    specs = {
        "law": [{"type": "kolaw"}, {"type": "jsonl", "uri": "incoming/law/*.jsonl"}],
        "news": {"type": "jsonl", "uri": "s3://b/news/*.jsonl"},
        "faq": [{"type": "jsonl", "uri": "s3://b/faq/*.jsonl"}, {"type": "jsonl", "uri": "s3://b/news/x-*.jsonl"}],
    }
    assert corpus.external_inputs(specs) == ["s3://b/faq", "s3://b/news", "incoming/law"]
