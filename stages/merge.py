"""merge: combine the domains' task vectors into one model with a method from :mod:`domainlm.lm.merging`
(task arithmetic, TIES, DARE — mergekit-style registry) and write a full HF folder to ``models/merged/``.

Sums dense Δs exactly (peft's ``add_weighted_adapter`` "linear" would combine A and B separately,
adding cross terms). ``metrics/merge.json`` records the method, λ, weights and norms.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.metrics import peak_rss_mb
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.common.tracking import mlflow_run
from domainlm.lm.merging import (
    load_causal_lm,
    load_task_vectors,
    merge,
    merge_report,
    method_options,
    resolve_weights,
    save_merged,
)


def run(
    base_dir: str | os.PathLike,
    diff_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str,
    options: Mapping[str, Any],
    weights: Mapping[str, float],
) -> dict[str, Any]:
    """Merge the task vectors ``<diff_dir>/<domain>.safetensors`` of every domain in ``weights`` into the
    base ``base_dir`` (kept in its saved dtype) and write the merged model plus the base's tokenizer to
    ``out_dir``, atomically.

    Args:
        method: a key of :data:`~domainlm.lm.merging.MERGE_METHODS`.
        options: the method's keyword options, ``lam`` (λ) included (:func:`~domainlm.lm.merging.method_options`).
        weights: ``{domain: weight}``, in domain order (:func:`~domainlm.lm.merging.resolve_weights`).

    Returns:
        metrics: ``method``, ``lam``, ``options`` (the others), :func:`~domainlm.lm.merging.merge_report`'s
        norms, ``wall_s`` (seconds) and ``peak_rss_mb`` (MiB).

    Raises:
        FileNotFoundError: the base or a task vector is missing.
        KeyError: unknown method. ValueError: a task vector does not fit the base.
    """
    start = time.perf_counter()
    model = load_causal_lm(base_dir, dtype="auto")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task_vectors = load_task_vectors(diff_dir, list(weights))
    merged = merge(method, base, task_vectors, weights, **options)
    model.load_state_dict(merged, strict=True)
    save_merged(model, base_dir, out_dir)
    report = merge_report(base, merged, task_vectors, weights)
    return {
        "method": method,
        "lam": options["lam"],
        "options": {k: v for k, v in options.items() if k != "lam"},
        **report,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("merge", __doc__, argv)
    with stage_run("merge") as st:
        cfg = P.section("merge")
        domains = P.required_domains("merge")
        method, options = method_options(cfg)
        weights = resolve_weights(cfg.get("weights"), domains)
        metrics = run(paths.BASE_DIR, paths.DIFF_DIR, paths.MERGED_DIR, method, options, weights)
        metrics_path = st.write_metrics("merge", metrics)
        st.log.info(
            "%s merge of %s (λ=%s): ‖update‖₂ = %.4g", method, domains, options["lam"], metrics["merged_update_l2_norm"]
        )
        with mlflow_run("merge", cfg) as mlflow:
            mlflow.log_metrics(
                {
                    "merged_update_l2_norm": metrics["merged_update_l2_norm"],
                    "wall_s": metrics["wall_s"],
                    "peak_rss_mb": metrics["peak_rss_mb"],
                }
            )
            mlflow.log_metrics(
                {f"{d}.cosine_to_merged_update": v["cosine_to_merged_update"] for d, v in metrics["domains"].items()}
            )
            mlflow.log_artifact(str(metrics_path))


if __name__ == "__main__":
    main(sys.argv[1:])
