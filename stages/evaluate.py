"""evaluate: perplexity of the merged model on every domain's test split, set against the base's and every
expert's (base + its task vector) from ``evaluate_experts``; greedy continuations scored with BLEU/chrF/ROUGE-L;
and the quality gate that registers ``models/merged`` in the MLflow Model Registry as ``champion`` or
``challenger``. Only the merged model is scored here, so an experiment on the merge re-runs one perplexity pass.

Perplexity follows the Hugging Face sliding-window recipe (:mod:`domainlm.lm.evaluation`); retained gain is
(ppl_base − ppl_merged) / (ppl_base − ppl_expert) on the expert's own domain (:mod:`domainlm.lm.gate`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import write_text
from domainlm.common.compute import autocast, resolve
from domainlm.common.metrics import flatten_numbers, peak_rss_mb, rows_to_csv
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.common.tracking import mlflow_run
from domainlm.lm.evaluation import (
    PerplexityProbe,
    check_reference,
    comparison_markdown,
    continuation_scores,
    read_test_split,
    read_train_log,
    retained_gains,
)
from domainlm.lm.gate import check_gate, record_verdict
from domainlm.lm.merging import load_causal_lm


def run(
    domains: Sequence[str],
    cfg: Mapping[str, Any],
    mlflow,
    *,
    base_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    reference_json: str | os.PathLike,
    split_dir: str | os.PathLike,
    log_dir: str | os.PathLike,
    perplexity_csv: str | os.PathLike,
    train_loss_csv: str | os.PathLike,
    comparison_md: str | os.PathLike,
    alerts_json: str | os.PathLike,
    compute=None,
) -> dict[str, Any]:
    """Measure the merged model against the reference perplexities, apply the gate and register the merged model.

    Reads ``base_dir`` (HF folder with tokenizer; the base's continuations), ``merged_dir``, ``reference_json``
    (``evaluate_experts``: the base's and the experts' perplexities), ``<split_dir>/<domain>/test.parquet`` and
    ``<log_dir>/train_<domain>.log``. Writes ``perplexity_csv``
    (model, domain, perplexity), ``train_loss_csv`` (domain, step, loss, eval_loss), ``comparison_md``
    (base vs merged continuations) and ``alerts_json`` (the gate's verdict), and logs them, the flat
    metrics and the registered model to the active MLflow run.

    Args:
        cfg: the ``evaluate`` params section (seed, max_length, stride, batch_size,
            max_tokens_per_domain, bleu_tokenize, continuation, gate, registry).
        mlflow: the ``mlflow`` module inside an active run.
        compute: the compute policy (:mod:`domainlm.common.compute`): the perplexity passes run under its autocast
            (None = fp32). Greedy decoding stays fp32 on one thread
            (:func:`~domainlm.lm.evaluation.greedy_continuations`).

    Returns:
        metrics: ``perplexity`` ({model: {domain: ppl}}), ``retained_gain``, ``mean_retained_gain``,
        ``bleu``/``chrf``/``rougeL`` ({model: {domain: score}}), ``tokens``, ``timing`` (seconds,
        tokens/s), ``settings``, ``gate`` ({passed: 0|1, n_failures}), ``wall_s``, ``peak_rss_mb`` (MiB).

    Raises:
        FileNotFoundError: a model, the reference perplexities, a split file or a training log is missing.
        ValueError: an empty test split, no test document long enough for a continuation, or reference
            perplexities measured on other token streams or windows (:func:`~domainlm.lm.evaluation.check_reference`).
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = load_causal_lm(base_dir)
    merged = load_causal_lm(merged_dir)
    texts = {d: read_test_split(split_dir, d, int(cfg.get("seed", 0))) for d in domains}
    probe = PerplexityProbe.from_params(cfg, tokenizer, texts, model.config.max_position_embeddings)
    with open(reference_json, encoding="utf-8") as fh:
        reference = check_reference(json.load(fh), probe, list(domains))

    # The merged model's perplexity on every domain's test stream (the base's and the experts' are the reference).
    t0 = time.perf_counter()
    with autocast(compute):
        merged_ppl = probe.run(merged, "merged")
    ppl: dict[str, dict[str, float]] = {
        "base": reference["base"],
        "merged": merged_ppl,
        **{f"expert_{d}": reference[f"expert_{d}"] for d in domains},
    }
    perplexity_s = time.perf_counter() - t0

    # Greedy continuations of the base and the merged model, scored against the documents' next tokens.
    cont_cfg = cfg.get("continuation") or {}
    cont = continuation_scores(
        tokenizer, texts, {"base": model, "merged": merged}, cont_cfg, cfg.get("bleu_tokenize", "char")
    )
    continuation_s = time.perf_counter() - t0 - perplexity_s

    retained = retained_gains(ppl, list(domains))
    failures = check_gate(ppl, retained, cfg.get("gate") or {})
    metrics = {
        "perplexity": ppl,
        "retained_gain": retained,
        "mean_retained_gain": sum(retained.values()) / len(retained),
        **cont["scores"],
        "tokens": {
            "perplexity_stream": {d: int(ids.numel()) for d, ids in probe.streams.items()},
            "continuation_pairs": cont["pairs"],
            "continuation_docs_too_short": cont["too_short"],
        },
        "timing": {
            "perplexity_s": perplexity_s,
            "continuation_s": continuation_s,
            "scored_tokens_per_s": sum(ids.numel() - 1 for ids in probe.streams.values()) / perplexity_s,
        },
        "settings": {
            "max_length": probe.max_length,
            "stride": probe.stride,
            "prompt_tokens": int(cont_cfg.get("prompt_tokens", 32)),
            "new_tokens": int(cont_cfg.get("new_tokens", 32)),
        },
        "gate": {"passed": int(not failures), "n_failures": len(failures)},
    }

    ppl_rows = [{"model": name, "domain": d, "perplexity": v} for name, per in ppl.items() for d, v in per.items()]
    loss_rows = [{"domain": d, **row} for d in domains for row in read_train_log(paths.train_log_path(d, log_dir))]
    write_text(perplexity_csv, rows_to_csv(ppl_rows, ["model", "domain", "perplexity"]))
    write_text(train_loss_csv, rows_to_csv(loss_rows, ["domain", "step", "loss", "eval_loss"]))
    write_text(comparison_md, comparison_markdown(cont["samples"], metrics["settings"]))

    mlflow.log_metrics({k: v for k, v in flatten_numbers(metrics).items() if math.isfinite(v)})
    record_verdict(
        mlflow,
        failures,
        mean_retained_gain=metrics["mean_retained_gain"],
        model_dir=merged_dir,
        model_name=(cfg.get("registry") or {}).get("model_name", "domain-lm-merged"),
        thresholds=cfg.get("gate") or {},
        alerts_json=alerts_json,
    )
    for path in (perplexity_csv, train_loss_csv, comparison_md, alerts_json):
        mlflow.log_artifact(str(path))
    metrics["wall_s"] = time.perf_counter() - start
    metrics["peak_rss_mb"] = peak_rss_mb()
    return metrics


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("evaluate", __doc__, argv)
    with stage_run("evaluate") as st:
        cfg = P.section("evaluate")
        domains = P.required_domains("evaluate")
        compute = st.use_compute(resolve(P.load_params().get("compute")))
        with mlflow_run("evaluate", cfg) as mlflow:
            metrics = run(
                domains,
                cfg,
                mlflow,
                compute=compute,
                base_dir=paths.BASE_DIR,
                merged_dir=paths.MERGED_DIR,
                reference_json=paths.REFERENCE_PERPLEXITY_JSON,
                split_dir=paths.LM_DATA_DIR,
                log_dir=paths.LOG_DIR,
                perplexity_csv=paths.PERPLEXITY_CSV,
                train_loss_csv=paths.TRAIN_LOSS_CSV,
                comparison_md=paths.COMPARISON_MD,
                alerts_json=paths.ALERTS_JSON,
            )
            st.write_metrics("evaluate", metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
