"""Tests for dedup (domainlm.dedup.*, stages/dedup.py): banding choice on a measured background, datasketch-equal
signatures, band keys and bucket pairs, the estimated-Jaccard filter, exact + near dedup and its named steps,
outputs, resume from a failed step, the Redis backend. Ray: tests/test_dedup_ray.py."""

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

from domainlm.dedup import minhash_lsh as mh
from domainlm.dedup import workflow
from domainlm.dedup.files import deduplicate_records
from domainlm.dedup.minhash_lsh import (
    UnionFind,
    band_keys,
    bucket_pairs,
    candidate_probability,
    choose_bands_rows,
    choose_representatives,
    cluster,
    domain_counts,
    estimate_floor,
    estimated_jaccard,
    exact_keepers,
    false_candidate_rate,
    jaccard,
    minhash_signature,
    pack_pairs,
    permutations,
    removal_rows,
    signatures,
    unpack_pairs,
)
from domainlm.dedup.workflow import DedupParams, line_offsets
from domainlm.korean.hangul import normalize_text, shingle_hashes_many, shingle_ids, to_hash32
from stages.dedup import run

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "num_perm": 256,
    "threshold": 0.8,
    "min_recall_at_threshold": 0.99,
    "workers": 2,
    "lsh_backend": "sort",
    "redis": {"host": "127.0.0.1", "port": 6379, "basename": "dedup"},
    "seed": 1,
}
OUTPUTS = ("law.jsonl", "faq.jsonl", "removed.jsonl", "candidates.json", "dedup_log.csv")


def run_stage(params: dict, domains: list[str], *, input_dir: Path, output_dir: Path, **kw) -> dict:
    """The stage's ``run`` with the arguments ``main()`` takes from a ``dedup`` params section."""
    return run(
        domains,
        input_dir,
        output_dir,
        num_perm=params["num_perm"],
        threshold=params["threshold"],
        min_recall=params["min_recall_at_threshold"],
        seed=params["seed"],
        workers=params.get("workers"),
        lsh_backend=params["lsh_backend"],
        redis=params.get("redis"),
        **kw,
    )


def korean_text(rng: random.Random, words: int) -> str:
    """Random Korean-looking text: words of 1-4 random Hangul syllables."""
    return " ".join("".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(1, 4))) for _ in range(words))


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
    near = edit_words(base, rng, 2)  # near duplicate of base, a little shorter or longer
    longer = base + " " + korean_text(rng, 6)  # base plus a few words: more shingles
    cross = korean_text(rng, 250)
    recs = [
        {"id": "law-b", "text": base, "domain": "law", "label": "law", "source": "t"},
        {"id": "law-a", "text": near, "domain": "law", "label": "law", "source": "t"},
        {"id": "law-z", "text": longer, "domain": "law", "label": "law", "source": "t"},
        {
            "id": "law-x",
            "text": "  " + base.replace(" ", "\n", 5) + "\t",
            "domain": "law",
            "label": "law",
            "source": "t",
        },  # exact duplicate of law-b after whitespace normalization
        {"id": "faq-1", "text": cross, "domain": "faq", "label": "faq", "source": "t"},
        {"id": "law-c", "text": cross, "domain": "law", "label": "law", "source": "t"},  # cross-domain exact copy
        {"id": "faq-2", "text": edit_words(cross, rng, 2), "domain": "faq", "label": "faq", "source": "t"},
    ]
    recs += [
        {"id": f"faq-u{i}", "text": korean_text(rng, 120), "domain": "faq", "label": "faq", "source": "t"}
        for i in range(12)
    ]
    recs.append(
        {
            "id": "faq-en",
            "text": "The quick brown fox jumps over the lazy dog near the river bank.",
            "domain": "faq",
            "label": "faq",
            "source": "t",
        }
    )
    return recs


def korean_background(n: int = 20000, seed: int = 0) -> np.ndarray:
    """A background Jaccard sample shaped like unrelated Korean documents' (median 0.13, p99 ~0.18)."""
    return np.clip(np.random.default_rng(seed).normal(0.13, 0.021, n), 0.0, 1.0)


# ------------------------------------------------------------------ banding


def test_band_choice_without_background_is_the_uniform_rule_and_beats_datasketch_default():
    bands, rows = choose_bands_rows(128, 0.8, 0.99)
    assert (bands, rows) == (16, 6)  # text-dedup's rule: least FP area with P(0.8) >= 0.99
    assert candidate_probability(0.8, bands, rows) >= 0.99
    default = MinHashLSH(threshold=0.8, num_perm=128)
    assert (default.b, default.r) == (9, 13)
    assert candidate_probability(0.8, default.b, default.r) < 0.45


def test_band_choice_on_a_korean_background_takes_more_rows_and_far_fewer_false_candidates():
    bg = korean_background()
    bands, rows = choose_bands_rows(256, 0.8, 0.99, bg)
    assert (bands, rows) == (26, 8) and bands * rows <= 256
    assert candidate_probability(0.8, bands, rows) >= 0.99
    rate, old_rate = false_candidate_rate(bg, 0.8, bands, rows), false_candidate_rate(bg, 0.8, 16, 6)
    assert 5e-5 < old_rate < 3e-4  # 16 x 6: ~1.2e-4 per unrelated pair, as measured on 200k documents
    assert rate < old_rate / 15
    # it is the least rate among every feasible banding
    for r in range(1, 129):
        for b in range(2, 256 // r + 1):
            if candidate_probability(0.8, b, r) >= 0.99:
                assert false_candidate_rate(bg, 0.8, b, r) >= rate - 1e-15, (b, r)
    assert mh.num_perm_for(rate / 10, 0.8, 0.99, bg) > 256  # the advice when 256 is not enough


def test_false_candidate_rate_is_the_s_curve_mean_below_the_threshold():
    bg = np.array([0.1, 0.2, 0.5, 0.9])
    expected = (
        candidate_probability(0.1, 4, 3) + candidate_probability(0.2, 4, 3) + candidate_probability(0.5, 4, 3)
    ) / 4  # the 0.9 pair is a true near duplicate
    assert false_candidate_rate(bg, 0.8, 4, 3) == pytest.approx(expected)
    report = mh.banding_report(256, 0.8, 26, 8, korean_background(), n_docs=1_000_001)
    assert report["expected_false_candidate_pairs_per_doc"] == pytest.approx(
        report["expected_false_candidate_rate"] * 500_000
    )
    assert candidate_probability(np.array([0.8]), 26, 8)[0] == pytest.approx(1 - (1 - 0.8**8) ** 26)


def test_band_choice_rejects_impossible_or_bad_parameters():
    with pytest.raises(ValueError, match="raise num_perm"):
        choose_bands_rows(4, 0.9, 0.999999)
    with pytest.raises(ValueError, match="threshold"):
        choose_bands_rows(128, 1.5, 0.99)
    with pytest.raises(ValueError, match="num_perm"):
        choose_bands_rows(1, 0.8, 0.99)


def test_background_pair_sample_is_seeded_and_distinct():
    small = mh.sample_pairs(5, 100, 1)
    assert len(small) == 10 and (small[:, 0] < small[:, 1]).all()
    big = mh.sample_pairs(2000, 5000, 1)
    assert len({tuple(p) for p in big.tolist()}) == 5000 and (big[:, 0] < big[:, 1]).all()
    assert np.array_equal(big, mh.sample_pairs(2000, 5000, 1))


# ------------------------------------------------------------------ signatures, band keys, bucket pairs


@pytest.mark.parametrize("num_perm", [128, 256])
def test_signatures_equal_datasketch_update_batch(num_perm):
    rng = random.Random(3)
    texts = [normalize_text(korean_text(rng, w)) for w in (400, 3, 60)] + ["a"]  # > 256 shingles: several chunks
    hashes, bounds = shingle_hashes_many(texts)
    sigs = signatures(hashes, bounds, permutations(num_perm, 1))
    assert sigs.dtype == np.uint32 and sigs.shape == (len(texts), num_perm)
    for d, text in enumerate(texts):
        reference = MinHash(num_perm=num_perm, seed=1, hashfunc=int)
        reference.update_batch([int(h) for h in to_hash32(shingle_ids(text))])
        assert np.array_equal(sigs[d], reference.hashvalues)
    empty = signatures(np.empty(0, np.uint32), np.array([0, 0]), permutations(num_perm, 1))
    assert np.array_equal(empty[0], MinHash(num_perm=num_perm, seed=1).hashvalues)  # the empty set's values


def test_signature_does_not_depend_on_the_hash_seed():
    text = korean_text(random.Random(5), 50)
    code = (
        "import sys; from domainlm.dedup.minhash_lsh import minhash_signature; "
        "sys.stdout.write(minhash_signature(sys.argv[1]).tobytes().hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, text],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout == minhash_signature(text).tobytes().hex()


def test_band_keys_are_equal_exactly_when_the_band_values_are():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, size=(4, 12), dtype=np.uint32)
    sigs[1, :3] = sigs[0, :3]  # band 0 shared by docs 0 and 1
    sigs[2, 3:6] = sigs[0, 3:6]  # band 1 shared by docs 0 and 2
    sigs[3] = mh.EMPTY_VALUE  # an empty shingle set
    keys = band_keys(sigs, 4, 3, np.arange(4))
    assert keys.shape == (4, 4) and keys.dtype == np.uint64
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] == keys[2, 1]
    assert keys[0, 1] != keys[1, 1] and keys[0, 0] != keys[2, 0] and keys[0, 2] != keys[1, 2]
    assert keys[0, 0] != keys[0, 1]  # the band index is part of the key
    two_empty = band_keys(np.full((2, 12), mh.EMPTY_VALUE, np.uint32), 4, 3, np.array([7, 8]))
    assert (two_empty[0] != two_empty[1]).all()  # empty documents get their own keys, not one shared bucket


def test_bucket_pairs_expand_small_buckets_and_star_the_oversized():
    keys = np.array([5, 9, 5, 5, 1, 9, 7, 7, 7, 7, 7], dtype=np.uint64)
    docs = np.arange(len(keys), dtype=np.int64)
    pairs, oversized = bucket_pairs(keys, docs, max_bucket=4)
    got = sorted(zip(*(x.tolist() for x in unpack_pairs(pairs))))
    star = [(6, 7), (6, 8), (6, 9), (6, 10)]  # the 5-document bucket: its smallest document with each other
    assert got == sorted([(0, 2), (0, 3), (2, 3), (1, 5)] + star)
    assert oversized == [5]
    assert np.all(np.diff(pairs.astype(np.float64)) > 0)  # sorted and distinct
    assert bucket_pairs(np.array([3], np.uint64), np.array([0]), 4)[0].size == 0
    a, b = unpack_pairs(pack_pairs(np.array([3, 2**32 - 1]), np.array([4, 2**32 - 2])))
    assert a.tolist() == [3, 2**32 - 1] and b.tolist() == [4, 2**32 - 2]


def test_estimated_jaccard_is_datasketchs_and_the_floor_keeps_five_sigma():
    rng = random.Random(9)
    a, b = korean_text(rng, 200), None
    b = edit_words(a, rng, 10)
    ma, mb = MinHash(num_perm=256, seed=1, hashfunc=int), MinHash(num_perm=256, seed=1, hashfunc=int)
    ma.update_batch([int(h) for h in to_hash32(shingle_ids(a))])
    mb.update_batch([int(h) for h in to_hash32(shingle_ids(b))])
    est = estimated_jaccard(ma.hashvalues[None, :], mb.hashvalues[None, :])[0]
    assert est == ma.jaccard(mb)
    assert estimate_floor(0.8, 256, 5.0) == pytest.approx(0.8 - 5 * (0.16 / 256) ** 0.5)
    assert estimate_floor(0.8, 128, 0.0) == 0.8


# ------------------------------------------------------------------ the named steps


def test_exact_keepers_keep_the_smallest_id_in_each_group():
    keys = [b"x" * 16, b"y" * 16, b"x" * 16, b"x" * 16]
    hi = np.array([int.from_bytes(k[:8], "big") for k in keys], dtype=np.uint64)
    lo = np.array([int.from_bytes(k[8:], "big") for k in keys], dtype=np.uint64)
    ids = ["c", "z", "a", "b"]
    rank = np.argsort(np.argsort(ids))
    assert exact_keepers(hi, lo, rank).tolist() == [2, 1, 2, 2]  # "a" (document 2) keeps its group


def test_union_find_and_cluster_give_connected_components():
    uf = UnionFind(6)
    uf.union(0, 1)
    uf.union(3, 4)
    uf.union(1, 4)
    assert len({uf.find(i) for i in (0, 1, 3, 4)}) == 1 and uf.find(2) != uf.find(0)
    assert cluster([(0, 1), (3, 4), (1, 4), (6, 7)]) == [[0, 1, 3, 4], [6, 7]]
    assert cluster([(10**9, 10**9 + 5)]) == [[10**9, 10**9 + 5]]  # only linked documents are held
    assert cluster([]) == []


def test_representatives_have_most_shingles_then_smallest_id():
    ids = ["e", "d", "a", "c", "b"]
    assert choose_representatives([[0, 1, 3]], {0: 10, 1: 12, 3: 12}, ids) == {0: 3, 1: 3, 3: 3}  # tie: "c" < "d"
    assert choose_representatives([[0, 1, 3]], {0: 10, 1: 12, 3: 11}, ids) == {0: 1, 1: 1, 3: 1}  # 12 beats "c"
    assert choose_representatives([], {}, ids) == {}


def test_removal_rows_number_clusters_by_representative_id_and_counts_add_up():
    ids, domains = ["a", "b", "c", "d", "e"], ["law", "law", "faq", "faq", "law"]
    keeper_of = np.array([0, 0, 2, 3, 4])  # b is an exact copy of a
    rows = removal_rows(ids, domains, keeper_of, {2: 3, 3: 3}, {2: 0.8})  # c, d near duplicates, d kept
    assert rows == [
        {
            "id": "b",
            "domain": "law",
            "kind": "exact",
            "cluster_id": 0,
            "representative_id": "a",
            "representative_domain": "law",
            "jaccard": 1.0,
        },
        {
            "id": "c",
            "domain": "faq",
            "kind": "near",
            "cluster_id": 1,
            "representative_id": "d",
            "representative_domain": "faq",
            "jaccard": 0.8,
        },
    ]
    counts = domain_counts(["law", "faq", "news"], {"law": 3, "faq": 2}, rows)
    assert counts == {
        "law": {"before": 3, "after": 2, "exact_removed": 1, "near_removed": 0},
        "faq": {"before": 2, "after": 1, "exact_removed": 0, "near_removed": 1},
        "news": {"before": 0, "after": 0, "exact_removed": 0, "near_removed": 0},
    }


def test_line_offsets_find_every_line_including_a_last_one_without_newline(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a":1}\n{"b":22}\r\n\n{"c":3}')
    offsets, lengths = line_offsets(p, chunk_bytes=4)  # chunks split lines: newlines still found
    assert [p.read_bytes()[o : o + n] for o, n in zip(offsets, lengths)] == [b'{"a":1}', b'{"b":22}', b"", b'{"c":3}']
    (tmp_path / "e.jsonl").write_bytes(b"")
    assert line_offsets(tmp_path / "e.jsonl")[0].size == 0


# ------------------------------------------------------------------ dedup decisions (the real stage path)


def test_fixture_has_the_intended_similarities(corpus):
    text = {r["id"]: r["text"] for r in corpus}
    assert J(text["law-b"], text["law-a"]) >= 0.8
    assert J(text["law-b"], text["law-z"]) >= 0.8
    assert J(text["faq-1"], text["faq-2"]) >= 0.8
    assert J(text["law-b"], text["faq-1"]) < 0.2
    assert max(J(text["faq-u0"], text[f"faq-u{i}"]) for i in range(1, 12)) < 0.3


@pytest.fixture(scope="module")
def result(corpus):
    return deduplicate_records(corpus, workers=2)


def test_near_duplicates_removed_dissimilar_kept(corpus, result):
    kept = {r["id"] for r in result.kept}
    removed = {r["id"]: r for r in result.removed}
    # law-b, law-a, law-z (and law-x) are one cluster; law-z has the most shingles, so it is kept
    assert "law-z" in kept and "law-b" not in kept and "law-a" not in kept
    assert removed["law-a"]["kind"] == "near" and removed["law-a"]["representative_id"] == "law-z"
    text = {r["id"]: r["text"] for r in corpus}
    assert removed["law-a"]["jaccard"] == pytest.approx(J(text["law-a"], text["law-z"]))
    assert {f"faq-u{i}" for i in range(12)} | {"faq-en"} <= kept  # dissimilar documents stay
    assert all(c["verified"] == (c["jaccard"] >= 0.8) for c in result.candidates)
    assert {"a", "b", "estimated_jaccard", "jaccard", "verified"} <= set(result.candidates[0])
    assert result.metrics["verified_pairs"] >= 3


def test_exact_duplicates_removed_and_cross_domain_copies_caught(result):
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
    res = deduplicate_records(same_size + [{"id": "d-0", "text": korean_text(rng, 50), "domain": "law"}])
    assert len(shingle_ids(same_size[0]["text"])) == len(shingle_ids(same_size[1]["text"]))
    assert [r["id"] for r in res.removed] == ["d-2"]  # equal shingle counts: smallest id kept
    bigger = [{"id": "d-1", "text": text, "domain": "law"}, {"id": "d-9", "text": text + " 마바사", "domain": "law"}]
    res = deduplicate_records(bigger)
    assert [r["id"] for r in res.removed] == ["d-1"]  # more shingles wins over a smaller id
    assert res.removed[0]["representative_id"] == "d-9"


def test_every_record_is_counted_kept_or_removed(corpus, result):
    for domain, c in result.counts.items():
        assert c["before"] == c["after"] + c["exact_removed"] + c["near_removed"], domain
        assert c["after"] == sum(r["domain"] == domain for r in result.kept)
    assert sum(c["before"] for c in result.counts.values()) == len(corpus)
    assert len(result.kept) + len(result.removed) == len(corpus)
    cluster_ids = [r["cluster_id"] for r in result.removed]
    assert result.metrics["clusters"] == len(set(cluster_ids)) == max(cluster_ids) + 1
    assert result.metrics["largest_cluster"] == 4  # law-z (kept) with law-b, law-a and law-x


def test_bad_records_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        deduplicate_records([{"id": "a", "text": "x y z", "domain": "d"}, {"id": "a", "text": "z", "domain": "d"}])
    with pytest.raises(ValueError, match="'text' must be a string"):
        deduplicate_records([{"id": "a", "text": None, "domain": "d"}])
    with pytest.raises(ValueError, match="empty after whitespace normalization"):
        deduplicate_records([{"id": "a", "text": " \n\t", "domain": "d"}])
    with pytest.raises(ValueError, match="record 'a' \\(d\\): text is not valid Unicode"):
        deduplicate_records([{"id": "a", "text": json.loads('"ok \\ud800 bad"'), "domain": "d"}])
    with pytest.raises(ValueError, match="engine"):
        deduplicate_records([{"id": "a", "text": "x", "domain": "d"}], engine="spark")
    with pytest.raises(ValueError, match="lsh_backend"):
        DedupParams(lsh_backend="cassandra").check()


# ------------------------------------------------------------------ stage I/O


def write_inputs(root: Path, corpus) -> None:
    (root / "validated").mkdir(parents=True)
    for domain in ("law", "faq"):
        with (root / "validated" / f"{domain}.jsonl").open("w", encoding="utf-8") as fh:
            for r in corpus:
                if r["domain"] == domain:
                    fh.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")


def test_run_writes_every_output_atomically_and_consistently(tmp_path, corpus):
    write_inputs(tmp_path, corpus)
    out = tmp_path / "dedup"
    metrics = run_stage(
        PARAMS, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=out, work_dir=tmp_path / "work"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    kept = [json.loads(line) for d in ("law", "faq") for line in (out / f"{d}.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in corpus}
    assert all(r == by_id[r["id"]] for r in kept)  # kept records unchanged
    validated = {
        line for d in ("law", "faq") for line in (tmp_path / "validated" / f"{d}.jsonl").read_text().splitlines()
    }
    assert {line for d in ("law", "faq") for line in (out / f"{d}.jsonl").read_text().splitlines()} <= validated
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert {r["id"] for r in kept}.isdisjoint(r["id"] for r in removed)
    assert len(kept) + len(removed) == len(corpus)
    rows = list(csv.DictReader((out / "dedup_log.csv").open()))
    assert [r["domain"] for r in rows] == ["law", "faq"]
    for row in rows:
        assert int(row["before"]) == int(row["after"]) + int(row["exact_removed"]) + int(row["near_removed"])
        assert metrics["per_domain"][row["domain"]]["after"] == int(row["after"])
    text = (out / "candidates.json").read_text()
    cands = json.loads(text)
    assert text == json.dumps(cands, ensure_ascii=False, indent=1) + "\n"  # streamed, same bytes as json.dumps
    assert (cands["bands"], cands["rows"]) == (metrics["bands"], metrics["rows"])
    assert len(cands["pairs"]) == metrics["estimate_kept_pairs"] <= metrics["candidate_pairs"]
    assert metrics["totals"]["before"] == len(corpus) and 0 < metrics["totals"]["removed_rate"] < 1
    assert metrics["lsh"]["p_candidate_at_threshold"] >= 0.99
    assert metrics["lsh"]["datasketch_default"]["p_candidate_at_threshold"] < 0.5  # 256 perms: 17 x 15
    assert metrics["lsh"]["background"]["pairs"] == len(corpus) * (len(corpus) - 1) // 2
    assert set(metrics["steps"]) == set(workflow.STEPS)
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in metrics["steps"].values())
    assert metrics["docs_per_s"] > 0 and metrics["wall_s"] > 0 and metrics["peak_rss_mb_tree"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert list((tmp_path / "work").iterdir()) == []  # intermediates removed after success

    # a failing run leaves the previous output untouched
    (tmp_path / "validated" / "faq.jsonl").write_text('{"id": "q", "text": "x", "domain": "law"}\n')
    with pytest.raises(ValueError, match=r"faq.jsonl:1: record domain 'law' != file domain 'faq'"):
        run_stage(PARAMS, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=out)
    assert len((out / "law.jsonl").read_text().splitlines()) == sum(r["domain"] == "law" for r in kept)


def test_outputs_do_not_depend_on_workers(tmp_path, corpus):
    write_inputs(tmp_path, corpus)
    for w in (1, 2):
        run_stage(
            {**PARAMS, "workers": w}, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=tmp_path / f"w{w}"
        )
    for name in OUTPUTS:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_a_failed_run_resumes_from_its_last_completed_step(tmp_path, corpus, monkeypatch):
    write_inputs(tmp_path, corpus)
    args = dict(input_dir=tmp_path / "validated", work_dir=tmp_path / "work")
    reference = run_stage({**PARAMS, "workers": 1}, ["law", "faq"], output_dir=tmp_path / "ref", **args)
    assert reference["resumed_steps"] == 0

    def crash(self):
        raise RuntimeError("killed during verify")

    with monkeypatch.context() as m:
        m.setattr(workflow.Workflow, "_verify", crash)
        with pytest.raises(RuntimeError, match="killed during verify"):
            run_stage({**PARAMS, "workers": 1}, ["law", "faq"], output_dir=tmp_path / "out", **args)
    (work,) = list((tmp_path / "work").iterdir())
    assert sorted(p.stem for p in (work / "steps").iterdir()) == sorted(
        ["index", "background", "signatures", "exact", "candidates", "estimate"]
    )
    resumed = run_stage({**PARAMS, "workers": 1}, ["law", "faq"], output_dir=tmp_path / "out", **args)
    assert resumed["resumed_steps"] == 6
    assert resumed["steps"]["signatures"]["resumed"] == 1 and resumed["steps"]["verify"]["resumed"] == 0
    for name in OUTPUTS:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    # other inputs or params: a fresh work folder, never a stale one
    assert workflow.fingerprint(
        [("law", str(tmp_path / "validated" / "law.jsonl"))], DedupParams()
    ) != workflow.fingerprint([("law", str(tmp_path / "validated" / "law.jsonl"))], DedupParams(threshold=0.7))


def test_missing_input_and_bad_workers_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_stage(PARAMS, ["missing"], input_dir=tmp_path, output_dir=tmp_path / "o")
    bad = tmp_path / "law.jsonl"
    bad.write_text('{"id": "a", "text": "가나다 라마", "domain": "law"}\nnot json\n')
    with pytest.raises(ValueError, match="law.jsonl:2: not valid JSON"):
        run_stage(PARAMS, ["law"], input_dir=tmp_path, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="workers"):
        run_stage({**PARAMS, "workers": 0}, ["law"], input_dir=tmp_path, output_dir=tmp_path / "o")


def test_stage_main_runs_as_module(tmp_path, corpus):
    write_inputs(tmp_path / "data", corpus)
    (tmp_path / "params.yaml").write_text(
        "domains: [law, faq]\ndedup:\n  num_perm: 256\n  threshold: 0.8\n  min_recall_at_threshold: 0.99\n"
        "  workers: 2\n  lsh_backend: sort\n  redis: {host: 127.0.0.1, port: 6379, basename: dedup}\n"
        "  engine: local\n  work_dir: .cache/dedup\n  seed: 1\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "stages.dedup"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "" and "stages.dedup: " in proc.stderr  # logs through the stage logger, no print()
    metrics = json.loads((tmp_path / "metrics" / "dedup.json").read_text())
    assert metrics["totals"]["before"] == len(corpus) and metrics["ray_engine"] == 0
    assert metrics["stage"]["peak_rss_mb"] > 0
    assert (tmp_path / "data" / "dedup" / "removed.jsonl").exists()


def test_domain_with_empty_file_gets_empty_output_and_zero_counts(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "law.jsonl").write_text("")
    (tmp_path / "v" / "faq.jsonl").write_text(json.dumps({"id": "f", "text": "하나 둘 셋", "domain": "faq"}) + "\n")
    metrics = run_stage({**PARAMS, "workers": 1}, ["law", "faq"], input_dir=tmp_path / "v", output_dir=tmp_path / "o")
    assert list(metrics["per_domain"]) == ["law", "faq"]
    assert metrics["per_domain"]["law"] == {"before": 0, "after": 0, "exact_removed": 0, "near_removed": 0}
    assert (tmp_path / "o" / "law.jsonl").read_text() == ""
    assert len((tmp_path / "o" / "faq.jsonl").read_text().splitlines()) == 1


# ------------------------------------------------------------------ Redis backend


def test_redis_backend_gives_byte_identical_outputs(redis_server, tmp_path, corpus):
    host, port = redis_server
    write_inputs(tmp_path, corpus)
    client = redis.Redis(host=host, port=port)
    table = b"dedup-run_bucket_\x00\x00"  # band 0 of an earlier, interrupted run: must be cleared first
    client.hset(table, b"stale", table + b"stale")
    client.sadd(table + b"stale", b"8", b"15")  # two unrelated documents
    params = {**PARAMS, "lsh_backend": "redis", "redis": {"host": host, "port": port, "basename": "dedup-run"}}
    metrics = run_stage(params, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=tmp_path / "r")
    reference = run_stage(PARAMS, ["law", "faq"], input_dir=tmp_path / "validated", output_dir=tmp_path / "m")
    assert metrics["redis_backend"] == 1 and reference["redis_backend"] == 0
    assert metrics["candidate_pairs"] == reference["candidate_pairs"] > 0
    for name in OUTPUTS:
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "m" / name).read_bytes(), name
    assert list(client.scan_iter(match=b"dedup-run_*")) == []  # the index is removed after use
