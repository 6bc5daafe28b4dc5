"""diff: each domain's task vector Δ = (base with its LoRA merged) − base, from peft's ``get_delta_weight``
(Hu et al. 2021 LoRA, Ilharco et al. 2023 task vectors; :mod:`domainlm.lm.task_vectors`).

Writes ``models/diff/<domain>.safetensors`` (keys = base state-dict names), ``metrics/diff/<domain>.json``,
``plots/task_vector_cosine.csv`` (pairwise cosine of the flattened task vectors, long format) and
``metrics/summary.csv`` (every domain's training figures from ``metrics/train_lora/<domain>.json``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tqdm import tqdm

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import atomic_path, write_text
from domainlm.common.metrics import peak_rss_mb, rows_to_csv
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.common.tracking import mlflow_run
from domainlm.lm.merging import StateDict, load_causal_lm
from domainlm.lm.task_vectors import pairwise_cosine, task_vector, task_vector_stats, training_summary


def run(
    base_dir: str | os.PathLike,
    lora_dir: str | os.PathLike,
    domains: Sequence[str],
    *,
    diff_dir: str | os.PathLike,
    train_metrics_dir: str | os.PathLike,
    cosine_csv: str | os.PathLike,
    summary_csv: str | os.PathLike,
    top_k: int = 5,
) -> dict[str, Any]:
    """Compute, save and describe the task vector of each ``<lora_dir>/<domain>`` adapter on ``base_dir``.

    Writes ``<diff_dir>/<domain>.safetensors`` (float32 Δ per touched base weight; the folder atomically),
    ``cosine_csv`` (domain_a, domain_b, cosine) and ``summary_csv`` (one row per domain from
    ``<train_metrics_dir>/<domain>.json``).

    Returns:
        ``{"task_vectors": {domain: stats}, "cosine": [{domain_a, domain_b, cosine}]}``; stats are
        :func:`~domainlm.lm.task_vectors.task_vector_stats` (relative to the base, ``top_k`` tensors)
        plus ``wall_s`` (seconds for that domain).

    Raises:
        FileNotFoundError: the base, an adapter or a training metrics file is missing.
        ValueError: an adapter is not plain LoRA, or a task vector is all zeros.
    """
    base_state = {k: v.detach().clone() for k, v in load_causal_lm(base_dir).state_dict().items()}
    tvs: dict[str, StateDict] = {}
    stats: dict[str, dict[str, Any]] = {}
    with atomic_path(diff_dir, is_dir=True) as tmp:
        for domain in tqdm(domains, desc="diff", unit="domain"):
            t0 = time.perf_counter()
            tvs[domain] = task_vector(base_dir, Path(lora_dir) / domain)
            save_file(tvs[domain], str(tmp / f"{domain}.safetensors"), metadata={"domain": domain})
            stats[domain] = task_vector_stats(tvs[domain], base_state, top_k=top_k)
            stats[domain]["wall_s"] = time.perf_counter() - t0
    cosine = pairwise_cosine(tvs)
    summary = training_summary({d: Path(train_metrics_dir) / f"{d}.json" for d in domains})
    write_text(cosine_csv, rows_to_csv(cosine, ["domain_a", "domain_b", "cosine"]))
    write_text(summary_csv, rows_to_csv(summary))
    return {"task_vectors": stats, "cosine": cosine}


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("diff", __doc__, argv)
    with stage_run("diff") as st:
        cfg = P.section("diff")
        domains = P.required_domains("diff")
        result = run(
            paths.BASE_DIR,
            paths.LORA_DIR,
            domains,
            diff_dir=paths.DIFF_DIR,
            train_metrics_dir=paths.TRAIN_METRICS_DIR,
            cosine_csv=paths.COSINE_CSV,
            summary_csv=paths.SUMMARY_CSV,
            top_k=int(cfg.get("top_k", 5)),
        )
        stats = result["task_vectors"]
        for domain in domains:
            st.log.info("%s: %d tensors, ‖Δ‖₂ = %.4g", domain, stats[domain]["n_tensors"], stats[domain]["l2_norm"])
        # One metrics file per domain; the folder is replaced whole, so no stale domain's file survives.
        with atomic_path(paths.DIFF_METRICS_DIR, is_dir=True) as tmp:
            into_tmp = dataclasses.replace(st, metrics_root=tmp)
            for domain in domains:
                into_tmp.write_metrics(domain, {**stats[domain], "peak_rss_mb": peak_rss_mb()})
        with mlflow_run("diff", cfg) as mlflow:
            for domain in domains:
                mlflow.log_metrics({f"{domain}.{k}": v for k, v in stats[domain].items() if not isinstance(v, dict)})
            mlflow.log_metrics({f"cosine.{r['domain_a']}.{r['domain_b']}": r["cosine"] for r in result["cosine"]})
            mlflow.log_metrics({"wall_s": st.wall_s(), "peak_rss_mb": peak_rss_mb()})
            mlflow.log_artifact(str(paths.COSINE_CSV))
            mlflow.log_artifact(str(paths.SUMMARY_CSV))


if __name__ == "__main__":
    main(sys.argv[1:])
