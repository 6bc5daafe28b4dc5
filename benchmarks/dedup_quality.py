"""Benchmark the dedup stage: near-duplicate pair recall/precision and throughput.

Ground truth: brute-force exact Jaccard over ALL document pairs (scipy.sparse binary
document × shingle matrix, intersections from X·Xᵀ), built from the readable string
shingles of :func:`domainlm.korean.hangul.shingle_strings` — an implementation independent of the
integer shingle ids the stage uses. Baseline, measured in the same run: plain datasketch
(``MinHash.update_batch`` over the same shingles as UTF-8 strings with the default SHA1
hashfunc, ``MinHashLSH`` with its default banding, one process) on the office_help pages.
Writes ``benchmarks/results/dedup_quality.{json,csv}``.

Timed runs come first (before the brute force fills the heap); each repeat runs every
method once in a rotated order, so background load from other processes hits all alike,
and medians are reported. ``docs_per_s`` of ours is end to end (read the JSONL, exact +
near dedup, write every output); ``ratios.docs_per_s_same_scope`` compares the same work
as the baseline does (shingles, MinHash, LSH; plus our verification). The bars checked:
recall >= 0.95 and precision >= 0.99 against the brute force, >= 1,500 docs/s end to end
on the whole corpus, identical pairs on every repeat and with 1 or 2 workers.

Run from the repository root after ``dvc repro validate``:
``python benchmarks/dedup_quality.py [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the `domainlm` package importable
    sys.path.insert(0, str(REPO))

from domainlm.common.atomic import atomic_path, write_json
from domainlm.common.params import domains as param_domains
from domainlm.common.params import section
from domainlm.dedup.files import deduplicate_domains, read_domain_records, resolve_workers
from domainlm.dedup.minhash_lsh import banding_report, choose_bands_rows, find_near_duplicates
from domainlm.korean.hangul import normalize_text, shingle_strings

RESULTS = Path("benchmarks/results")
BARS = {"recall_min": 0.95, "precision_min": 0.99, "docs_per_s_min": 1500.0}

Pair = tuple[str, str]


def brute_force_pairs(ids: Sequence[str], texts: Sequence[str], threshold: float) -> dict[Pair, float]:
    """Every pair with exact Jaccard >= ``threshold`` over the string shingle sets, all pairs.

    Shingles occurring in one document only cannot intersect and are dropped from the
    matrix before the product (set sizes keep them), which keeps X·Xᵀ exact and fast.

    Returns:
        ``{(id_a, id_b): jaccard}`` with ``id_a < id_b``.
    """
    sets = [shingle_strings(t) for t in tqdm(texts, desc="brute force: string shingles", leave=False)]
    vocab: dict[tuple[str, str], int] = {}
    cols = np.fromiter((vocab.setdefault(s, len(vocab)) for sh in sets for s in sh), dtype=np.int64)
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    x = sp.csr_matrix((np.ones(len(cols), np.int32), (rows, cols)), shape=(len(sets), len(vocab)))
    sizes = np.asarray(x.sum(axis=1)).ravel()
    df = np.asarray(x.sum(axis=0)).ravel()
    xs = x[:, np.flatnonzero(df >= 2)].tocsr()
    inter = sp.triu(xs @ xs.T, k=1).tocoo()
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    hit = jac >= threshold
    return {tuple(sorted((ids[i], ids[j]))): float(v) for i, j, v in zip(inter.row[hit], inter.col[hit], jac[hit])}


def baseline(ids: Sequence[str], texts: Sequence[str], num_perm: int, threshold: float, seed: int
             ) -> tuple[set[Pair], float, tuple[int, int]]:
    """Plain datasketch: string shingles → ``MinHash.update_batch`` (SHA1) → default-banded LSH.

    Returns:
        (candidate pairs, seconds, (bands, rows)); every LSH candidate counts as reported.
    """
    t0 = time.perf_counter()
    sigs = []
    for text in tqdm(texts, desc="baseline: MinHash", leave=False):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(["\t".join(s).encode("utf-8") for s in shingle_strings(text)])  # "jamo\tgram"
        sigs.append(m)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for doc_id, m in zip(ids, sigs):
        lsh.insert(doc_id, m)
    pairs = {tuple(sorted((a, b))) for a, m in zip(ids, sigs) for b in lsh.query(m) if a != b}
    return pairs, time.perf_counter() - t0, (lsh.b, lsh.r)


def ours(ids: Sequence[str], texts: Sequence[str], cfg: dict[str, Any]) -> tuple[set[Pair], int, float]:
    """The stage's near-duplicate search (no exact pass, so every pair is visible).

    Returns:
        (verified pairs, candidate pair count, seconds including normalization).
    """
    t0 = time.perf_counter()
    bands, rows = choose_bands_rows(cfg["num_perm"], cfg["threshold"], cfg["min_recall_at_threshold"])
    near = find_near_duplicates([normalize_text(t) for t in texts], num_perm=cfg["num_perm"], bands=bands,
                                rows=rows, seed=cfg["seed"], workers=resolve_workers(cfg.get("workers")))
    seconds = time.perf_counter() - t0
    return {tuple(sorted((ids[i], ids[j]))) for i, j in near.verified(cfg["threshold"])}, len(near.checked), seconds


def score(reported: set[Pair], truth: dict[Pair, float]) -> dict[str, float]:
    """Pair recall and precision of ``reported`` against ``truth``."""
    tp = len(reported & truth.keys())
    return {"truth_pairs": len(truth), "reported_pairs": len(reported), "true_positives": tp,
            "recall": tp / len(truth) if truth else 1.0,
            "precision": tp / len(reported) if reported else 1.0}


def end_to_end(cfg: dict[str, Any], domains: Sequence[str], input_dir: Path) -> float:
    """Wall seconds of the dedup stage's work, :func:`domainlm.dedup.files.deduplicate_domains`
    (read JSONL → dedup → write outputs) with the in-memory LSH index: the stage's ``wall_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        deduplicate_domains(domains, input_dir, Path(tmp) / "dedup", num_perm=cfg["num_perm"],
                            threshold=cfg["threshold"], min_recall=cfg["min_recall_at_threshold"], seed=cfg["seed"],
                            workers=resolve_workers(cfg.get("workers")))
        return time.perf_counter() - t0


def process_wall(input_dir: Path) -> float:
    """Wall seconds of ``python -m stages.dedup`` as a fresh process (interpreter start and
    imports included), run in a scratch folder holding a copy of params.yaml."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(Path("params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
        (Path(tmp) / "data").mkdir()
        os.symlink(input_dir.resolve(), Path(tmp) / "data" / "validated")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.dedup"], cwd=tmp, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input-dir", type=Path, default=Path("data/validated"))
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    ap.add_argument("--out", type=Path, default=RESULTS / "dedup_quality")
    args = ap.parse_args(argv)

    cfg = {**section("dedup"), "lsh_backend": "memory"}
    domains = param_domains()
    records = [r for d in domains for r in read_domain_records(args.input_dir / f"{d}.jsonl", d)]
    ids = [r["id"] for r in records]
    texts = [r["text"] for r in records]
    office = [k for k, r in enumerate(records) if r["domain"] == "office_help"]
    o_ids, o_texts = [ids[k] for k in office], [texts[k] for k in office]
    load_start = os.getloadavg()[0]

    # timed first, each repeat running every method once in a rotated order (background load
    # from other processes then hits all methods alike)
    methods = {
        "e2e_all": lambda: end_to_end(cfg, domains, args.input_dir),
        "e2e_office": lambda: end_to_end(cfg, ["office_help"], args.input_dir),
        "baseline": lambda: baseline(o_ids, o_texts, cfg["num_perm"], cfg["threshold"], cfg["seed"]),
        "ours_office": lambda: ours(o_ids, o_texts, cfg),
        "ours_all": lambda: ours(ids, texts, cfg),
    }
    timed: dict[str, list] = {name: [] for name in methods}
    names = list(methods)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            timed[name].append(methods[name]())
    e2e_all, e2e_office = timed["e2e_all"], timed["e2e_office"]
    base_runs, ours_office, ours_all = timed["baseline"], timed["ours_office"], timed["ours_all"]
    ours_office_1w = ours(o_ids, o_texts, {**cfg, "workers": 1})
    proc_all = process_wall(args.input_dir)
    base_pairs, _, base_br = base_runs[0]
    base_s = statistics.median(r[1] for r in base_runs)
    load_end = os.getloadavg()[0]

    truth_all = brute_force_pairs(ids, texts, cfg["threshold"])
    office_ids = set(o_ids)
    truth_office = {p: j for p, j in truth_all.items() if p[0] in office_ids and p[1] in office_ids}

    n_all, n_office = len(ids), len(office)
    bands, rows = choose_bands_rows(cfg["num_perm"], cfg["threshold"], cfg["min_recall_at_threshold"])
    base_score = score(base_pairs, truth_office)
    base_verified = {p for p in base_pairs if p in truth_office}
    office_score = score(ours_office[0][0], truth_office)
    all_score = score(ours_all[0][0], truth_all)
    base_dps = n_office / base_s
    ours_office_dps = n_office / statistics.median(e2e_office)
    results = {
        "corpus": {"docs": n_all, "office_help_docs": n_office, "chars": sum(map(len, texts)),
                   "threshold": cfg["threshold"], "num_perm": cfg["num_perm"]},
        "machine": {"cpu_count": os.cpu_count(), "workers": resolve_workers(cfg.get("workers")),
                    "loadavg_1m_start": load_start, "loadavg_1m_end": load_end, "repeats": args.repeats},
        "banding": {"ours": banding_report(cfg["num_perm"], cfg["threshold"], bands, rows),
                    "baseline": banding_report(cfg["num_perm"], cfg["threshold"], *base_br)},
        "office_help": {
            "baseline": {**base_score, "candidate_pairs": len(base_pairs),
                         "candidates_with_exact_jaccard_at_threshold": len(base_verified),
                         "seconds": base_s, "docs_per_s": base_dps},
            "ours": {**office_score, "candidate_pairs": ours_office[0][1],
                     "near_search_seconds": statistics.median(r[2] for r in ours_office),
                     "near_search_seconds_1_worker": ours_office_1w[2],
                     "end_to_end_seconds": statistics.median(e2e_office), "docs_per_s": ours_office_dps},
            "ratios": {"docs_per_s_end_to_end": ours_office_dps / base_dps,
                       "docs_per_s_same_scope": n_office / statistics.median(r[2] for r in ours_office) / base_dps,
                       "recall": office_score["recall"] / base_score["recall"] if base_score["recall"] else 0.0,
                       "precision": office_score["precision"] / base_score["precision"]
                       if base_score["precision"] else 0.0},
        },
        "full_corpus": {
            "ours": {**all_score, "candidate_pairs": ours_all[0][1],
                     "near_search_seconds": statistics.median(r[2] for r in ours_all),
                     "end_to_end_seconds": statistics.median(e2e_all),
                     "end_to_end_seconds_all": e2e_all,
                     "docs_per_s": n_all / statistics.median(e2e_all),
                     "process_wall_seconds": proc_all, "process_docs_per_s": n_all / proc_all},
        },
    }
    deterministic = len({frozenset(r[0]) for r in ours_all}) == 1 and ours_office_1w[0] == ours_office[0][0]
    results["bars"] = {**BARS, "deterministic": deterministic,
                       "passed": bool(all_score["recall"] >= BARS["recall_min"]
                                      and all_score["precision"] >= BARS["precision_min"]
                                      and results["full_corpus"]["ours"]["docs_per_s"] >= BARS["docs_per_s_min"]
                                      and deterministic)}

    write_json(args.out.with_suffix(".json"), results)
    with atomic_path(args.out.with_suffix(".csv")) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "subset", "docs", "truth_pairs", "reported_pairs", "true_positives", "recall",
                    "precision", "seconds", "docs_per_s", "docs_per_s_ratio_vs_baseline"])
        b, o, a = results["office_help"]["baseline"], results["office_help"]["ours"], results["full_corpus"]["ours"]
        w.writerow(["datasketch_default_9x13_sha1", "office_help", n_office, b["truth_pairs"], b["reported_pairs"],
                    b["true_positives"], f"{b['recall']:.4f}", f"{b['precision']:.4f}", f"{b['seconds']:.3f}",
                    f"{b['docs_per_s']:.0f}", "1.00"])
        w.writerow([f"ours_{bands}x{rows}_verified", "office_help", n_office, o["truth_pairs"], o["reported_pairs"],
                    o["true_positives"], f"{o['recall']:.4f}", f"{o['precision']:.4f}",
                    f"{o['end_to_end_seconds']:.3f}", f"{o['docs_per_s']:.0f}",
                    f"{results['office_help']['ratios']['docs_per_s_end_to_end']:.2f}"])
        w.writerow([f"ours_{bands}x{rows}_verified", "all_domains", n_all, a["truth_pairs"], a["reported_pairs"],
                    a["true_positives"], f"{a['recall']:.4f}", f"{a['precision']:.4f}",
                    f"{a['end_to_end_seconds']:.3f}", f"{a['docs_per_s']:.0f}", ""])
    print(f"office_help: baseline recall {b['recall']:.3f} precision {b['precision']:.3f} {b['docs_per_s']:.0f} docs/s | "
          f"ours recall {o['recall']:.3f} precision {o['precision']:.3f} {o['docs_per_s']:.0f} docs/s "
          f"(x{results['office_help']['ratios']['docs_per_s_end_to_end']:.2f})")
    print(f"all domains: ours recall {a['recall']:.3f} precision {a['precision']:.3f} {a['docs_per_s']:.0f} docs/s "
          f"end to end; process incl. interpreter start {a['process_docs_per_s']:.0f} docs/s; "
          f"bars passed: {results['bars']['passed']}")
    return results


if __name__ == "__main__":
    main()
