"""evaluate: perplexity of the base, every expert (base + its task vector) and the merged model on every
domain's test split, greedy continuations scored with BLEU/chrF/ROUGE-L, and the quality gate that
registers ``models/merged`` in the MLflow Model Registry as ``champion`` or ``challenger``.

Perplexity follows the Hugging Face sliding-window recipe (:mod:`domainlm.lm.evaluation`); retained gain is
(ppl_base − ppl_merged) / (ppl_base − ppl_expert) on the expert's own domain (:mod:`domainlm.lm.gate`).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping, Sequence

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import write_text
from domainlm.common.compute import autocast, resolve
from domainlm.common.metrics import flatten_numbers, peak_rss_mb, rows_to_csv
from domainlm.common.stage import stage_run
from domainlm.common.tracking import mlflow_run
from domainlm.lm.evaluation import (PerplexityProbe, comparison_markdown, continuation_scores, expert_states,
                                    read_test_split, read_train_log, retained_gains)
from domainlm.lm.gate import check_gate, record_verdict
from domainlm.lm.merging import load_causal_lm, load_task_vectors


def run(domains: Sequence[str], cfg: Mapping[str, Any], mlflow, *, base_dir: str | os.PathLike,
        merged_dir: str | os.PathLike, diff_dir: str | os.PathLike, split_dir: str | os.PathLike,
        log_dir: str | os.PathLike, perplexity_csv: str | os.PathLike, train_loss_csv: str | os.PathLike,
        comparison_md: str | os.PathLike, alerts_json: str | os.PathLike, compute=None) -> dict[str, Any]:
    """Measure the base, the experts and the merged model, apply the gate and register the merged model.

    Reads ``base_dir`` (HF folder with tokenizer), ``merged_dir``, ``<diff_dir>/<domain>.safetensors``,
    ``<split_dir>/<domain>/test.parquet`` and ``<log_dir>/train_<domain>.log``. Writes ``perplexity_csv``
    (model, domain, perplexity), ``train_loss_csv`` (domain, step, loss, eval_loss), ``comparison_md``
    (base vs merged continuations) and ``alerts_json`` (the gate's verdict), and logs them, the flat
    metrics and the registered model to the active MLflow run.

    Args:
        cfg: the ``evaluate`` params section (seed, max_length, stride, batch_size,
            max_tokens_per_domain, bleu_tokenize, continuation, gate, registry).
        mlflow: the ``mlflow`` module inside an active run.
        compute: the compute policy (:mod:`domainlm.common.compute`): the perplexity passes run under its autocast
            (None = fp32). Greedy decoding stays fp32 on one thread (:func:`~domainlm.lm.evaluation.greedy_continuations`).

    Returns:
        metrics: ``perplexity`` ({model: {domain: ppl}}), ``retained_gain``, ``mean_retained_gain``,
        ``bleu``/``chrf``/``rougeL`` ({model: {domain: score}}), ``tokens``, ``timing`` (seconds,
        tokens/s), ``settings``, ``gate`` ({passed: 0|1, n_failures}), ``wall_s``, ``peak_rss_mb`` (MiB).

    Raises:
        FileNotFoundError: a model, task vector, split file or training log is missing.
        ValueError: an empty test split, or no test document long enough for a continuation.
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = load_causal_lm(base_dir)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = load_causal_lm(merged_dir)
    task_vectors = load_task_vectors(diff_dir, list(domains))
    texts = {d: read_test_split(split_dir, d, int(cfg.get("seed", 0))) for d in domains}
    probe = PerplexityProbe.from_params(cfg, tokenizer, texts, model.config.max_position_embeddings)

    # Perplexity of every model on every domain's test stream; the experts reuse the base model's weights.
    t0 = time.perf_counter()
    with autocast(compute):
        ppl: dict[str, dict[str, float]] = {"base": probe.run(model, "base"), "merged": probe.run(merged, "merged")}
        for domain, state in expert_states(base_state, task_vectors):
            model.load_state_dict(state, strict=True)
            ppl[f"expert_{domain}"] = probe.run(model, f"expert_{domain}")
    model.load_state_dict(base_state, strict=True)
    perplexity_s = time.perf_counter() - t0

    # Greedy continuations of the base and the merged model, scored against the documents' next tokens.
    cont_cfg = cfg.get("continuation") or {}
    cont = continuation_scores(tokenizer, texts, {"base": model, "merged": merged}, cont_cfg,
                               cfg.get("bleu_tokenize", "char"))
    continuation_s = time.perf_counter() - t0 - perplexity_s

    retained = retained_gains(ppl, list(domains))
    failures = check_gate(ppl, retained, cfg.get("gate") or {})
    metrics = {
        "perplexity": ppl,
        "retained_gain": retained,
        "mean_retained_gain": sum(retained.values()) / len(retained),
        **cont["scores"],
        "tokens": {"perplexity_stream": {d: int(ids.numel()) for d, ids in probe.streams.items()},
                   "continuation_pairs": cont["pairs"], "continuation_docs_too_short": cont["too_short"]},
        "timing": {"perplexity_s": perplexity_s, "continuation_s": continuation_s,
                   "scored_tokens_per_s": sum(ids.numel() - 1 for ids in probe.streams.values()) * len(ppl) / perplexity_s},
        "settings": {"max_length": probe.max_length, "stride": probe.stride,
                     "prompt_tokens": int(cont_cfg.get("prompt_tokens", 32)), "new_tokens": int(cont_cfg.get("new_tokens", 32))},
        "gate": {"passed": int(not failures), "n_failures": len(failures)},
    }

    ppl_rows = [{"model": name, "domain": d, "perplexity": v} for name, per in ppl.items() for d, v in per.items()]
    loss_rows = [{"domain": d, **row} for d in domains for row in read_train_log(paths.train_log_path(d, log_dir))]
    write_text(perplexity_csv, rows_to_csv(ppl_rows, ["model", "domain", "perplexity"]))
    write_text(train_loss_csv, rows_to_csv(loss_rows, ["domain", "step", "loss", "eval_loss"]))
    write_text(comparison_md, comparison_markdown(cont["samples"], metrics["settings"]))

    mlflow.log_metrics({k: v for k, v in flatten_numbers(metrics).items() if math.isfinite(v)})
    record_verdict(mlflow, failures, mean_retained_gain=metrics["mean_retained_gain"], model_dir=merged_dir,
                   model_name=(cfg.get("registry") or {}).get("model_name", "domain-lm-merged"),
                   thresholds=cfg.get("gate") or {}, alerts_json=alerts_json)
    for path in (perplexity_csv, train_loss_csv, comparison_md, alerts_json):
        mlflow.log_artifact(str(path))
    metrics["wall_s"] = time.perf_counter() - start
    metrics["peak_rss_mb"] = peak_rss_mb()
    return metrics


def main() -> None:
    with stage_run("evaluate") as st:
        cfg = P.section("evaluate")
        domains = P.domains()
        if not domains:
            raise SystemExit("evaluate: params.yaml lists no domains")
        compute = st.use_compute(resolve(P.section("compute")))
        with mlflow_run("evaluate", cfg) as mlflow:
            metrics = run(domains, cfg, mlflow, compute=compute, base_dir=paths.BASE_DIR, merged_dir=paths.MERGED_DIR,
                          diff_dir=paths.DIFF_DIR, split_dir=paths.SPLIT_DIR, log_dir=paths.LOG_DIR,
                          perplexity_csv=paths.PERPLEXITY_CSV, train_loss_csv=paths.TRAIN_LOSS_CSV,
                          comparison_md=paths.COMPARISON_MD, alerts_json=paths.ALERTS_JSON)
            st.write_metrics("evaluate", metrics)


if __name__ == "__main__":
    main()
