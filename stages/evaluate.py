"""evaluate: perplexity of the base, every expert (base + its task vector) and the merged model on
every domain's test split, greedy continuations scored with BLEU/chrF/ROUGE-L, and the quality gate
that registers ``models/merged`` in the MLflow Model Registry as ``champion`` or ``challenger``.

Perplexity follows the Hugging Face sliding-window recipe (:mod:`stages.lm_eval`); retained gain is
(ppl_base − ppl_merged) / (ppl_base − ppl_expert) on the expert's own domain.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from stages import params as P
from stages.atomic import write_json, write_text
from stages.diff import rows_to_csv
from stages.lm_data import read_texts, split_path
from stages.lm_eval import (continuation_pairs, greedy_continuations, perplexity, text_scores, token_stream,
                             torch_threads)
from stages.merging import linear, load_causal_lm, load_task_vectors
from stages.metrics import flatten_numbers, peak_rss_mb, write_metrics
from stages.tracking import stage_run

log = logging.getLogger("evaluate")

BASE_DIR = Path("models/base")
DIFF_DIR = Path("models/diff")
MERGED_DIR = Path("models/merged")
SPLIT_DIR = Path("data/split")
LOG_DIR = Path("logs")
COMPARISON_MD = Path("eval/eval_prompt_comparison.md")
PERPLEXITY_CSV = Path("plots/perplexity.csv")
TRAIN_LOSS_CSV = Path("plots/train_loss.csv")
ALERTS_JSON = Path("metrics/alerts.json")


# ----------------------------------------------------------------------------------------- inputs
def read_test_split(split_dir: str | Path, domain: str, seed: int | None = None) -> list[str]:
    """The ``text`` column of ``<split_dir>/<domain>/test.parquet`` (:func:`stages.lm_data.read_texts`),
    in file order, or shuffled with ``random.Random(f"{seed}-{domain}")`` when ``seed`` is given, so
    that token caps take a representative, reproducible sample rather than the file's first rows.

    Raises:
        FileNotFoundError: the file is missing. ValueError: no ``text`` column, a null text, no rows.
    """
    path = split_path(split_dir, domain, "test")
    texts = read_texts(path)
    if not texts:
        raise ValueError(f"test split {path} has no rows")
    if seed is not None:
        random.Random(f"{seed}-{domain}").shuffle(texts)
    return texts


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """Loss curve of one ``logs/train_<domain>.log`` (JSON lines): rows ``{step, loss, eval_loss}``
    merged by step in step order, ``None`` where a step logged only one of them. Lines holding
    neither ``loss`` nor ``eval_loss`` (e.g. the end-of-training summary) are not curve points.

    Raises:
        FileNotFoundError: the log is missing.
        ValueError: a line is not a JSON object, or a loss line has no ``step`` (file:line named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {path} is missing: run train_lora")
    by_step: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        if "loss" not in rec and "eval_loss" not in rec:
            continue
        if "step" not in rec:
            raise ValueError(f"{path}:{lineno}: loss record without 'step'")
        row = by_step.setdefault(int(rec["step"]), {"step": int(rec["step"]), "loss": None, "eval_loss": None})
        for key in ("loss", "eval_loss"):
            if key in rec:
                row[key] = float(rec[key])
    return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------------------------- evaluation
def expert_states(base_state: Mapping, task_vectors: Mapping[str, Mapping]) -> Iterator[tuple[str, dict]]:
    """Yield ``(domain, state dict)`` of each expert: base + its Δ (linear, weight 1, λ = 1), which
    equals peft's ``merge_and_unload`` of that LoRA to float tolerance (tests/test_merge.py)."""
    for domain, tv in task_vectors.items():
        yield domain, linear(base_state, {domain: tv}, {domain: 1.0}, lam=1.0)


def retained_gains(ppl: Mapping[str, Mapping[str, float]], domains: list[str]) -> dict[str, float]:
    """(ppl_base − ppl_merged) / (ppl_base − ppl_expert_d) on each domain d.

    1 = the merge keeps all of the expert's gain over the base, 0 = none, < 0 = worse than the
    base. When the expert is not better than the base (denominator ≤ 0) there is no gain to
    retain and the value is 0.0; :func:`check_gate` reports such a domain separately.
    """
    out = {}
    for d in domains:
        gain = ppl["base"][d] - ppl[f"expert_{d}"][d]
        out[d] = (ppl["base"][d] - ppl["merged"][d]) / gain if gain > 0 else 0.0
    return out


def check_gate(ppl: Mapping[str, Mapping[str, float]], retained: Mapping[str, float],
               gate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Failing figures of the quality gate; an empty list means PASS.

    Rules (each skipped when its threshold is null in params):
      - ``min_mean_retained_gain``: mean retained gain ≥ threshold;
      - ``max_perplexity``: merged perplexity ≤ threshold on every domain;
      - ``merged_below_base`` (bool): merged perplexity < base perplexity on every domain;
      - always: each expert's perplexity on its own domain < the base's (else no gain exists).

    Returns:
        ``[{"rule", "metric", "value", "threshold"}]``.
    """
    failures = []
    domains = list(retained)
    for d in domains:
        if ppl[f"expert_{d}"][d] >= ppl["base"][d]:
            failures.append({"rule": "expert_below_base", "metric": f"perplexity.expert_{d}.{d}",
                             "value": ppl[f"expert_{d}"][d], "threshold": ppl["base"][d]})
    mean_gain = sum(retained.values()) / len(retained)
    if gate.get("min_mean_retained_gain") is not None and mean_gain < gate["min_mean_retained_gain"]:
        failures.append({"rule": "min_mean_retained_gain", "metric": "mean_retained_gain",
                         "value": mean_gain, "threshold": float(gate["min_mean_retained_gain"])})
    for d in domains:
        if gate.get("max_perplexity") is not None and ppl["merged"][d] > gate["max_perplexity"]:
            failures.append({"rule": "max_perplexity", "metric": f"perplexity.merged.{d}",
                             "value": ppl["merged"][d], "threshold": float(gate["max_perplexity"])})
        if gate.get("merged_below_base") and ppl["merged"][d] >= ppl["base"][d]:
            failures.append({"rule": "merged_below_base", "metric": f"perplexity.merged.{d}",
                             "value": ppl["merged"][d], "threshold": ppl["base"][d]})
    return failures


def register_merged(mlflow, model_dir: str | Path, model_name: str, passed: bool,
                    tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Log ``model_dir`` as the active run's ``model`` artifact folder, register it as a new
    version of ``model_name`` and point alias ``champion`` (gate passed) or ``challenger``
    (failed) at it. A failed gate leaves the existing ``champion`` alias where it was.

    The folder is logged as plain artifacts and registered with ``MlflowClient.create_model_version``
    on the run's artifact URI (works offline with a sqlite store; ``mlflow.register_model`` in
    MLflow 3 wants a logged-model object instead).

    Returns:
        ``{"name", "version", "alias", "source"}``.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run = mlflow.active_run()
    mlflow.log_artifacts(str(model_dir), artifact_path="model")
    source = mlflow.get_artifact_uri("model")
    client = MlflowClient()
    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(model_name, description="Merged domain language model (stages.merge).")
    version = client.create_model_version(model_name, source=source, run_id=run.info.run_id, tags=dict(tags or {}))
    alias = "champion" if passed else "challenger"
    client.set_registered_model_alias(model_name, alias, version.version)
    return {"name": model_name, "version": int(version.version), "alias": alias, "source": source}


# ---------------------------------------------------------------------------------------- outputs
def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ⏎ ")


def comparison_markdown(samples: Mapping[str, list[dict[str, str]]], settings: Mapping[str, Any]) -> str:
    """Markdown: per domain a table of prompt, reference, base and merged continuation."""
    lines = ["# Base vs merged: greedy continuations", "",
             f"Prompt = a test document's first {settings['prompt_tokens']} tokens; reference = its next "
             f"{settings['new_tokens']} tokens; both models decode {settings['new_tokens']} tokens greedily.", ""]
    for domain, rows in samples.items():
        lines += [f"## {domain}", "", "| prompt | reference | base | merged |", "|---|---|---|---|"]
        lines += [f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['base'])} | {_cell(r['merged'])} |"
                  for r in rows]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
@dataclass
class PerplexityProbe:
    """Fixed test token streams and window settings, so every model is measured on the same tokens."""

    streams: dict[str, torch.Tensor]  # domain -> int64 (n,) token stream
    max_length: int
    stride: int
    batch_size: int

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any], tokenizer, texts: Mapping[str, list[str]], context: int) -> "PerplexityProbe":
        """Streams of at most ``max_tokens_per_domain`` tokens; ``max_length`` defaults to ``context``
        (the model's ``max_position_embeddings``), ``stride`` to half of it."""
        max_length = int(cfg.get("max_length") or context)
        return cls(streams={d: token_stream(tokenizer, t, cfg.get("max_tokens_per_domain")) for d, t in texts.items()},
                   max_length=max_length, stride=int(cfg.get("stride") or max_length // 2),
                   batch_size=int(cfg.get("batch_size", 8)))

    def run(self, model, name: str) -> dict[str, float]:
        """``{domain: perplexity}`` of ``model`` on every stream."""
        return {d: perplexity(model, ids, self.max_length, self.stride, self.batch_size, desc=f"ppl {name}/{d}")["perplexity"]
                for d, ids in self.streams.items()}


def continuation_scores(tokenizer, texts: Mapping[str, list[str]], models: Mapping[str, Any], cont: Mapping[str, Any],
                        bleu_tokenize: str = "char") -> dict[str, Any]:
    """Greedy continuations of every model on each domain's first ``n_docs`` long-enough test
    documents, scored against the documents' own next tokens.

    Returns:
        ``{"scores": {metric: {model: {domain: value}}}, "samples": {domain: [row]}, "pairs":
        {domain: n}, "too_short": {domain: n}}``; a sample row holds prompt, reference and one
        continuation per model.

    Raises:
        ValueError: a domain has no document with ``prompt_tokens + new_tokens`` tokens.
    """
    k, m = int(cont.get("prompt_tokens", 32)), int(cont.get("new_tokens", 32))
    out: dict[str, Any] = {"scores": {"bleu": {}, "chrf": {}, "rougeL": {}}, "samples": {}, "pairs": {}, "too_short": {}}
    for d, doc_texts in texts.items():
        prompts, refs, out["too_short"][d] = continuation_pairs(tokenizer, doc_texts, int(cont.get("n_docs", 8)), k, m)
        out["pairs"][d] = len(prompts)
        if not prompts:
            raise ValueError(f"no {d} test document has {k + m} tokens: lower evaluate.continuation prompt_tokens/new_tokens")
        ref_text = [tokenizer.decode(r, skip_special_tokens=True) for r in refs]
        rows = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r} for p, r in zip(prompts, ref_text)]
        for name, model in models.items():
            gen = greedy_continuations(model, prompts, m, int(cont.get("batch_size", 16)), tokenizer.pad_token_id)
            hyps = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
            for row, hyp in zip(rows, hyps):
                row[name] = hyp
            for metric, value in text_scores(hyps, ref_text, bleu_tokenize).items():
                out["scores"][metric].setdefault(name, {})[d] = value
        out["samples"][d] = rows[: int(cont.get("show_per_domain", 3))]
    return out


def evaluate(cfg: Mapping[str, Any], domains: list[str]) -> dict[str, Any]:
    """Run every measurement on the pipeline's files; return ``{"metrics", "perplexity_rows", "samples"}``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR, local_files_only=True)
    model = load_causal_lm(BASE_DIR)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = load_causal_lm(MERGED_DIR)
    task_vectors = load_task_vectors(DIFF_DIR, domains)
    texts = {d: read_test_split(SPLIT_DIR, d, int(cfg.get("seed", 0))) for d in domains}
    probe = PerplexityProbe.from_params(cfg, tokenizer, texts, model.config.max_position_embeddings)

    start = time.perf_counter()
    with torch_threads(cfg.get("torch_threads")):
        ppl: dict[str, dict[str, float]] = {"base": probe.run(model, "base"), "merged": probe.run(merged, "merged")}
        for domain, state in expert_states(base_state, task_vectors):
            model.load_state_dict(state, strict=True)
            ppl[f"expert_{domain}"] = probe.run(model, f"expert_{domain}")
    model.load_state_dict(base_state, strict=True)

    perplexity_s = time.perf_counter() - start
    cont_cfg = cfg.get("continuation") or {}
    cont = continuation_scores(tokenizer, texts, {"base": model, "merged": merged}, cont_cfg, cfg.get("bleu_tokenize", "char"))
    continuation_s = time.perf_counter() - start - perplexity_s
    retained = retained_gains(ppl, domains)
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
    }
    rows = [{"model": name, "domain": d, "perplexity": v} for name, per in ppl.items() for d, v in per.items()]
    return {"metrics": metrics, "perplexity_rows": rows, "samples": cont["samples"]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = P.section("evaluate")
    domains = P.domains()
    if not domains:
        raise SystemExit("evaluate: params.yaml lists no domains")
    start = time.perf_counter()
    result = evaluate(cfg, domains)
    metrics = result["metrics"]
    failures = check_gate(metrics["perplexity"], metrics["retained_gain"], cfg.get("gate") or {})
    passed = not failures
    metrics["gate"] = {"passed": int(passed), "n_failures": len(failures)}

    loss_rows = [{"domain": d, **row} for d in domains for row in read_train_log(LOG_DIR / f"train_{d}.log")]
    write_text(PERPLEXITY_CSV, rows_to_csv(result["perplexity_rows"], ["model", "domain", "perplexity"]))
    write_text(TRAIN_LOSS_CSV, rows_to_csv(loss_rows, ["domain", "step", "loss", "eval_loss"]))
    write_text(COMPARISON_MD, comparison_markdown(result["samples"], metrics["settings"]))

    model_name = (cfg.get("registry") or {}).get("model_name", "domain-lm-merged")
    with stage_run("evaluate", cfg) as mlflow:
        mlflow.log_metrics({k: v for k, v in flatten_numbers(metrics).items() if math.isfinite(v)})
        verdict = "passed" if passed else "failed"
        mlflow.set_tag("gate", verdict)
        if failures:
            mlflow.set_tag("gate.alert", "; ".join(f"{f['metric']}={f['value']:.4g} vs {f['threshold']:.4g} ({f['rule']})"
                                                  for f in failures))
        registered = register_merged(mlflow, MERGED_DIR, model_name, passed,
                                     tags={"gate": verdict, "mean_retained_gain": f"{metrics['mean_retained_gain']:.4f}"})
        metrics["wall_s"] = time.perf_counter() - start
        metrics["peak_rss_mb"] = peak_rss_mb()
        write_metrics("evaluate", metrics)
        write_json(ALERTS_JSON, {
            "gate": verdict, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": registered, "thresholds": dict(cfg.get("gate") or {}), "failures": failures,
        })
        for path in (PERPLEXITY_CSV, TRAIN_LOSS_CSV, COMPARISON_MD, ALERTS_JSON):
            mlflow.log_artifact(str(path))
    level = logging.INFO if passed else logging.WARNING
    log.log(level, "gate %s: mean retained gain %.3f; %s v%s is now %r", verdict.upper(), metrics["mean_retained_gain"],
            model_name, registered["version"], registered["alias"])
    for f in failures:
        log.warning("gate: %s = %.4g fails %s (threshold %.4g)", f["metric"], f["value"], f["rule"], f["threshold"])


if __name__ == "__main__":
    main()
