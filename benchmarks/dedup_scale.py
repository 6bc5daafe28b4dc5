"""Benchmark dedup at corpus scale: 10k, 100k and 1M synthetic Korean documents, both engines, against
plain datasketch and against the dedup code of commit bc056d9 (in memory, not streaming: the reference point).

Corpus (seeded, :func:`generate`): every document joins 6-20 lines drawn from the bundled corpus's
validated documents (about 1.5 KB); 9% of the documents are planted near-duplicate variants of an
earlier one, made by replacing a known share of its words (at least one) with words of other lines
and sometimes dropping a line: edit rates 1%, 3%, 5% and 8% (near duplicates) and 20% and 30%
(near misses, mostly below the threshold). Ground truth: every pair inside a planted family whose
exact Jaccard (:func:`domainlm.korean.hangul.shingle_ids`, the reference shingles) is at or above the
threshold. A method's *found* pairs: ours and bc056d9 — the verified pairs of ``candidates.json``;
datasketch — every candidate pair its LSH index returns (it has no verification). Recall = found ∩
truth / truth, precision = found ∩ truth / found.

Every run is its own process; its wall time is the stage's own ``wall_s`` (read, dedup, write), its
peak memory the largest sum of RSS over the process and all its descendants (pool workers, Ray's
raylet, GCS and workers), sampled every 0.2 s with psutil. Runs are sequential. Writes
``benchmarks/results/dedup_scale.{csv,json}``, each with its ``.meta.json`` sidecar (hardware, commit, date).

Run from the repository root after ``dvc repro validate``:
``python benchmarks/dedup_scale.py [--sizes 10000 100000 1000000] [--engines local ray]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the `domainlm` package importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from measure import write_meta  # noqa: E402
from tqdm import tqdm  # noqa: E402

from domainlm.common.atomic import atomic_path, write_json  # noqa: E402
from domainlm.common.metrics import rows_to_csv  # noqa: E402
from domainlm.dedup.minhash_lsh import jaccard  # noqa: E402
from domainlm.korean.hangul import shingle_ids  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / ".cache" / "dedup_scale"
DOMAINS = ("web", "news")
NEAR_RATES = (0.01, 0.03, 0.05, 0.08)
MISS_RATES = (0.2, 0.3)
TODAY_COMMIT = "bc056d9"
BARS = {
    "recall_min": 0.99,
    "precision_min": 0.99,
    "peak_rss_mb_max_at_1m": 1536.0,
    "docs_per_s_1m_over_10k_min": 0.8,
    "speedup_vs_today_min": 5.0,
}


# ------------------------------------------------------------------ corpus


def line_pool(input_dir: Path) -> list[str]:
    """Distinct lines (>= 10 characters, whitespace collapsed) of the validated bundled corpus, sorted."""
    lines: set[str] = set()
    for path in sorted(input_dir.glob("*.jsonl")):
        if path.name == "rejects.jsonl":
            continue
        for raw in path.open(encoding="utf-8"):
            for line in json.loads(raw)["text"].split("\n"):
                line = " ".join(line.split())
                if len(line) >= 20:
                    lines.add(line)
    return sorted(lines)


def _edit(text: str, rate: float, rng: random.Random, words: Sequence[str]) -> str:
    """``text`` with a ``rate`` share of its words (at least one) replaced by random ``words``; a third of
    the time its last line is dropped as well (lines are joined by '\\n')."""
    lines = text.split("\n")
    if len(lines) > 6 and rng.random() < 1 / 3:
        lines = lines[:-1]
    toks = "\n".join(lines).split(" ")
    k = max(1, round(rate * len(toks)))
    for i in rng.sample(range(len(toks)), min(k, len(toks))):
        toks[i] = rng.choice(words)
    return " ".join(toks)


def generate(n: int, seed: int, input_dir: Path, threshold: float = 0.8, dup_rate: float = 0.09) -> Path:
    """Write the seeded synthetic corpus of ``n`` documents (cached under ``.cache/dedup_scale``).

    Files: ``<domain>.jsonl`` for ``DOMAINS`` (records ``id``, ``text``, ``domain``, ``label``, ``source``)
    and ``truth.json`` (planted pairs with their edit rate and exact Jaccard, ``truth`` = those at or
    above ``threshold``).

    Returns:
        The corpus folder.
    """
    out = CACHE / f"n{n}_s{seed}"
    if (out / "truth.json").exists():
        return out
    rng = random.Random(seed)
    pool = line_pool(input_dir)
    words = sorted({w for line in pool for w in line.split(" ")})
    texts: list[str] = []
    family: list[int] = []  # root document of each document
    rates: list[float] = []
    for i in tqdm(range(n), desc=f"generate {n}", leave=False):
        if texts and rng.random() < dup_rate:
            src = rng.randrange(len(texts))
            root = family[src]
            rate = rng.choice(NEAR_RATES * 2 + MISS_RATES)  # near duplicates twice as often as near misses
            texts.append(_edit(texts[root], rate, rng, words))
            family.append(root)
            rates.append(rate)
        else:
            texts.append("\n".join(rng.choice(pool) for _ in range(rng.randint(6, 20))))
            family.append(i)
            rates.append(0.0)
    members: dict[int, list[int]] = {}
    for i, root in enumerate(family):
        members.setdefault(root, []).append(i)
    planted = []
    for fam in tqdm([m for m in members.values() if len(m) > 1], desc="truth: exact Jaccard", leave=False):
        sets = {i: shingle_ids(texts[i]) for i in fam}
        for x in range(len(fam)):
            for y in range(x + 1, len(fam)):
                i, j = fam[x], fam[y]
                planted.append([i, j, max(rates[i], rates[j]), jaccard(sets[i], sets[j])])
    tmp = Path(tempfile.mkdtemp(prefix=f".n{n}.", dir=CACHE.parent if CACHE.parent.exists() else None))
    handles = {d: (tmp / f"{d}.jsonl").open("w", encoding="utf-8") for d in DOMAINS}
    try:
        for i, text in enumerate(texts):
            d = DOMAINS[rng.randrange(len(DOMAINS))]
            handles[d].write(
                json.dumps(
                    {"id": f"d{i:07d}", "text": text, "domain": d, "label": d, "source": "synthetic"},
                    ensure_ascii=False,
                    separators=(",", ":"),
                )
                + "\n"
            )
    finally:
        for fh in handles.values():
            fh.close()
    truth = [[i, j] for i, j, _, jac in planted if jac >= threshold]
    (tmp / "truth.json").write_text(
        json.dumps(
            {
                "n": n,
                "seed": seed,
                "threshold": threshold,
                "planted": planted,
                "truth": truth,
                "bytes_mean": float(np.mean([len(t.encode()) for t in texts])),
            }
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------ measured runs


def measured(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (process wall s, peak MiB of the summed RSS of it and all its descendants).

    Raises:
        RuntimeError: with the tail of its output when it fails.
    """
    peak = 0.0
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.2):
            total = 0
            try:
                procs = [ps] + ps.children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total / 2**20)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        log.seek(0)
        raise RuntimeError(f"{cmd} exited {rc}:\n{log.read().decode(errors='replace')[-4000:]}")
    return wall, peak


OURS = """
import json, sys
sys.path.insert(0, {repo!r})
from stages.dedup import run
m = run({domains!r}, {inp!r}, {out!r}, num_perm={num_perm}, threshold={threshold}, min_recall=0.99, seed=1,
        workers={workers}, engine={engine!r}, ray={ray!r}, work_dir={work!r})
json.dump(m, open({metrics!r}, "w"))
"""

TODAY = """
import json, sys
sys.path.insert(0, {old!r})
from stages.dedup import run
m = run({{"num_perm": 128, "threshold": {threshold}, "min_recall_at_threshold": 0.99, "workers": {workers},
          "lsh_backend": "memory", "seed": 1}}, {domains!r}, {inp!r}, {out!r})
json.dump(m, open({metrics!r}, "w"))
"""

DATASKETCH = """
import json, sys, time
sys.path.insert(0, {repo!r})
from datasketch import MinHash, MinHashLSH
from domainlm.korean.hangul import shingle_strings
t0 = time.perf_counter()
lsh = MinHashLSH(threshold={threshold}, num_perm=128)
sigs = []
for d in {domains!r}:
    for line in open({inp!r} + "/" + d + ".jsonl", encoding="utf-8"):
        rec = json.loads(line)
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(["\\t".join(s).encode("utf-8") for s in shingle_strings(rec["text"])])
        lsh.insert(rec["id"], m)
        sigs.append((rec["id"], m))
pairs = sorted({{tuple(sorted((a, b))) for a, m in sigs for b in lsh.query(m) if a != b}})
wall = time.perf_counter() - t0
json.dump({{"wall_s": wall, "pairs": pairs, "bands": lsh.b, "rows": lsh.r}}, open({metrics!r}, "w"))
"""


def found_pairs(out_dir: Path) -> set[tuple[int, int]]:
    """Verified pairs of a ``data/dedup``-style folder as generation indices ``(i, j)``, ``i < j``."""
    pairs = json.loads((out_dir / "candidates.json").read_text(encoding="utf-8"))["pairs"]
    return {tuple(sorted((int(p["a"][1:]), int(p["b"][1:])))) for p in pairs if p["verified"]}


def score(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> dict[str, Any]:
    tp = len(found & truth)
    return {
        "truth_pairs": len(truth),
        "found_pairs": len(found),
        "true_positives": tp,
        "recall": tp / len(truth) if truth else 1.0,
        "precision": tp / len(found) if found else 1.0,
    }


def run_ours(corpus: Path, engine: str, workers: int, num_perm: int, threshold: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dedup-scale-") as tmp:
        out, metrics = Path(tmp) / "out", Path(tmp) / "metrics.json"
        code = OURS.format(
            repo=str(REPO),
            domains=list(DOMAINS),
            inp=str(corpus),
            out=str(out),
            num_perm=num_perm,
            threshold=threshold,
            workers=workers,
            engine=engine,
            ray={"object_store_mb": 512},
            work=str(Path(tmp) / "work"),
            metrics=str(metrics),
        )
        wall, peak = measured([sys.executable, "-c", code], REPO)
        m = json.loads(metrics.read_text())
        found = found_pairs(out)
        digests = {p.name: _sha256(p) for p in sorted(out.iterdir())}
    return {
        "wall_s": m["wall_s"],
        "process_wall_s": wall,
        "peak_rss_mb": peak,
        "found": found,
        "metrics": m,
        "candidate_pairs": m["candidate_pairs"],
        "estimate_kept_pairs": m["estimate_kept_pairs"],
        "verified_pairs": m["verified_pairs"],
        "bands": m["bands"],
        "rows": m["rows"],
        "digests": digests,
    }


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_today(corpus: Path, workers: int, threshold: float) -> dict[str, Any]:
    """The dedup stage of commit bc056d9, extracted with ``git archive`` into a temporary folder (not committed)."""
    with tempfile.TemporaryDirectory(prefix="dedup-today-") as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", TODAY_COMMIT, "stages"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        out, metrics = Path(tmp) / "out", Path(tmp) / "metrics.json"
        code = TODAY.format(
            old=str(old),
            threshold=threshold,
            workers=workers,
            domains=list(DOMAINS),
            inp=str(corpus),
            out=str(out),
            metrics=str(metrics),
        )
        wall, peak = measured([sys.executable, "-c", code], old)
        m = json.loads(metrics.read_text())
        found = found_pairs(out)
    return {
        "wall_s": m["wall_s"],
        "process_wall_s": wall,
        "peak_rss_mb": peak,
        "found": found,
        "candidate_pairs": m["candidate_pairs"],
        "verified_pairs": m["verified_pairs"],
        "bands": m["bands"],
        "rows": m["rows"],
    }


def run_datasketch(corpus: Path, threshold: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dedup-ds-") as tmp:
        metrics = Path(tmp) / "metrics.json"
        code = DATASKETCH.format(
            repo=str(REPO), threshold=threshold, domains=list(DOMAINS), inp=str(corpus), metrics=str(metrics)
        )
        wall, peak = measured([sys.executable, "-c", code], REPO)
        m = json.loads(metrics.read_text())
    found = {tuple(sorted((int(a[1:]), int(b[1:])))) for a, b in m["pairs"]}
    return {
        "wall_s": m["wall_s"],
        "process_wall_s": wall,
        "peak_rss_mb": peak,
        "found": found,
        "candidate_pairs": len(found),
        "verified_pairs": None,
        "bands": m["bands"],
        "rows": m["rows"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input-dir", type=Path, default=REPO / "data" / "validated")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--engines", nargs="+", default=["local", "ray"])
    ap.add_argument("--ray-max-size", type=int, default=1_000_000, help="largest size the Ray engine runs")
    ap.add_argument("--baseline-sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--today-size", type=int, default=200_000, help="0 = skip the bc056d9 comparison")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-perm", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", type=Path, default=RESULTS / "dedup_scale")
    args = ap.parse_args(argv)

    rows: list[dict[str, Any]] = []
    sizes = sorted(set(args.sizes) | set(args.baseline_sizes) | ({args.today_size} if args.today_size else set()))
    digests: dict[int, dict[str, Any]] = {}
    for n in sizes:
        corpus = generate(n, args.seed, args.input_dir, args.threshold)
        info = json.loads((corpus / "truth.json").read_text())
        truth = {tuple(p) for p in info["truth"]}
        runs: list[tuple[str, dict[str, Any]]] = []
        if n in args.baseline_sizes:
            runs.append(("datasketch_default", run_datasketch(corpus, args.threshold)))
        if n == args.today_size:
            runs.append((f"today_{TODAY_COMMIT}", run_today(corpus, args.workers, args.threshold)))
        if n in args.sizes or n == args.today_size:
            for engine in args.engines:
                if engine == "ray" and n > args.ray_max_size:
                    continue
                runs.append((engine, run_ours(corpus, engine, args.workers, args.num_perm, args.threshold)))
        for method, r in runs:
            s = score(r["found"], truth)
            row = {
                "docs": n,
                "method": method,
                "wall_s": round(r["wall_s"], 2),
                "docs_per_s": round(n / r["wall_s"], 1),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
                "bands": r["bands"],
                "rows": r["rows"],
                "candidate_pairs": r["candidate_pairs"],
                "candidate_pairs_per_doc": round(r["candidate_pairs"] / n, 4),
                "estimate_kept_pairs": r.get("estimate_kept_pairs"),
                "verified_pairs": r["verified_pairs"],
                "truth_pairs": s["truth_pairs"],
                "found_pairs": s["found_pairs"],
                "recall": round(s["recall"], 5),
                "precision": round(s["precision"], 5),
                "process_wall_s": round(r["process_wall_s"], 2),
                "bytes_per_doc": round(info["bytes_mean"], 1),
            }
            if "metrics" in r:
                lsh = r["metrics"]["lsh"]
                row.update(
                    {
                        "p_candidate_at_j080": round(lsh["p_candidate_at_threshold"], 5),
                        "expected_false_candidate_pairs_per_doc": round(
                            lsh["expected_false_candidate_pairs_per_doc"], 4
                        ),
                        "background_j_median": round(lsh["background"]["j_median"], 4),
                        "background_j_p99": round(lsh["background"]["j_p99"], 4),
                    }
                )
                digests.setdefault(n, {})[method] = r["digests"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(args.out, rows, digests, args)
    return _write(args.out, rows, digests, args)


def _write(out: Path, rows: list[dict[str, Any]], digests: dict[int, dict[str, Any]], args) -> dict[str, Any]:
    by = {(r["docs"], r["method"]): r for r in rows}
    ratios: dict[str, Any] = {}
    small, big = min(args.sizes), max(args.sizes)
    for engine in args.engines:
        if (small, engine) in by and (big, engine) in by:
            ratios[f"{engine}_docs_per_s_{big}_over_{small}"] = (
                by[(big, engine)]["docs_per_s"] / by[(small, engine)]["docs_per_s"]
            )
    today = (args.today_size, f"today_{TODAY_COMMIT}")
    if today in by and (args.today_size, "local") in by:
        ratios["local_over_today_docs_per_s"] = by[(args.today_size, "local")]["docs_per_s"] / by[today]["docs_per_s"]
    for n in args.baseline_sizes:
        if (n, "datasketch_default") in by and (n, "local") in by:
            ratios[f"local_over_datasketch_docs_per_s_{n}"] = (
                by[(n, "local")]["docs_per_s"] / by[(n, "datasketch_default")]["docs_per_s"]
            )
    identical = {
        str(n): len({json.dumps(v, sort_keys=True) for v in d.values()}) == 1 for n, d in digests.items() if len(d) > 1
    }
    ours = [r for r in rows if r["method"] in ("local", "ray")]
    bars = {
        "recall_precision": all(
            r["recall"] >= BARS["recall_min"] and r["precision"] >= BARS["precision_min"] for r in ours
        ),
        "peak_rss_local_1m": all(
            r["peak_rss_mb"] <= BARS["peak_rss_mb_max_at_1m"]
            for r in ours
            if r["docs"] >= 1_000_000 and r["method"] == "local"
        ),
        "linear_local": ratios.get(f"local_docs_per_s_{big}_over_{small}", 0) >= BARS["docs_per_s_1m_over_10k_min"],
        "speedup_vs_today": ratios.get("local_over_today_docs_per_s", 0) >= BARS["speedup_vs_today_min"],
        "engines_byte_identical": all(identical.values()) if identical else None,
    }
    results = {
        "rows": rows,
        "ratios": ratios,
        "byte_identical_engines": identical,
        "bars": {**BARS, **bars},
        "machine": {"cpu_count": os.cpu_count(), "workers": args.workers, "loadavg": os.getloadavg()},
    }
    write_json(out.with_suffix(".json"), results)
    with atomic_path(out.with_suffix(".csv")) as tmp:
        tmp.write_text(rows_to_csv(rows), encoding="utf-8")
    write_meta(out.with_suffix(".json"))
    write_meta(out.with_suffix(".csv"))
    return results


if __name__ == "__main__":
    main()
