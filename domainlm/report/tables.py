"""The report's numbers: rows computed from the metrics dicts, shared by the figures and the text.

Each function takes plain data (metrics dicts, DataFrames, lists) and returns rows (lists of dicts)
or small DataFrames; nothing here reads files or draws.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

# A domain with fewer training documents than this is "too small to train on": its LoRA repeats a
# handful of documents for several epochs, and its val and test splits (10 % each) hold one or two
# documents, so its val loss, test perplexity and retained gain rest on one or two documents.
MIN_TRAIN_DOCS = 20

# Metric keys that measure the run, not its results: sections and names of seconds, memory, workers.
_RUN_COST_SECTIONS = {"stage", "time", "timing", "perf"}
_RUN_COST_NAMES = {"workers", "redis_backend", "deepspeed"}


def funnel_rows(validate: Mapping, dedup: Mapping, split: Mapping, domains: Iterable[str]) -> list[dict[str, Any]]:
    """Documents per domain at each step: lines read → validated → after dedup → train/val/test.

    ``lines_read`` and ``rejected`` come from ``validate.by_file["<domain>.jsonl"]``; they are None
    for a domain whose raw file has another name (then only ``validated`` onward are known).

    Returns:
        One dict per domain: domain, lines_read, rejected, validated, exact_removed, near_removed,
        deduplicated, train, val, test (document counts, ints or None).
    """
    rows = []
    for d in domains:
        by_file = validate.get("by_file", {}).get(f"{d}.jsonl")
        dd = dedup["per_domain"][d]
        sp = split["domains"][d]
        rows.append(
            {
                "domain": d,
                "lines_read": by_file["lines_read"] if by_file else None,
                "rejected": by_file["rejected"] if by_file else None,
                "validated": validate["by_domain"].get(d, {}).get("kept", 0),  # absent: every line rejected
                "exact_removed": dd["exact_removed"],
                "near_removed": dd["near_removed"],
                "deduplicated": dd["after"],
                "train": sp["train"]["docs"],
                "val": sp["val"]["docs"],
                "test": sp["test"]["docs"],
            }
        )
    return rows


def removal_reasons(validate: Mapping, dedup: Mapping) -> dict[str, int]:
    """Documents removed before the split, by reason, all domains together (reasons with count 0 left out).

    Validation's reject reasons (``validate.by_reason``) plus dedup's ``exact duplicate`` and
    ``near-duplicate``; sorted by count, largest first.
    """
    reasons = {k.replace("_", " "): int(v) for k, v in validate["by_reason"].items() if v}
    reasons["exact duplicate (dedup)"] = int(dedup["totals"]["exact_removed"])
    reasons["near-duplicate (dedup)"] = int(dedup["totals"]["near_removed"])
    return dict(sorted(((k, v) for k, v in reasons.items() if v), key=lambda kv: -kv[1]))


def small_domains(
    split: Mapping, train_lora: Mapping, evaluate: Mapping, domains: Iterable[str], min_train_docs: int = MIN_TRAIN_DOCS
) -> list[dict[str, Any]]:
    """Domains with fewer than ``min_train_docs`` training documents (see :data:`MIN_TRAIN_DOCS`).

    Returns:
        One dict per such domain, in domain order: domain, train, val, test (documents),
        test_tokens (tokens in its test perplexity stream), lora_steps, lora_tokens_seen.
    """
    out = []
    tokens = evaluate.get("tokens", {}).get("perplexity_stream", {})
    for d in domains:
        sp = split["domains"][d]
        if sp["train"]["docs"] < min_train_docs:
            tl = train_lora.get(d, {})
            out.append(
                {
                    "domain": d,
                    "train": sp["train"]["docs"],
                    "val": sp["val"]["docs"],
                    "test": sp["test"]["docs"],
                    "test_tokens": tokens.get(d),
                    "lora_steps": tl.get("steps"),
                    "lora_tokens_seen": tl.get("tokens_seen"),
                }
            )
    return out


def p_candidate(jaccard: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """MinHash-LSH banding: probability that a pair with Jaccard similarity J shares at least one band,
    ``1 - (1 - J**rows)**bands`` (Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3.4)."""
    return 1.0 - (1.0 - np.asarray(jaccard, dtype=float) ** rows) ** bands


def storage_rows(parquet: Mapping, domains: Iterable[str]) -> list[dict[str, Any]]:
    """Bytes on disk per domain: JSONL (after dedup) vs Parquet, and their ratio (JSONL / Parquet)."""
    return [
        {
            "domain": d,
            "rows": parquet["domains"][d]["rows"],
            "jsonl_bytes": parquet["domains"][d]["jsonl_bytes"],
            "parquet_bytes": parquet["domains"][d]["parquet_bytes"],
            "compression_ratio": parquet["domains"][d]["jsonl_bytes"] / parquet["domains"][d]["parquet_bytes"],
        }
        for d in domains
    ]


def lora_rows(train_lora: Mapping, domains: Iterable[str]) -> list[dict[str, Any]]:
    """Per-domain LoRA run: steps, best step, losses (nats/token), val perplexity before/after, tokens, seconds."""
    rows = []
    for d in domains:
        m = train_lora[d]
        rows.append(
            {
                "domain": d,
                "steps": m["steps"],
                "best_step": m["best_step"],
                "train_loss": m["train_loss"],
                "val_loss": m["val_loss"],
                "base_val_loss": m["base_val_loss"],
                "base_val_perplexity": m["base_val_perplexity"],
                "val_perplexity": m["val_perplexity"],
                "tokens_seen": m["tokens_seen"],
                "train_s": m["train_s"],
                "still_improving": m["best_step"] == m["steps"],
            }
        )
    return rows


def model_order(domains: Iterable[str]) -> list[str]:
    """Rows of the perplexity matrix: ``base``, ``expert_<domain>`` per domain, ``merged``."""
    return ["base", *[f"expert_{d}" for d in domains], "merged"]


def perplexity_matrix(perplexity: pd.DataFrame, domains: list[str]) -> pd.DataFrame:
    """``plots/perplexity.csv`` as a models × domains table (rows in :func:`model_order`, models absent dropped)."""
    table = perplexity.pivot(index="model", columns="domain", values="perplexity")
    rows = [m for m in model_order(domains) if m in table.index]
    return table.loc[rows, [d for d in domains if d in table.columns]]


def gain_rows(evaluate: Mapping, domains: Iterable[str]) -> list[dict[str, Any]]:
    """Per domain: test perplexity of base, own expert and merged, the retained gain and the test tokens.

    retained gain = (ppl_base − ppl_merged) / (ppl_base − ppl_expert): the share of the expert's
    perplexity drop that the merged model keeps (1 = all of it; above 1 = merged beats the expert).
    """
    ppl = evaluate["perplexity"]
    tokens = evaluate.get("tokens", {}).get("perplexity_stream", {})
    return [
        {
            "domain": d,
            "base": ppl["base"][d],
            "expert": ppl[f"expert_{d}"][d],
            "merged": ppl["merged"][d],
            "retained_gain": evaluate["retained_gain"][d],
            "test_tokens": tokens.get(d),
        }
        for d in domains
    ]


def cosine_matrix(cosine: pd.DataFrame, domains: list[str]) -> pd.DataFrame:
    """``plots/task_vector_cosine.csv`` as a square domains × domains table."""
    table = cosine.pivot(index="domain_a", columns="domain_b", values="cosine")
    return table.loc[domains, domains]


def off_diagonal(matrix: pd.DataFrame) -> list[tuple[str, str, float]]:
    """The pairs (a, b, value) above the diagonal of a square table, largest value first."""
    names = list(matrix.index)
    pairs = [(a, b, float(matrix.loc[a, b])) for i, a in enumerate(names) for b in names[i + 1 :]]
    return sorted(pairs, key=lambda p: -p[2])


# ---------------------------------------------------------------- greedy continuations (eval/*.md)
def _cells(line: str) -> list[str]:
    """Cells of a markdown table row; ``\\|`` inside a cell is kept as ``|``."""
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def parse_comparison(markdown: str) -> dict[str, list[dict[str, str]]]:
    """The tables of ``eval/eval_prompt_comparison.md``: domain (its ``## `` heading) -> rows.

    Each row is a dict keyed by the table's header (prompt, reference, base, merged).
    """
    out: dict[str, list[dict[str, str]]] = {}
    domain, header = None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            domain, header = line[3:].strip(), None
            out[domain] = []
        elif domain and line.startswith("|"):
            cells = _cells(line)
            if header is None:
                header = cells
            elif not all(set(c) <= set("-: ") for c in cells):
                out[domain].append(dict(zip(header, cells)))
    return out


def distinct_ngram_ratio(text: str, n: int = 4) -> float | None:
    """Distinct character n-grams / all character n-grams of ``text`` (spaces and ⏎ kept; 1 = no repeats).

    A repetition measure for generated text (distinct-n, Li et al. 2016, on characters, which suits
    Korean without a tokenizer). None when ``text`` is shorter than ``n``.
    """
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def continuation_rows(
    comparison: Mapping[str, list[Mapping[str, str]]], columns=("reference", "base", "merged"), n: int = 4
) -> list[dict[str, Any]]:
    """Per domain: examples shown and the mean distinct character n-gram ratio of each column."""
    rows = []
    for domain, examples in comparison.items():
        row: dict[str, Any] = {"domain": domain, "examples": len(examples)}
        for col in columns:
            ratios = [r for e in examples if (r := distinct_ngram_ratio(e.get(col, ""), n)) is not None]
            row[col] = float(np.mean(ratios)) if ratios else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------- dvc metrics diff
def is_run_cost(key: str) -> bool:
    """True for a metric that measures the run (seconds, MiB, throughput, worker count), not its result."""
    parts = key.split(".")
    last = parts[-1]
    return (
        bool(_RUN_COST_SECTIONS.intersection(parts[:-1]))
        or last in _RUN_COST_NAMES
        or last.endswith(("_s", "_mb"))
        or "peak_rss" in last
    )


def change_rows(metrics_diff: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
    """Split ``dvc metrics diff --json`` output into result changes and a count of run-cost changes.

    Args:
        metrics_diff: ``{file: {metric key: {"old": x, "new": y, "diff": d}}}``, as ``dvc metrics diff
            --json`` prints it (``old`` is None for a new metric, ``new`` None for a removed one).

    Returns:
        (rows, n_run_cost): rows have file, metric, old, new, diff, relative (diff / |old|, None when
        old is 0 or absent), sorted by |relative| then |diff|, largest first; n_run_cost counts the
        changed timing/memory/throughput values left out of the rows.
    """
    rows, n_cost = [], 0
    for file, changes in metrics_diff.items():
        if not isinstance(changes, Mapping):
            continue
        for key, change in changes.items():
            if not isinstance(change, Mapping) or key == "error":
                continue
            if is_run_cost(key):
                n_cost += 1
                continue
            old, new = change.get("old"), change.get("new")
            diff = change.get("diff")
            numeric = isinstance(old, (int, float)) and isinstance(new, (int, float))
            rel = diff / abs(old) if numeric and diff is not None and old else None
            rows.append({"file": file, "metric": key, "old": old, "new": new, "diff": diff, "relative": rel})
    rows.sort(
        key=lambda r: (
            -(abs(r["relative"]) if r["relative"] is not None else float("inf")),
            -abs(r["diff"]) if isinstance(r["diff"], (int, float)) else 0.0,
        )
    )
    return rows, n_cost
