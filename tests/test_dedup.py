"""Tests for dedup (domainlm.dedup.minhash_lsh, domainlm.dedup.files, stages/dedup.py): banding choice,
signatures, exact + near dedup and its named steps, outputs, Redis backend."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
from datasketch import MinHash, MinHashLSH

from domainlm.dedup.files import read_domain_records
from domainlm.dedup.minhash_lsh import (
    ExactGroups,
    UnionFind,
    candidate_probability,
    choose_bands_rows,
    choose_representatives,
    cluster,
    compute_signatures,
    deduplicate,
    domain_counts,
    exact_groups,
    false_positive_area,
    jaccard,
    lsh_candidate_pairs,
    minhash_signature,
    removal_rows,
    storage_config,
)
from stages.dedup import run
from domainlm.korean.hangul import normalize_text, shingle_ids, to_hash32

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"num_perm": 128, "threshold": 0.8, "min_recall_at_threshold": 0.99, "workers": 2,
          "lsh_backend": "memory", "redis": {"host": "127.0.0.1", "port": 6379, "basename": "dedup"}, "seed": 1}


def run_stage(params: dict, domains: list[str], *, input_dir: Path, output_dir: Path) -> dict:
    """The stage's ``run`` with the arguments ``main()`` takes from a ``dedup`` params section."""
    return run(domains, input_dir, output_dir, num_perm=params["num_perm"], threshold=params["threshold"],
               min_recall=params["min_recall_at_threshold"], seed=params["seed"], workers=params.get("workers"),
               lsh_backend=params["lsh_backend"], redis=params.get("redis"))


def korean_text(rng: random.Random, words: int) -> str:
    """Random Korean-looking text: words of 1-4 random Hangul syllables."""
    return " ".join("".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(1, 4)))
                    for _ in range(words))


def edit_words(text: str, rng: random.Random, n: int) -> str:
    """``text`` with ``n`` of its words replaced by new random ones (a near duplicate)."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = korean_text(rng, 1)
    return " ".join(words)


def J(a: str, b: str) -> float:
    return jaccard(shingle_ids(a), shingle_ids(b))


@pytest.fixture(scope="module")
def corpus():
    """Records over two domains with known exact, near and cross-domain duplicates."""
    rng = random.Random(7)
    base = korean_text(rng, 300)
    near = edit_words(base, rng, 2)           # near duplicate of base, a little shorter or longer
    longer = base + " " + korean_text(rng, 6)  # base plus a few words: more shingles
    cross = korean_text(rng, 250)
    recs = [
        {"id": "law-b", "text": base, "domain": "law", "label": "law", "source": "t"},
        {"id": "law-a", "text": near, "domain": "law", "label": "law", "source": "t"},
        {"id": "law-z", "text": longer, "domain": "law", "label": "law", "source": "t"},
        {"id": "law-x", "text": "  " + base.replace(" ", "\n", 5) + "\t", "domain": "law", "label": "law",
         "source": "t"},  # exact duplicate of law-b after whitespace normalization
        {"id": "faq-1", "text": cross, "domain": "faq", "label": "faq", "source": "t"},
        {"id": "law-c", "text": cross, "domain": "law", "label": "law", "source": "t"},  # cross-domain exact copy
        {"id": "faq-2", "text": edit_words(cross, rng, 2), "domain": "faq", "label": "faq", "source": "t"},
    ]
    recs += [{"id": f"faq-u{i}", "text": korean_text(rng, 120), "domain": "faq", "label": "faq", "source": "t"}
             for i in range(12)]
    recs.append({"id": "faq-en", "text": "The quick brown fox jumps over the lazy dog near the river bank.",
                 "domain": "faq", "label": "faq", "source": "t"})
    return recs


# ------------------------------------------------------------------ banding

def test_band_choice_meets_recall_constraint_and_beats_datasketch_default():
    bands, rows = choose_bands_rows(128, 0.8, 0.99)
    assert bands * rows <= 128
    assert candidate_probability(0.8, bands, rows) >= 0.99
    default = MinHashLSH(threshold=0.8, num_perm=128)
    assert (default.b, default.r) == (9, 13)
    assert candidate_probability(0.8, default.b, default.r) < 0.45
    assert candidate_probability(0.8, bands, rows) > candidate_probability(0.8, default.b, default.r)
    assert (bands, rows) == (16, 6)


def test_band_choice_minimises_false_positive_area_among_feasible():
    bands, rows = choose_bands_rows(64, 0.7, 0.95)
    best = false_positive_area(0.7, bands, rows)
    for b in range(2, 65):
        for r in range(1, 64 // b + 1):
            if candidate_probability(0.7, b, r) >= 0.95:
                assert false_positive_area(0.7, b, r) >= best - 1e-12, (b, r)


def test_band_choice_rejects_impossible_or_bad_parameters():
    with pytest.raises(ValueError, match="raise num_perm"):
        choose_bands_rows(4, 0.9, 0.999999)
    with pytest.raises(ValueError, match="threshold"):
        choose_bands_rows(128, 1.5, 0.99)
    with pytest.raises(ValueError, match="num_perm"):
        choose_bands_rows(1, 0.8, 0.99)


# ------------------------------------------------------------------ signatures

def test_signature_equals_datasketch_update_batch_one_value_at_a_time():
    text = korean_text(random.Random(3), 400)  # > UPDATE_CHUNK shingles: several chunks
    hashes = to_hash32(shingle_ids(text))
    reference = MinHash(num_perm=128, seed=1, hashfunc=int)
    reference.update_batch([int(h) for h in hashes])
    assert np.array_equal(minhash_signature(text, 128, 1), reference.hashvalues)


def test_signatures_do_not_depend_on_workers_or_hash_seed(corpus):
    texts = [normalize_text(r["text"]) for r in corpus]
    one = compute_signatures(texts, 128, 1, workers=1, chunk_docs=3)
    two = compute_signatures(texts, 128, 1, workers=2, chunk_docs=3)
    assert one.dtype == np.uint32 and one.shape == (len(texts), 128)
    assert np.array_equal(one, two)
    code = ("import sys; from domainlm.dedup.minhash_lsh import minhash_signature; "
            "sys.stdout.write(minhash_signature(sys.argv[1]).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code, texts[0]], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout == one[0].tobytes().hex()


def test_union_find_clusters():
    uf = UnionFind(6)
    uf.union(0, 1)
    uf.union(3, 4)
    uf.union(1, 4)
    assert len({uf.find(i) for i in (0, 1, 3, 4)}) == 1
    assert uf.find(2) != uf.find(0) and uf.find(5) != uf.find(2)


# ------------------------------------------------------------------ dedup decisions

def test_fixture_has_the_intended_similarities(corpus):
    text = {r["id"]: r["text"] for r in corpus}
    assert J(text["law-b"], text["law-a"]) >= 0.8
    assert J(text["law-b"], text["law-z"]) >= 0.8
    assert J(text["faq-1"], text["faq-2"]) >= 0.8
    assert J(text["law-b"], text["faq-1"]) < 0.2
    assert max(J(text["faq-u0"], text[f"faq-u{i}"]) for i in range(1, 12)) < 0.3


def test_near_duplicates_removed_dissimilar_kept(corpus):
    result = deduplicate(corpus, workers=2)
    kept = {r["id"] for r in result.kept}
    removed = {r["id"]: r for r in result.removed}
    # law-b, law-a, law-z (and law-x) are one cluster; law-z has the most shingles, so it is kept
    assert "law-z" in kept and "law-b" not in kept and "law-a" not in kept
    assert removed["law-a"]["kind"] == "near" and removed["law-a"]["representative_id"] == "law-z"
    assert removed["law-a"]["jaccard"] == pytest.approx(J(removed_text(corpus, "law-a"), removed_text(corpus, "law-z")))
    assert {f"faq-u{i}" for i in range(12)} | {"faq-en"} <= kept  # dissimilar documents stay
    assert all(c["verified"] == (c["jaccard"] >= 0.8) for c in result.candidates)
    assert {"a", "b", "estimated_jaccard", "jaccard", "verified"} <= set(result.candidates[0])
    assert result.stats["verified_pairs"] >= 3


def removed_text(corpus, doc_id):
    return next(r["text"] for r in corpus if r["id"] == doc_id)


def test_exact_duplicates_removed_and_cross_domain_copies_caught(corpus):
    result = deduplicate(corpus, workers=1)
    removed = {r["id"]: r for r in result.removed}
    assert removed["law-x"]["kind"] == "exact"  # whitespace-only difference from law-b
    # law-c copies faq-1 exactly (other domain); faq-2 is a near duplicate of both
    assert removed["law-c"]["kind"] == "exact" and removed["law-c"]["representative_domain"] == "faq"
    faq_removed = [removed[i] for i in ("faq-1", "faq-2") if i in removed]
    assert len(faq_removed) == 1 and faq_removed[0]["kind"] == "near"
    assert faq_removed[0]["cluster_id"] == removed["law-c"]["cluster_id"]
    assert faq_removed[0]["representative_id"] == removed["law-c"]["representative_id"]
    assert result.counts["law"]["exact_removed"] == 2 and result.counts["faq"]["near_removed"] == 1


def test_representative_rule_most_shingles_then_smallest_id():
    rng = random.Random(11)
    text = korean_text(rng, 200)
    same_size = [{"id": i, "text": text + " " + w, "domain": "law"} for i, w in (("d-2", "zqx2"), ("d-1", "zqx1"))]
    result = deduplicate(same_size + [{"id": "d-0", "text": korean_text(rng, 50), "domain": "law"}])
    assert len(shingle_ids(same_size[0]["text"])) == len(shingle_ids(same_size[1]["text"]))
    assert [r["id"] for r in result.removed] == ["d-2"]  # equal shingle counts: smallest id kept
    bigger = [{"id": "d-1", "text": text, "domain": "law"}, {"id": "d-9", "text": text + " 마바사", "domain": "law"}]
    result = deduplicate(bigger)
    assert [r["id"] for r in result.removed] == ["d-1"]  # more shingles wins over a smaller id
    assert result.removed[0]["representative_id"] == "d-9"


def test_counts_add_up_per_domain(corpus):
    result = deduplicate(corpus)
    for domain, c in result.counts.items():
        assert c["before"] == c["after"] + c["exact_removed"] + c["near_removed"], domain
        assert c["after"] == sum(r["domain"] == domain for r in result.kept)
    assert sum(c["before"] for c in result.counts.values()) == len(corpus)
    assert len(result.kept) + len(result.removed) == len(corpus)


# ------------------------------------------------------------------ the named steps of deduplicate

def test_exact_groups_keep_the_smallest_id_and_survivors_keep_input_order():
    recs = [{"id": "c", "text": "가나다  라마", "domain": "law"},
            {"id": "z", "text": "전혀 다른 글", "domain": "faq"},
            {"id": "a", "text": "\t가나다 라마\n", "domain": "faq"},
            {"id": "b", "text": "가나다 라마", "domain": "law"}]
    exact = exact_groups(recs)
    assert exact.normalized == ["가나다 라마", "전혀 다른 글", "가나다 라마", "가나다 라마"]
    assert exact.keeper_of == [2, 1, 2, 2]  # "a" (record 2) keeps its group, whatever its position
    assert exact.survivors == [1, 2]


def test_cluster_gives_the_connected_components_of_the_links():
    assert cluster([(0, 1), (3, 4), (1, 4), (6, 7)]) == [[0, 1, 3, 4], [6, 7]]
    assert cluster([]) == []


def test_representatives_have_most_shingles_then_smallest_id():
    ids = ["e", "d", "a", "c", "b"]
    assert choose_representatives(5, [[0, 1, 3]], {0: 10, 1: 12, 3: 12}, ids) == [3, 3, 2, 3, 4]  # tie: "c" < "d"
    assert choose_representatives(5, [[0, 1, 3]], {0: 10, 1: 12, 3: 11}, ids) == [1, 1, 2, 1, 4]  # 12 beats "c"
    assert choose_representatives(3, [], {}, ids[:3]) == [0, 1, 2]  # no cluster: each its own


def test_removal_rows_number_clusters_by_representative_id_and_counts_add_up():
    recs = [{"id": "a", "domain": "law"}, {"id": "b", "domain": "law"}, {"id": "c", "domain": "faq"},
            {"id": "d", "domain": "faq"}, {"id": "e", "domain": "law"}]
    # b is an exact copy of a; c and d (survivor positions 1 and 2) are near duplicates, d kept
    exact = ExactGroups(normalized=["x"] * 5, keeper_of=[0, 0, 2, 3, 4], survivors=[0, 2, 3, 4])
    shingles = {1: np.array([1, 2, 3, 4], np.uint64), 2: np.array([1, 2, 3, 4, 5], np.uint64)}
    rows = removal_rows(recs, exact, [0, 2, 2, 3], shingles)
    assert rows == [
        {"id": "b", "domain": "law", "kind": "exact", "cluster_id": 0, "representative_id": "a",
         "representative_domain": "law", "jaccard": 1.0},
        {"id": "c", "domain": "faq", "kind": "near", "cluster_id": 1, "representative_id": "d",
         "representative_domain": "faq", "jaccard": 0.8},
    ]
    counts = domain_counts(recs, rows)
    assert counts == {"law": {"before": 3, "after": 2, "exact_removed": 1, "near_removed": 0},
                      "faq": {"before": 2, "after": 1, "exact_removed": 0, "near_removed": 1}}
    for c in counts.values():
        assert c["before"] == c["after"] + c["exact_removed"] + c["near_removed"]


def test_deduplicate_stats_agree_with_its_removal_rows(corpus):
    result = deduplicate(corpus, workers=1)
    cluster_ids = [r["cluster_id"] for r in result.removed]
    assert result.stats["clusters"] == len(set(cluster_ids)) == max(cluster_ids) + 1
    assert result.stats["largest_cluster"] == 4  # law-z (kept) with law-b, law-a and law-x
    assert sorted(r["id"] for r in result.removed if r["representative_id"] == "law-z") == ["law-a", "law-b",
                                                                                           "law-x"]


def test_bad_records_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        deduplicate([{"id": "a", "text": "x y", "domain": "d"}, {"id": "a", "text": "z", "domain": "d"}])
    with pytest.raises(ValueError, match="'text' must be a string"):
        deduplicate([{"id": "a", "text": None, "domain": "d"}])
    with pytest.raises(ValueError, match="empty after whitespace normalization"):
        deduplicate([{"id": "a", "text": " \n\t", "domain": "d"}])
    with pytest.raises(ValueError, match="record 'a' \\(d\\): text is not valid Unicode"):
        deduplicate([{"id": "a", "text": json.loads('"ok \\ud800 bad"'), "domain": "d"}])


# ------------------------------------------------------------------ stage I/O

def write_inputs(root: Path, corpus) -> None:
    (root / "validated").mkdir(parents=True)
    for domain in ("law", "faq"):
        with (root / "validated" / f"{domain}.jsonl").open("w", encoding="utf-8") as fh:
            for r in corpus:
                if r["domain"] == domain:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def test_run_writes_every_output_atomically_and_consistently(tmp_path, corpus):
    write_inputs(tmp_path, corpus)
    out = tmp_path / "dedup"
    metrics = run_stage(PARAMS, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["candidates.json", "dedup_log.csv", "faq.jsonl", "law.jsonl",
                                                     "removed.jsonl"]
    kept = [json.loads(line) for d in ("law", "faq") for line in (out / f"{d}.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in corpus}
    assert all(r == by_id[r["id"]] for r in kept)  # kept records unchanged
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert {r["id"] for r in kept}.isdisjoint(r["id"] for r in removed)
    assert len(kept) + len(removed) == len(corpus)
    rows = list(csv.DictReader((out / "dedup_log.csv").open()))
    assert [r["domain"] for r in rows] == ["law", "faq"]
    for row in rows:
        assert int(row["before"]) == int(row["after"]) + int(row["exact_removed"]) + int(row["near_removed"])
        assert metrics["per_domain"][row["domain"]]["after"] == int(row["after"])
    cands = json.loads((out / "candidates.json").read_text())
    assert (cands["bands"], cands["rows"]) == (16, 6) and len(cands["pairs"]) == metrics["candidate_pairs"]
    assert metrics["totals"]["before"] == len(corpus) and 0 < metrics["totals"]["removed_rate"] < 1
    assert metrics["lsh"]["p_candidate_at_threshold"] >= 0.99
    assert metrics["lsh"]["datasketch_default"]["p_candidate_at_threshold"] < 0.45
    assert metrics["docs_per_s"] > 0 and metrics["wall_s"] > 0 and metrics["peak_rss_mb"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # a failing run leaves the previous output untouched
    (tmp_path / "validated" / "faq.jsonl").write_text('{"id": "q", "text": "x", "domain": "law"}\n')
    with pytest.raises(ValueError, match=r"faq.jsonl:1: record domain 'law' != file domain 'faq'"):
        run_stage(PARAMS, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=out)
    assert len((out / "law.jsonl").read_text().splitlines()) == sum(r["domain"] == "law" for r in kept)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_domain_records(tmp_path / "missing.jsonl", "law")
    bad = tmp_path / "law.jsonl"
    bad.write_text('{"id": "a", "text": "b", "domain": "law"}\nnot json\n')
    with pytest.raises(ValueError, match="law.jsonl:2: not valid JSON"):
        read_domain_records(bad, "law")
    with pytest.raises(ValueError, match="lsh_backend"):
        storage_config("cassandra")
    with pytest.raises(ValueError, match="workers"):
        run_stage({**PARAMS, "workers": 0}, ["law"], input_dir=tmp_path, output_dir=tmp_path / "o")


def test_stage_main_runs_as_module(tmp_path, corpus):
    write_inputs(tmp_path / "data", corpus)
    (tmp_path / "params.yaml").write_text(
        "domains: [law, faq]\ndedup:\n  num_perm: 128\n  threshold: 0.8\n  min_recall_at_threshold: 0.99\n"
        "  workers: null\n  lsh_backend: memory\n  redis: {host: 127.0.0.1, port: 6379, basename: dedup}\n"
        "  seed: 1\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "stages.dedup"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and "stages.dedup: " in proc.stderr  # logs through the stage logger, no print()
    metrics = json.loads((tmp_path / "metrics" / "dedup.json").read_text())
    assert metrics["totals"]["before"] == len(corpus)
    assert (tmp_path / "data" / "dedup" / "removed.jsonl").exists()


# ------------------------------------------------------------------ Redis backend

def test_redis_backend_gives_the_same_result_as_memory(redis_server, corpus):
    host, port = redis_server
    cfg = storage_config("redis", {"host": host, "port": port, "basename": "dedup-test"})
    texts = [normalize_text(r["text"]) for r in corpus]
    sigs = compute_signatures(texts, 128, 1, workers=1)
    assert lsh_candidate_pairs(sigs, 16, 6, 1, cfg) == lsh_candidate_pairs(sigs, 16, 6, 1, None)

    client = redis.Redis(host=host, port=port)
    table = b"dedup-test_bucket_\x00\x00"  # band 0 of an earlier, interrupted run: must be cleared first
    client.hset(table, b"stale", table + b"stale")
    client.sadd(table + b"stale", b"8", b"15")  # two unrelated documents
    memory = deduplicate(corpus, workers=2)
    on_redis = deduplicate(corpus, workers=2, lsh_config=cfg)
    assert on_redis.removed == memory.removed and on_redis.candidates == memory.candidates
    assert [r["id"] for r in on_redis.kept] == [r["id"] for r in memory.kept]
    assert memory.removed  # the comparison covers real decisions
    assert list(client.scan_iter(match=b"dedup-test_*")) == []  # the index is removed after use


def test_run_with_redis_backend(redis_server, tmp_path, corpus):
    host, port = redis_server
    write_inputs(tmp_path, corpus)
    params = {**PARAMS, "lsh_backend": "redis", "redis": {"host": host, "port": port, "basename": "dedup-run"}}
    metrics = run_stage(params, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=tmp_path / "r")
    reference = run_stage(PARAMS, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=tmp_path / "m")
    assert metrics["redis_backend"] == 1
    for name in ("law.jsonl", "faq.jsonl", "removed.jsonl", "candidates.json", "dedup_log.csv"):
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "m" / name).read_bytes(), name


def test_domain_with_empty_file_gets_empty_output_and_zero_counts(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "law.jsonl").write_text("")
    (tmp_path / "v" / "faq.jsonl").write_text(json.dumps({"id": "f", "text": "하나 둘 셋", "domain": "faq"}) + "\n")
    metrics = run_stage({**PARAMS, "workers": 1}, ["law", "faq"], input_dir=tmp_path / "v", output_dir=tmp_path / "o")
    assert list(metrics["per_domain"]) == ["law", "faq"]
    assert metrics["per_domain"]["law"] == {"before": 0, "after": 0, "exact_removed": 0, "near_removed": 0}
    assert (tmp_path / "o" / "law.jsonl").read_text() == ""
    assert len((tmp_path / "o" / "faq.jsonl").read_text().splitlines()) == 1
