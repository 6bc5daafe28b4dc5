"""dedup: remove exact and near-duplicate documents across the whole corpus (all domains together).

Exact duplicates by a hash of the normalized text, then MinHash-LSH (Broder 1997; banding as in
"Mining of Massive Datasets", ch. 3) with datasketch, bands × rows chosen for recall as text-dedup
does, candidate pairs verified by exact Jaccard, clusters by union-find (:mod:`domainlm.dedup.minhash_lsh`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.stage import stage_run
from domainlm.dedup.files import build_metrics, deduplicate_domains, resolve_workers
from domainlm.dedup.minhash_lsh import storage_config

#: The keys of the ``dedup`` section that have no default.
REQUIRED_PARAMS = ("num_perm", "threshold", "min_recall_at_threshold", "lsh_backend", "seed")


def run(domains: Sequence[str], input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, num_perm: int,
        threshold: float, min_recall: float, seed: int, workers: int | None = None, lsh_backend: str = "memory",
        redis: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read ``<input_dir>/<domain>.jsonl``, deduplicate, write ``output_dir``; return the metrics.

    Args:
        domains: domain names, in output order.
        input_dir: the validate stage's folder. output_dir: the folder to write (replaced atomically):
            ``<domain>.jsonl``, ``removed.jsonl``, ``candidates.json``, ``dedup_log.csv``.
        num_perm: MinHash permutations. threshold: Jaccard at or above which two documents are near
            duplicates. min_recall: the least P(candidate) at the threshold the banding must reach
            (``dedup.min_recall_at_threshold``). seed: MinHash seed.
        workers: processes for the signatures; ``None`` = the CPU cores this process may use.
        lsh_backend: ``"memory"`` or ``"redis"`` (the LSH index in a Redis server).
        redis: ``{"host", "port", "basename"}`` for ``lsh_backend="redis"``.

    Returns:
        The ``metrics/dedup.json`` content (:func:`domainlm.dedup.files.build_metrics`).

    Raises:
        ValueError: on an unknown backend, a redis config without host/port, bad ``workers``,
            empty ``domains``, a bad input record or bad parameters.
        FileNotFoundError: when a domain's input file is missing.
    """
    t0 = time.perf_counter()
    config = storage_config(lsh_backend, redis)
    n_workers = resolve_workers(workers)
    result = deduplicate_domains(domains, input_dir, output_dir, num_perm=num_perm, threshold=threshold,
                                 min_recall=min_recall, seed=seed, workers=n_workers, lsh_config=config)
    return build_metrics(result, time.perf_counter() - t0, n_workers, lsh_backend)


def main() -> None:
    """DVC entry point: params ``domains`` + ``dedup`` -> data/dedup/, metrics/dedup.json."""
    with stage_run("dedup") as st:
        cfg = P.section("dedup")
        for key in REQUIRED_PARAMS:
            if key not in cfg:
                raise KeyError(f"params.yaml dedup section has no '{key}'")
        metrics = run(P.domains(), paths.VALIDATED_DIR, paths.DEDUP_DIR, num_perm=cfg["num_perm"],
                      threshold=cfg["threshold"], min_recall=cfg["min_recall_at_threshold"], seed=cfg["seed"],
                      workers=cfg.get("workers"), lsh_backend=cfg["lsh_backend"], redis=cfg.get("redis"))
        st.write_metrics("dedup", metrics)
        t = metrics["totals"]
        st.log.info("%d -> %d docs (%d exact, %d near); bands x rows = %d x %d; %d candidate pairs, %d verified; "
                    "%.0f docs/s", t["before"], t["after"], t["exact_removed"], t["near_removed"], metrics["bands"],
                    metrics["rows"], metrics["candidate_pairs"], metrics["verified_pairs"], metrics["docs_per_s"])


if __name__ == "__main__":
    main()
