"""The report's text: markdown computed from the metrics (tables, verdicts, limits), never hand-written numbers.

Every function takes plain data (metrics dicts and :mod:`domainlm.report.tables` rows) and returns a
markdown string. Numbers are printed by the formatters below, so a test can print a metric the same
way and find it in ``reports/report.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from domainlm.report import tables


# ------------------------------------------------------------------------------------------ formatters
def count(x: Any) -> str:
    """An integer count (``2691``); ``–`` for None."""
    return "–" if x is None else str(int(x))


def ratio(x: Any, digits: int = 3) -> str:
    """A unitless number such as a retained gain, an accuracy or a cosine (``0.670``); ``–`` for None."""
    return "–" if x is None else f"{float(x):.{digits}f}"


def ppl(x: Any) -> str:
    """A perplexity (``250.5``); ``–`` for None."""
    return "–" if x is None else f"{float(x):.1f}"


def percent(x: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage (``1.9%``); ``–`` for None."""
    return "–" if x is None else f"{100.0 * float(x):.{digits}f}%"


def number(x: Any) -> str:
    """Any metric value for the change table: ints as ints, floats with 4 significant digits."""
    if x is None:
        return "–"
    if isinstance(x, bool) or isinstance(x, int):
        return str(int(x))
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` has one letter per column (``l`` or ``r``)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def left_out(title: str, reason: str) -> str:
    """The note that stands in for a section whose input is missing."""
    return f"> **Left out: {title}.** {reason}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------------------------------ headline
def headline(
    validate: Mapping,
    dedup: Mapping,
    split: Mapping,
    parquet: Mapping,
    base_model: Mapping,
    train_lora: Mapping,
    evaluate: Mapping,
    alerts: Mapping,
    refine: Mapping,
    classifier: Mapping | None,
    domains: Sequence[str],
) -> str:
    """The headline table: one row per number a reader asks for first, with the file it comes from."""
    vt, dt, tot = validate["totals"], dedup["totals"], split["total"]
    pq = parquet["total"]
    lora = [train_lora[d] for d in domains if d in train_lora]
    ppl_base = [evaluate["perplexity"]["base"][d] for d in domains]
    ppl_merged = [evaluate["perplexity"]["merged"][d] for d in domains]
    gate_min = alerts.get("thresholds", {}).get("min_mean_retained_gain")
    model = alerts.get("model") or {}
    rows = [
        ("raw lines read", count(vt["lines_read"]), "metrics/validate.json"),
        (
            "documents kept by validation",
            f"{count(vt['kept'])} ({count(vt['rejected'])} rejected, {percent(vt['reject_rate'])})",
            "metrics/validate.json",
        ),
        (
            "near-duplicates removed",
            f"{count(dt['near_removed'])} ({percent(dt['near_removed_rate'])}); "
            f"exact duplicates {count(dt['exact_removed'])}",
            "metrics/dedup.json",
        ),
        ("documents after dedup", count(dt["after"]), "metrics/dedup.json"),
        (
            "train / val / test documents",
            f"{count(tot['train'])} / {count(tot['val'])} / {count(tot['test'])}",
            "metrics/split.json",
        ),
        (
            "Parquet vs JSONL size",
            f"{count(pq['parquet_bytes'])} B vs {count(pq['jsonl_bytes'])} B "
            f"({pq['jsonl_bytes'] / pq['parquet_bytes']:.2f}× smaller)",
            "metrics/parquet.json",
        ),
        (
            "base model",
            f"{count(base_model['n_params'])} parameters, "
            + (
                f"trained on {count(base_model['tokens_seen'])} tokens"
                if "tokens_seen" in base_model
                else "a local checkpoint (base_model.source: path)"
            ),
            "metrics/base_model.json",
        ),
        (
            "LoRA adapters",
            f"{len(lora)} × {count(lora[0]['trainable_params'])} trainable parameters "
            f"({percent(lora[0]['trainable_params'] / lora[0]['total_params'], 2)} of the model)"
            if lora
            else "none",
            "metrics/train_lora/",
        ),
        (
            "mean retained gain",
            f"{ratio(evaluate['mean_retained_gain'])}" + (f" (gate: ≥ {gate_min:g})" if gate_min is not None else ""),
            "metrics/evaluate.json",
        ),
        (
            "mean test perplexity, base → merged",
            f"{ppl(np.mean(ppl_base))} → {ppl(np.mean(ppl_merged))} (mean over {len(domains)} domains)",
            "metrics/evaluate.json",
        ),
        (
            "quality gate",
            f"{alerts.get('gate', '–')} ({len(alerts.get('failures') or [])} failures)"
            + (
                f"; {model['name']} version {model['version']} is `{model.get('alias') or 'unaliased'}`"
                if model.get("name")
                else ""
            ),
            "metrics/alerts.json",
        ),
        (
            "labels changed by refinement",
            f"{count(refine['labels_changed'])} of {count(refine['rows'])} "
            f"({percent(refine['label_change_rate'])}) in {count(refine['iterations'])} "
            f"iterations, {'converged' if refine.get('converged') else 'not converged'}",
            "metrics/refine.json",
        ),
        (
            "ensemble validation accuracy",
            ratio(refine["final_iteration"]["val_accuracy_ensemble"]),
            "metrics/refine.json",
        ),
    ]
    if classifier is not None:
        rows.append(
            (
                "classifier macro-F1, LoRA vs baseline",
                f"{ratio(classifier['lora']['macro_f1'])} vs {ratio(classifier['baseline']['macro_f1'])}",
                "metrics/classifier.json",
            )
        )
    return markdown_table(["measure", "value", "source"], rows)


# ------------------------------------------------------------------------------------------ gate
def gate(evaluate: Mapping, alerts: Mapping, domains: Sequence[str]) -> str:
    """The quality gate: each rule, its threshold, the measured value and the outcome; the recorded failures.

    Rules as in :func:`domainlm.lm.gate.check_gate`; outcomes are recomputed here from the perplexities.
    """
    th = alerts.get("thresholds") or {}
    ppl_ = evaluate["perplexity"]
    rows = []
    expert_ok = [d for d in domains if ppl_[f"expert_{d}"][d] < ppl_["base"][d]]
    rows.append(
        (
            "each expert below the base on its own domain",
            "always",
            "; ".join(f"{d} {ppl(ppl_[f'expert_{d}'][d])} vs {ppl(ppl_['base'][d])}" for d in domains),
            "pass" if len(expert_ok) == len(domains) else "FAIL",
        )
    )
    mean_gain = evaluate["mean_retained_gain"]
    t = th.get("min_mean_retained_gain")
    rows.append(
        (
            "mean retained gain ≥ threshold",
            "not checked" if t is None else f"{t:g}",
            ratio(mean_gain),
            "not checked" if t is None else ("pass" if mean_gain >= t else "FAIL"),
        )
    )
    below = [d for d in domains if ppl_["merged"][d] < ppl_["base"][d]]
    on = th.get("merged_below_base")
    rows.append(
        (
            "merged below base on every domain",
            "on" if on else "off",
            "; ".join(f"{d} {ppl(ppl_['merged'][d])} vs {ppl(ppl_['base'][d])}" for d in domains),
            "not checked" if not on else ("pass" if len(below) == len(domains) else "FAIL"),
        )
    )
    t = th.get("max_perplexity")
    worst = max(domains, key=lambda d: ppl_["merged"][d])
    rows.append(
        (
            "merged perplexity ≤ ceiling on every domain",
            "none" if t is None else f"{t:g}",
            f"highest: {worst} {ppl(ppl_['merged'][worst])}",
            "not checked" if t is None else ("pass" if ppl_["merged"][worst] <= t else "FAIL"),
        )
    )
    verdict = str(alerts.get("gate", "unknown"))
    out = [
        f"**Quality gate: {verdict}** (recorded in `metrics/alerts.json` at {alerts.get('time', '–')}).",
        "",
        markdown_table(["rule", "threshold", "measured (merged or expert vs base perplexity)", "outcome"], rows),
        "",
    ]
    failures = alerts.get("failures") or []
    if failures:
        out.append("Alerts raised:")
        out += [
            f"- `{f['metric']}` = {number(f['value'])} fails `{f['rule']}` (threshold {number(f['threshold'])})"
            for f in failures
        ]
    else:
        out.append("Alerts raised: none.")
    model = alerts.get("model") or {}
    if model.get("name"):
        out.append("")
        out.append(
            f"Model registry: `{model['name']}` version {model['version']} carries the alias "
            f"`{model.get('alias') or '(none)'}`."
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ funnel
def funnel(funnel_rows: list[dict[str, Any]], reasons: Mapping[str, int], validate: Mapping) -> str:
    """The per-domain funnel table and the removal reasons."""
    rows = [
        (
            r["domain"],
            count(r["lines_read"]),
            count(r["rejected"]),
            count(r["validated"]),
            count(r["near_removed"] + r["exact_removed"]),
            count(r["deduplicated"]),
            count(r["train"]),
            count(r["val"]),
            count(r["test"]),
        )
        for r in funnel_rows
    ]
    table = markdown_table(
        ["domain", "lines read", "rejected", "validated", "duplicates removed", "after dedup", "train", "val", "test"],
        rows,
        "lrrrrrrrr",
    )
    zero = [k for k, v in validate["by_reason"].items() if not v]
    text = (
        "Removed before the split, by reason: "
        + (", ".join(f"{k} {v}" for k, v in reasons.items()) if reasons else "nothing")
        + f" (the other {len(zero)} validation reasons removed nothing)."
    )
    return table + "\n\n" + text


def small_domains(rows: list[dict[str, Any]], min_train_docs: int = tables.MIN_TRAIN_DOCS) -> str:
    """Domains too small to train on (see :data:`tables.MIN_TRAIN_DOCS`), or a line saying there are none."""
    if not rows:
        return f"No domain has fewer than {min_train_docs} training documents."
    table = markdown_table(
        ["domain", "train docs", "val docs", "test docs", "test tokens scored", "LoRA steps", "LoRA tokens seen"],
        [
            (
                r["domain"],
                count(r["train"]),
                count(r["val"]),
                count(r["test"]),
                count(r["test_tokens"]),
                count(r["lora_steps"]),
                count(r["lora_tokens_seen"]),
            )
            for r in rows
        ],
        "lrrrrrr",
    )
    names = [f"`{r['domain']}` ({count(r['train'])} training documents)" for r in rows]
    return (
        f"{_join(names)} {'has' if len(rows) == 1 else 'have'} fewer than {min_train_docs} training documents. "
        "Their LoRA repeats a handful of documents for several epochs, and their validation loss, test "
        "perplexity and retained gain rest on one or two documents: read them as anecdotes, not measurements.\n\n"
        + table
    )


# ------------------------------------------------------------------------------------------ dedup
def dedup(dedup_metrics: Mapping) -> str:
    """The LSH banding choice against datasketch's default, and what the candidates became."""
    lsh = dedup_metrics["lsh"]
    b, r, t = dedup_metrics["bands"], dedup_metrics["rows"], lsh["threshold"]
    dflt = lsh["datasketch_default"]
    p_ours = float(tables.p_candidate(t, b, r))
    p_default = float(tables.p_candidate(t, dflt["bands"], dflt["rows"]))
    per = dedup_metrics["per_domain"]
    top = max(per, key=lambda d: per[d]["near_removed"])
    return "\n".join(
        [
            f"MinHash with {count(lsh['num_perm'])} permutations, banded into b = {b} bands of r = {r} rows "
            f"({count(b * r)} permutations used). A pair at the threshold J = {t:g} becomes a candidate with "
            f"probability {ratio(p_ours)}; datasketch's default banding for the same threshold "
            f"(b = {dflt['bands']}, r = {dflt['rows']}) gives {ratio(p_default)}, so it would miss "
            f"{percent(1 - p_default, 0)} of the pairs right at the threshold. "
            f"The price is more false candidates below the threshold (area under the curve for J < {t:g}: "
            f"{ratio(lsh['false_positive_area'])}).",
            "",
            f"LSH proposed {count(dedup_metrics['candidate_pairs'])} candidate pairs; exact Jaccard verification kept "
            f"{count(dedup_metrics['verified_pairs'])} ({percent(dedup_metrics['verified_rate'])}), which union-find "
            f"grouped into {count(dedup_metrics['clusters'])} clusters "
            f"(largest: {count(dedup_metrics['largest_cluster'])} documents). "
            f"{count(dedup_metrics['totals']['near_removed'])} near-duplicates were removed, "
            f"{count(per[top]['near_removed'])} of them in `{top}`.",
        ]
    )


# ------------------------------------------------------------------------------------------ storage
def storage(storage_rows: list[dict[str, Any]], parquet: Mapping) -> str:
    """Bytes per domain, JSONL vs Parquet."""
    total = parquet["total"]
    rows = [
        (
            r["domain"],
            count(r["rows"]),
            count(r["jsonl_bytes"]),
            count(r["parquet_bytes"]),
            f"{r['compression_ratio']:.2f}×",
        )
        for r in storage_rows
    ]
    rows.append(
        (
            "total",
            count(total["rows"]),
            count(total["jsonl_bytes"]),
            count(total["parquet_bytes"]),
            f"{total['jsonl_bytes'] / total['parquet_bytes']:.2f}×",
        )
    )
    return markdown_table(["domain", "documents", "JSONL bytes", "Parquet bytes", "JSONL / Parquet"], rows, "lrrrr")


def load_speed(io_speed) -> str:
    """Load speed per loader from ``benchmarks/results/io_speed.csv``, with the machine's load when measured."""
    rows = [
        (
            r.loader,
            r.columns,
            count(r.bytes_on_disk),
            f"{r.median_s:.3f}",
            f"{r.docs_per_s:.0f}",
            f"{r.speedup_vs_jsonl:.2f}×",
        )
        for r in io_speed.itertuples()
    ]
    first = io_speed.iloc[0]
    text = (
        f"Measured by `benchmarks/io_speed.py` ({count(first['docs'])} documents per pass; "
        f"{count(first['cpu_count'])} CPUs, 1-minute load average {first['load_avg_1m_at_start']:.2f} at the start)."
    )
    return (
        text
        + "\n\n"
        + markdown_table(
            ["loader", "columns read", "bytes on disk", "median s per pass", "docs/s", "speed-up vs JSONL"],
            rows,
            "llrrrr",
        )
    )


# ------------------------------------------------------------------------------------------ LoRA
def lora(rows: list[dict[str, Any]]) -> str:
    """Per-domain LoRA table: steps, losses, validation perplexity before and after."""
    table = markdown_table(
        [
            "domain",
            "steps",
            "best step",
            "train loss",
            "val loss",
            "val perplexity base → LoRA",
            "tokens seen",
            "train s",
        ],
        [
            (
                r["domain"],
                count(r["steps"]),
                count(r["best_step"]),
                ratio(r["train_loss"]),
                ratio(r["val_loss"]),
                f"{ppl(r['base_val_perplexity'])} → {ppl(r['val_perplexity'])}",
                count(r["tokens_seen"]),
                f"{r['train_s']:.0f}",
            )
            for r in rows
        ],
        "lrrrrrrr",
    )
    improving = [f"`{r['domain']}`" for r in rows if r["still_improving"]]
    note = (
        f"Validation loss was lowest at the last step for {_join(improving)}: those runs stopped while still improving."
        if improving
        else "Every run reached its lowest validation loss before its last step."
    )
    return "Losses are mean cross-entropy in nats per token.\n\n" + table + "\n\n" + note


# ------------------------------------------------------------------------------------------ task vectors
def task_vectors(matrix, task_vectors_metrics: Mapping, merge: Mapping, domains: Sequence[str]) -> str:
    """Task-vector sizes and their overlap."""
    pairs = tables.off_diagonal(matrix)
    merged = merge.get("domains", {})
    rows = [
        (
            d,
            ratio(task_vectors_metrics[d]["l2_norm"]),
            ratio(task_vectors_metrics[d]["relative_l2_norm"]),
            ratio(merged[d]["cosine_to_merged_update"]) if d in merged else "–",
        )
        for d in domains
    ]
    table = markdown_table(["domain", "‖Δ‖₂", "‖Δ‖₂ / ‖θ_base‖₂", "cosine to the merged update"], rows, "lrrr")
    text = ""
    if pairs:
        a, b, v = pairs[0]
        lo = pairs[-1]
        verdict = (
            "all pairs are close to orthogonal (|cosine| < 0.3), so the task vectors add with little "
            "interference, which is what task arithmetic needs"
            if max(abs(p[2]) for p in pairs) < 0.3
            else "some task vectors overlap (|cosine| ≥ 0.3): a merge adds their shared direction more than once, "
            "which TIES' sign election or smaller weights counter"
        )
        text = (
            f"The most similar pair is `{a}`–`{b}` (cosine {ratio(v)}); the least similar is "
            f"`{lo[0]}`–`{lo[1]}` ({ratio(lo[2])}). Mean over the {len(pairs)} pairs: "
            f"{ratio(np.mean([p[2] for p in pairs]))}; {verdict}.\n\n"
        )
    return (
        text + f"Merge: `{merge['method']}` with λ = {merge['lam']:g}; the merged update has "
        f"‖λ Σ wᵢ Δᵢ‖₂ = {ratio(merge['merged_update_l2_norm'])}.\n\n" + table
    )


# ------------------------------------------------------------------------------------------ perplexity
def perplexity(gains: list[dict[str, Any]], evaluate: Mapping) -> str:
    """Per-domain test perplexity of base, expert and merged, and the retained gain."""
    table = markdown_table(
        ["domain", "base", "own expert", "merged", "retained gain", "test tokens"],
        [
            (
                g["domain"],
                ppl(g["base"]),
                ppl(g["expert"]),
                ppl(g["merged"]),
                ratio(g["retained_gain"]),
                count(g["test_tokens"]),
            )
            for g in gains
        ],
        "lrrrrr",
    )
    s = evaluate.get("settings", {})
    return (
        f"Strided perplexity on each domain's whole test split (window {count(s.get('max_length'))} tokens, "
        f"stride {count(s.get('stride'))}). Retained gain = (base − merged) / (base − own expert): the share of "
        f"the expert's perplexity drop that the single merged model keeps. Mean retained gain: "
        f"**{ratio(evaluate['mean_retained_gain'])}**.\n\n" + table
    )


# ------------------------------------------------------------------------------------------ continuations
def continuations(
    rows: list[dict[str, Any]],
    comparison: Mapping[str, list[Mapping[str, str]]],
    evaluate: Mapping,
    max_chars: int = 80,
) -> str:
    """Greedy continuations: repetition (distinct character 4-grams), BLEU/chrF, and one example per domain."""
    bleu, chrf = evaluate.get("bleu", {}), evaluate.get("chrf", {})
    table = markdown_table(
        [
            "domain",
            "examples",
            "distinct 4-grams: reference",
            "base",
            "merged",
            "BLEU base → merged",
            "chrF base → merged",
        ],
        [
            (
                r["domain"],
                count(r["examples"]),
                ratio(r["reference"], 2),
                ratio(r["base"], 2),
                ratio(r["merged"], 2),
                f"{bleu['base'][r['domain']]:.2f} → {bleu['merged'][r['domain']]:.2f}"
                if r["domain"] in bleu.get("base", {})
                else "–",
                f"{chrf['base'][r['domain']]:.2f} → {chrf['merged'][r['domain']]:.2f}"
                if r["domain"] in chrf.get("base", {})
                else "–",
            )
            for r in rows
        ],
        "lrrrrrr",
    )

    def cut(s: str) -> str:
        return s if len(s) <= max_chars else s[: max_chars - 1] + "…"

    examples = [
        (
            d,
            cut(ex[0].get("prompt", "")),
            cut(ex[0].get("reference", "")),
            cut(ex[0].get("base", "")),
            cut(ex[0].get("merged", "")),
        )
        for d, ex in comparison.items()
        if ex
    ]
    return (
        "From `eval/eval_prompt_comparison.md` (a test document's first tokens as the prompt, greedy decoding). "
        "Distinct 4-grams = distinct character 4-grams / all character 4-grams of a continuation, averaged "
        "(1 = no repetition).\n\n"
        + table
        + f"\n\nFirst example per domain (cut to {max_chars} characters; ⏎ = line break):\n\n"
        + markdown_table(["domain", "prompt", "reference", "base", "merged"], examples)
    )


# ------------------------------------------------------------------------------------------ refinement
def refine(refine_metrics: Mapping, history) -> str:
    """Label refinement: iterations, change rates, accuracy of the ensemble and its members."""
    fin = refine_metrics["final_iteration"]
    members = {
        k.removeprefix("val_accuracy_"): v
        for k, v in fin.items()
        if k.startswith("val_accuracy_") and k != "val_accuracy_ensemble"
    }
    best = max(members, key=members.get) if members else None
    rows = [
        (
            count(r.iteration),
            ratio(r.tau, 2),
            count(r.rows_changed),
            percent(r.label_change_rate, 2),
            ratio(r.val_accuracy_ensemble),
        )
        for r in history.itertuples()
    ]
    text = (
        f"{count(refine_metrics['iterations'])} iterations over {count(refine_metrics['rows'])} documents in "
        f"{count(refine_metrics['classes'])} classes; "
        f"{'converged' if refine_metrics.get('converged') else 'stopped at the iteration cap before converging'}. "
        f"{count(refine_metrics['labels_changed'])} labels changed in all "
        f"({percent(refine_metrics['label_change_rate'])}); {count(refine_metrics['review_queue_rows'])} "
        f"lowest-confidence documents wait in the review queue."
    )
    if best is not None:
        text += (
            f" The ensemble's validation accuracy in the last iteration is {ratio(fin['val_accuracy_ensemble'])}; "
            f"its best single member, `{best}`, reaches {ratio(members[best])}."
        )
    return (
        text
        + "\n\n"
        + markdown_table(
            ["iteration", "τ", "labels changed", "label change rate", "ensemble val accuracy"], rows, "rrrrr"
        )
    )


# ------------------------------------------------------------------------------------------ classifier
def classifier(classifier_metrics: Mapping) -> str:
    """The classifier's macro-F1 against the baseline, then, when ``metrics/classifier.json`` has them, the
    gate's outcome with each attempt's test macro-F1 and the model's registry alias."""
    lora_f1 = classifier_metrics["lora"]["macro_f1"]
    base = classifier_metrics["baseline"]
    labels = classifier_metrics["lora"]["confusion_matrix"]["labels"]
    name = f" ({base['name']})" if base.get("name") else ""
    text = (
        f"Macro-F1 over {len(labels)} labels: LoRA classifier **{ratio(lora_f1)}**, baseline{name} "
        f"{ratio(base['macro_f1'])} (difference {lora_f1 - base['macro_f1']:+.3f})."
    )
    lead, boot = classifier_metrics.get("lora_to_baseline") or {}, classifier_metrics.get("bootstrap") or {}
    if "macro_f1_difference_low" in lead and "macro_f1_low" in classifier_metrics["lora"]:
        lora = classifier_metrics["lora"]
        within = lead["macro_f1_difference_low"] <= 0.0 <= lead["macro_f1_difference_high"]
        text += (
            f" Paired bootstrap ({float(boot.get('confidence', 0.95)):.0%}, {boot.get('resamples', '?')} "
            f"resamples of the test documents): LoRA [{ratio(lora['macro_f1_low'])}, "
            f"{ratio(lora['macro_f1_high'])}], baseline [{ratio(base.get('macro_f1_low'))}, "
            f"{ratio(base.get('macro_f1_high'))}], difference [{lead['macro_f1_difference_low']:+.3f}, "
            f"{lead['macro_f1_difference_high']:+.3f}]"
            + (": the two are not told apart on this test split." if within else ".")
        )
    gate = classifier_metrics.get("gate")
    if isinstance(gate, Mapping) and "passed" in gate:
        per_attempt = gate.get("test_macro_f1") or {}
        scores = ", ".join(ratio(per_attempt[k]) for k in sorted(per_attempt, key=lambda k: int(k.rsplit("_", 1)[-1])))
        text += (
            f" Gate (test macro-F1 ≥ {gate.get('min_f1')}): **{'passed' if gate['passed'] else 'failed'}** "
            f"after {count(gate.get('attempts'))} attempt(s)"
            + (f" (test macro-F1 per attempt: {scores}; kept attempt {gate.get('kept_attempt')})" if scores else "")
            + "."
        )
    registry = classifier_metrics.get("registry")
    if isinstance(registry, Mapping) and registry.get("version") is not None:
        text += (
            f" Registered as version {registry['version']}, "
            f"{'now the `champion`' if registry.get('champion') else 'a `challenger` (the champion is unchanged)'}."
        )
    return text


# ------------------------------------------------------------------------------------------ changes
def changes(metrics_diff: Mapping | None, diff_base: str | None, max_rows: int = 25) -> str:
    """What changed since the previous commit, from ``dvc metrics diff <base> --json`` output.

    Args:
        metrics_diff: the parsed JSON, or None when no comparison could be made.
        diff_base: the commit compared against (short hash), for the text.
        max_rows: result changes listed (largest relative change first).
    """
    if metrics_diff is None:
        return left_out(
            "What changed since the previous commit",
            "No `dvc metrics diff` output was passed to the "
            "notebook (it was run outside the `report` stage, or outside a git repository with a commit).",
        )
    base = f"commit `{diff_base}` (HEAD when the report ran)" if diff_base else "HEAD"
    rows, n_cost = tables.change_rows(metrics_diff)
    if not rows and not n_cost:
        return f"No metric changed since {base}: `dvc metrics diff HEAD --json` is empty."
    lines = [
        f"Against {base}, from `dvc metrics diff HEAD --json`: {len(rows)} result values "
        f"changed"
        + (f", and {n_cost} timing or memory values (seconds, MiB, throughput; not listed)." if n_cost else ".")
    ]
    if rows:
        shown = rows[:max_rows]
        lines += [
            "",
            markdown_table(
                ["file", "metric", "before", "now", "change", "relative"],
                [
                    (
                        r["file"],
                        r["metric"],
                        number(r["old"]),
                        number(r["new"]),
                        number(r["diff"]),
                        "new"
                        if r["old"] is None
                        else "removed"
                        if r["new"] is None
                        else "–"
                        if r["relative"] is None
                        else f"{100 * r['relative']:+.2f}%",
                    )
                    for r in shown
                ],
                "llrrrr",
            ),
        ]
        if len(rows) > max_rows:
            lines += ["", f"({len(rows) - max_rows} more not listed.)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ limits
def limits(
    *,
    small: list[dict[str, Any]],
    gains: list[dict[str, Any]],
    lora_rows: list[dict[str, Any]],
    cosine_pairs: list[tuple[str, str, float]],
    continuation_rows: list[dict[str, Any]],
    base_model: Mapping,
    merge: Mapping,
    dedup_metrics: Mapping,
    refine_metrics: Mapping,
    io_speed,
    classifier_metrics: Mapping | None,
) -> str:
    """Limits and suggestions, each one triggered by a number in the figures above."""
    out: list[str] = []
    if small:
        names = _join(
            [f"`{r['domain']}` ({count(r['train'])} training, {count(r['test'])} test documents)" for r in small]
        )
        out.append(
            f"**Too little data.** {names} {'has' if len(small) == 1 else 'have'} fewer than "
            f"{tables.MIN_TRAIN_DOCS} training documents. "
            "Collect more text for them, or fold them into a neighbouring domain, before reading their gains."
        )
    above = [g for g in gains if g["retained_gain"] > 1.0]
    for g in above:
        partner = next(((a if b == g["domain"] else b, v) for a, b, v in cosine_pairs if g["domain"] in (a, b)), None)
        extra = (
            f" Its task vector is closest to `{partner[0]}`'s (cosine {ratio(partner[1])}), whose update also helps it."
            if partner
            else ""
        )
        out.append(
            f"**A retained gain above 1.** The merged model beats `{g['domain']}`'s own expert "
            f"(retained gain {ratio(g['retained_gain'])}, {count(g['test_tokens'])} test tokens): the other "
            f"experts' updates help this domain, or the difference is noise on a small test set.{extra}"
        )
    if gains:
        worst = min(gains, key=lambda g: g["retained_gain"])
        out.append(
            f"**The merge loses most on `{worst['domain']}`** (retained gain {ratio(worst['retained_gain'])}: "
            f"expert {ppl(worst['expert'])}, merged {ppl(worst['merged'])}, base {ppl(worst['base'])}). "
            f"`{merge['method']}` with λ = {merge['lam']:g} scales every task vector alike; try "
            f"`merge.method: ties` or `dare`, or a larger `merge.weights.{worst['domain']}`."
        )
    improving = [f"`{r['domain']}`" for r in lora_rows if r["still_improving"]]
    if improving:
        out.append(
            f"**Under-trained adapters.** The validation loss of {_join(improving)} was "
            "still falling at the last step (best step = last step): raising `train_lora.train.max_steps` or "
            "`max_epochs` would likely lower it, at the price of larger task vectors for the merge to "
            "reconcile; watch the validation curves in the LoRA figure."
        )
    cont = {r["domain"]: r for r in continuation_rows}
    merged_distinct = [r["merged"] for r in cont.values() if r["merged"] is not None]
    ref_distinct = [r["reference"] for r in cont.values() if r["reference"] is not None]
    if merged_distinct and ref_distinct:
        out.append(
            f"**A small base model.** The base has {count(base_model['n_params'])} parameters; merged test "
            f"perplexity is {ppl(min(g['merged'] for g in gains))}–{ppl(max(g['merged'] for g in gains))}, "
            f"and greedy continuations repeat themselves (distinct 4-gram ratio "
            f"{ratio(np.mean(merged_distinct), 2)} against {ratio(np.mean(ref_distinct), 2)} in the references). "
            "BLEU and chrF are near zero at this size and say little; judge by perplexity, and start from a "
            "larger pretrained checkpoint (`base_model.source: path`) for fluent text."
        )
    verified = dedup_metrics.get("verified_rate")
    if verified is not None:
        t = dedup_metrics.get("time") or {}
        cost = (
            f"; verification took {t['verify_s']:.2f} s of the {dedup_metrics['wall_s']:.2f} s run"
            if "verify_s" in t and "wall_s" in dedup_metrics
            else ""
        )
        out.append(
            f"**Dedup is recall-first.** {percent(1 - verified)} of LSH candidate pairs failed exact Jaccard "
            f"verification ({count(dedup_metrics['candidate_pairs'])} candidates, "
            f"{count(dedup_metrics['verified_pairs'])} verified){cost}. On a larger corpus the false "
            "candidates grow with it: raise r (a steeper S-curve) if verification time starts to dominate."
        )
    fin = refine_metrics["final_iteration"]
    members = {
        k.removeprefix("val_accuracy_"): v
        for k, v in fin.items()
        if k.startswith("val_accuracy_") and k != "val_accuracy_ensemble"
    }
    if members:
        best = max(members, key=members.get)
        gap = fin["val_accuracy_ensemble"] - members[best]
        out.append(
            f"**Label refinement.** The ensemble {'beats' if gap >= 0 else 'trails'} its best member "
            f"(`{best}`) by {100 * abs(gap):.1f} points of validation accuracy"
            f"{'' if gap >= 0 else ': weigh the members again, or drop the weakest'}; "
            f"{count(refine_metrics['review_queue_rows'])} low-confidence "
            "documents in `data/refined/review_queue.jsonl` are where a person's review pays most."
        )
    if io_speed is not None:
        first = io_speed.iloc[0]
        if first["load_avg_1m_at_start"] > first["cpu_count"]:
            out.append(
                f"**Noisy load-speed numbers.** The I/O benchmark started with a 1-minute load average of "
                f"{first['load_avg_1m_at_start']:.2f} on {count(first['cpu_count'])} CPUs: rerun "
                "`make bench` on an idle machine before quoting the speed-ups."
            )
    else:
        out.append("**No load-speed measurement.** Run `make bench` to compare Parquet and JSONL load speed.")
    gate = (classifier_metrics or {}).get("gate")
    if isinstance(gate, Mapping) and gate.get("passed") == 0:
        lora_f1, base_f1 = classifier_metrics["lora"]["macro_f1"], classifier_metrics["baseline"]["macro_f1"]
        behind = (
            f" and trails its char TF-IDF baseline ({ratio(lora_f1)} vs {ratio(base_f1)})" if lora_f1 < base_f1 else ""
        )
        out.append(
            f"**The classifier fails its gate.** Its kept attempt reaches test macro-F1 {ratio(lora_f1)} "
            f"< {gate.get('min_f1')} after {count(gate.get('attempts'))} attempt(s){behind}. The LoRA model "
            "reads at most `classifier.windows.predict` windows of `classifier.max_length` tokens of a "
            "document, the baseline all of it: `metrics/token_stats.json` says how many documents are longer "
            "than one window. Raise the window count, promote refined labels for another round, or start "
            "from a larger base model; the alert is in `metrics/classifier_alerts.json`."
        )
    if classifier_metrics is None:
        out.append(
            "**No classifier yet.** `metrics/classifier.json` does not exist, so the report cannot say "
            "whether the LoRA classifier beats its baseline."
        )
    return "\n".join(f"{i}. {text}" for i, text in enumerate(out, 1))
