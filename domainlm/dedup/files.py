"""The dedup stage's files: read the validated JSONL of each domain, write the ``data/dedup`` folder, and
build ``metrics/dedup.json``. The algorithm itself is :mod:`domainlm.dedup.minhash_lsh`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import resource
from pathlib import Path
from typing import Any, Sequence

from domainlm.common.atomic import atomic_path
from domainlm.common.metrics import peak_rss_mb
from domainlm.dedup.minhash_lsh import DedupResult, datasketch_default_banding, deduplicate
from domainlm.documents.jsonl import JsonlWriters, iter_raw_lines


def read_domain_records(path: str | os.PathLike, domain: str) -> list[dict[str, Any]]:
    """Records of one validated JSONL file; each must be an object whose ``domain`` is ``domain``.

    Raises:
        FileNotFoundError: when ``path`` is missing (run ``dvc repro validate`` first).
        ValueError: on a line that is not a JSON object, or a record of another domain,
            naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the dedup stage reads the validate stage's output")
    records = []
    for lineno, line in enumerate(iter_raw_lines(str(path)), start=1):
        if not line.strip():
            raise ValueError(f"{path}:{lineno}: empty line")
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        if rec.get("domain") != domain:
            raise ValueError(f"{path}:{lineno}: record domain {rec.get('domain')!r} != file domain {domain!r}")
        records.append(rec)
    return records


def write_outputs(result: DedupResult, out_dir: str | os.PathLike, domains: Sequence[str]) -> None:
    """Write the ``data/dedup`` folder atomically (built beside it, then swapped in).

    Files: ``<domain>.jsonl`` (kept records, fields unchanged, one per domain even if empty),
    ``removed.jsonl``, ``candidates.json``, ``dedup_log.csv`` (domain, before, after,
    exact_removed, near_removed).
    """
    with atomic_path(out_dir, is_dir=True) as tmp:
        with JsonlWriters(lambda d: tmp / f"{d}.jsonl") as writers:
            for d in domains:
                writers.ensure(d)
            for rec in result.kept:
                writers.write(rec["domain"], rec)
        with JsonlWriters(lambda _: tmp / "removed.jsonl") as writers:
            writers.ensure("removed")
            for row in result.removed:
                writers.write("removed", row)
        banding = {k: result.banding[k] for k in ("num_perm", "threshold", "bands", "rows")}
        (tmp / "candidates.json").write_text(
            json.dumps({**banding, "pairs": result.candidates}, ensure_ascii=False, indent=1) + "\n",
            encoding="utf-8")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["domain", "before", "after", "exact_removed", "near_removed"])
        for d in domains:
            c = result.counts[d]
            w.writerow([d, c["before"], c["after"], c["exact_removed"], c["near_removed"]])
        (tmp / "dedup_log.csv").write_text(buf.getvalue(), encoding="utf-8")


def resolve_workers(workers: int | None) -> int:
    """``dedup.workers``: ``None`` = the CPU cores this process may use.

    Raises:
        ValueError: when ``workers`` is not ``None`` or a positive integer.
    """
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"dedup.workers must be null or a positive integer, got {workers!r}")
    return workers


def build_metrics(result: DedupResult, wall_s: float, workers: int, backend: str) -> dict[str, Any]:
    """The ``metrics/dedup.json`` content (stable keys; rates in [0, 1]; seconds)."""
    totals = {k: sum(c[k] for c in result.counts.values())
              for k in ("before", "after", "exact_removed", "near_removed")}
    before = totals["before"] or 1
    children_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    s = result.stats
    return {
        "totals": {**totals, "removed_rate": (totals["exact_removed"] + totals["near_removed"]) / before,
                   "exact_removed_rate": totals["exact_removed"] / before,
                   "near_removed_rate": totals["near_removed"] / before},
        "per_domain": result.counts,
        "bands": result.banding["bands"],
        "rows": result.banding["rows"],
        "lsh": {**result.banding, "datasketch_default": datasketch_default_banding(
            result.banding["num_perm"], result.banding["threshold"])},
        "candidate_pairs": s["candidate_pairs"],
        "verified_pairs": s["verified_pairs"],
        "verified_rate": s["verified_pairs"] / s["candidate_pairs"] if s["candidate_pairs"] else 0.0,
        "clusters": s["clusters"],
        "largest_cluster": s["largest_cluster"],
        "workers": workers,
        "redis_backend": int(backend == "redis"),
        "time": {k: s[k] for k in ("exact_s", "signature_s", "lsh_s", "verify_s", "cluster_s")},
        "wall_s": wall_s,
        "docs_per_s": totals["before"] / wall_s if wall_s > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_workers": children_rss,
    }


def deduplicate_domains(domains: Sequence[str], input_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                        num_perm: int, threshold: float, min_recall: float, seed: int, workers: int,
                        lsh_config: dict[str, Any] | None = None) -> DedupResult:
    """Read ``<input_dir>/<domain>.jsonl`` for every domain, :func:`~domainlm.dedup.minhash_lsh.deduplicate`
    them all together, and write ``output_dir`` (:func:`write_outputs`).

    Args:
        domains: domain names, in output order (``counts`` follows it; a domain with an empty
            file gets zero counts and an empty output file).
        num_perm, threshold, min_recall, seed, workers, lsh_config: as for ``deduplicate``.

    Returns:
        The :class:`~domainlm.dedup.minhash_lsh.DedupResult`, ``counts`` in ``domains`` order.

    Raises:
        ValueError: when ``domains`` is empty, and as :func:`read_domain_records` and ``deduplicate``.
        FileNotFoundError: when a domain's input file is missing.
    """
    if not domains:
        raise ValueError("params.yaml has no domains to deduplicate")
    records: list[dict[str, Any]] = []
    for d in domains:
        records.extend(read_domain_records(Path(input_dir) / f"{d}.jsonl", d))
    result = deduplicate(records, num_perm=num_perm, threshold=threshold, min_recall=min_recall, seed=seed,
                         workers=workers, lsh_config=lsh_config)
    zeros = {"before": 0, "after": 0, "exact_removed": 0, "near_removed": 0}
    result.counts = {d: result.counts.get(d, dict(zeros)) for d in domains}  # params order; empty files too
    write_outputs(result, output_dir, domains)
    return result
