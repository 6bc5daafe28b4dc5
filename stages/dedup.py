"""dedup: remove exact and near-duplicate documents across the whole corpus (all domains together).

Exact duplicates by a hash of the normalized text, then MinHash-LSH (Broder 1997; banding as in
"Mining of Massive Datasets", ch. 3) with datasketch-compatible signatures, bands × rows chosen from the
measured background Jaccard, candidate pairs filtered by estimated Jaccard and verified by exact Jaccard,
clusters by union-find (:mod:`domainlm.dedup.minhash_lsh`). The steps stream through an on-disk work
folder (:mod:`domainlm.dedup.workflow`) on a local process pool or on Ray (:mod:`domainlm.dedup.engines`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.dedup.engines import resolve_workers
from domainlm.dedup.files import deduplicate_domains
from domainlm.dedup.workflow import DedupParams

#: The keys of the ``dedup`` section that have no default.
REQUIRED_PARAMS = ("num_perm", "threshold", "min_recall_at_threshold", "lsh_backend", "seed")


def run(
    domains: Sequence[str],
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    num_perm: int,
    threshold: float,
    min_recall: float,
    seed: int,
    workers: int | None = None,
    lsh_backend: str = "sort",
    redis: dict[str, Any] | None = None,
    engine: str = "local",
    ray: dict[str, Any] | None = None,
    work_dir: str | os.PathLike | None = None,
    estimate_sigmas: float = 5.0,
    max_bucket_size: int = 1000,
    background_docs: int = 2000,
    background_pairs: int = 20000,
    max_false_candidates_per_doc: float = 10.0,
) -> dict[str, Any]:
    """Read ``<input_dir>/<domain>.jsonl``, deduplicate, write ``output_dir``; return the metrics.

    Args:
        domains: domain names, in output order.
        input_dir: the validate stage's folder. output_dir: the folder to write (replaced atomically):
            ``<domain>.jsonl``, ``removed.jsonl``, ``candidates.json``, ``dedup_log.csv``.
        num_perm: MinHash permutations. threshold: Jaccard at or above which two documents are near
            duplicates. min_recall: the least P(candidate) at the threshold the banding must reach
            (``dedup.min_recall_at_threshold``). seed: MinHash and sampling seed.
        workers: processes (``engine: local``) or CPUs of a Ray started here; ``None`` = this process's cores.
        lsh_backend: ``"sort"`` (band keys grouped by sorting, on the engine) or ``"redis"`` (a datasketch
            ``MinHashLSH`` index in a Redis server). redis: ``{"host", "port", "basename"}``.
        engine: ``"local"`` or ``"ray"``. ray: ``{"address", "object_store_mb"}`` (``dedup.ray``).
        work_dir: where the intermediates go (resumable); ``None`` = a temporary folder.
        estimate_sigmas, max_bucket_size, background_docs, background_pairs, max_false_candidates_per_doc:
            see ``params.yaml``.

    Returns:
        The ``metrics/dedup.json`` content (:func:`domainlm.dedup.files.build_metrics`).

    Raises:
        ValueError: on an unknown engine or backend, a redis config without host/port, bad ``workers``,
            empty ``domains``, a bad input record or bad parameters.
        FileNotFoundError: when a domain's input file is missing.
    """
    params = DedupParams(
        num_perm=num_perm,
        threshold=threshold,
        min_recall=min_recall,
        seed=seed,
        estimate_sigmas=estimate_sigmas,
        max_bucket_size=max_bucket_size,
        background_docs=background_docs,
        background_pairs=background_pairs,
        max_false_candidates_per_doc=max_false_candidates_per_doc,
        lsh_backend=lsh_backend,
        redis=redis,
    )
    params.check()
    return deduplicate_domains(
        domains,
        input_dir,
        output_dir,
        params=params,
        engine=engine,
        workers=resolve_workers(workers),
        ray=ray,
        work_dir=work_dir,
    )


def main(argv: Sequence[str] = ()) -> None:
    """DVC entry point: params ``domains`` + ``dedup`` -> data/dedup/, metrics/dedup.json."""
    parse_stage_args("dedup", __doc__, argv)
    with stage_run("dedup") as st:
        cfg = P.section("dedup")
        for key in REQUIRED_PARAMS:
            if key not in cfg:
                raise KeyError(f"params.yaml dedup section has no '{key}'")
        optional = {
            k: cfg[k]
            for k in (
                "estimate_sigmas",
                "max_bucket_size",
                "background_docs",
                "background_pairs",
                "max_false_candidates_per_doc",
            )
            if k in cfg
        }
        metrics = run(
            P.required_domains("dedup"),
            paths.VALIDATED_DIR,
            paths.DEDUP_DIR,
            num_perm=cfg["num_perm"],
            threshold=cfg["threshold"],
            min_recall=cfg["min_recall_at_threshold"],
            seed=cfg["seed"],
            workers=cfg.get("workers"),
            lsh_backend=cfg["lsh_backend"],
            redis=cfg.get("redis"),
            engine=cfg.get("engine", "local"),
            ray=cfg.get("ray"),
            work_dir=cfg.get("work_dir"),
            **optional,
        )
        st.write_metrics("dedup", metrics)
        t = metrics["totals"]
        st.log.info(
            "%d -> %d docs (%d exact, %d near); bands x rows = %d x %d (P(candidate | J=%.2f) = %.4f); "
            "%d candidate pairs, %d after the estimate filter, %d verified; %.0f docs/s on %s, "
            "peak RSS %.0f MiB (process tree)",
            t["before"],
            t["after"],
            t["exact_removed"],
            t["near_removed"],
            metrics["bands"],
            metrics["rows"],
            metrics["lsh"]["threshold"],
            metrics["lsh"]["p_candidate_at_threshold"],
            metrics["candidate_pairs"],
            metrics["estimate_kept_pairs"],
            metrics["verified_pairs"],
            metrics["docs_per_s"],
            "ray" if metrics["ray_engine"] else "the local engine",
            metrics["peak_rss_mb_tree"],
        )


if __name__ == "__main__":
    main(sys.argv[1:])
