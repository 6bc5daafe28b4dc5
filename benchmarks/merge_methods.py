"""Compare the merge methods of domainlm.lm.merging on the pipeline's real experts: retained gain and perplexity.

Baseline: ``linear`` (task arithmetic) at the λ that params.yaml sets, measured in the same run.
Every other (method, λ) pair — ``ties`` and ``dare`` with their params options, and each method at
every ``--lams`` value — is merged from the same task vectors (models/diff) and scored with the
evaluate stage's perplexity probe (same test token streams, windows and caps, domainlm.lm.evaluation).
Reports per domain the merged perplexity and retained gain (ppl_base − ppl_merged) / (ppl_base −
ppl_expert), their mean, its ratio to the baseline's, how many domains the merge beats the base
on, and the merge's wall time. Writes benchmarks/results/merge_methods.csv and its ``.meta.json`` sidecar
(hardware, commit, date).

Run from the repository root (it reads params.yaml, models/ and data/split/ of the current directory)
after ``dvc repro diff``: ``python benchmarks/merge_methods.py [--lams 0.25 0.5]``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the `domainlm` package importable
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "merge_methods.csv"


def main() -> None:
    from measure import write_meta
    from transformers import AutoTokenizer

    from domainlm.common import params as P
    from domainlm.common.paths import BASE_DIR, DIFF_DIR, SPLIT_DIR
    from domainlm.lm.evaluation import PerplexityProbe, expert_states, read_test_split
    from domainlm.lm.merging import (
        MERGE_METHODS,
        load_causal_lm,
        load_task_vectors,
        merge,
        method_options,
        resolve_weights,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lams", type=float, nargs="*", default=[0.5, 1.0], help="extra λ values tried for every method"
    )
    args = parser.parse_args()

    domains = P.domains()
    merge_cfg, eval_cfg = P.section("merge"), P.section("evaluate")
    baseline_lam = float(merge_cfg.get("lam", 1.0))
    weights = resolve_weights(merge_cfg.get("weights"), domains)
    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR, local_files_only=True)
    model = load_causal_lm(BASE_DIR)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task_vectors = load_task_vectors(DIFF_DIR, domains)
    texts = {d: read_test_split(SPLIT_DIR, d, int(eval_cfg.get("seed", 0))) for d in domains}
    probe = PerplexityProbe.from_params(eval_cfg, tokenizer, texts, model.config.max_position_embeddings)

    ppl_base = probe.run(model, "base")
    ppl_expert = {}
    for domain, state in expert_states(base, task_vectors):
        model.load_state_dict(state)
        one = PerplexityProbe({domain: probe.streams[domain]}, probe.max_length, probe.stride, probe.batch_size)
        ppl_expert[domain] = one.run(model, f"expert_{domain}")[domain]

    configs = [("linear", baseline_lam)]
    for method in sorted(MERGE_METHODS):
        for lam in [baseline_lam, *args.lams]:
            if (method, lam) not in configs:
                configs.append((method, lam))
    rows = []
    for method, lam in configs:
        _, options = method_options({**merge_cfg, "method": method, "lam": lam})
        start = time.perf_counter()
        merged = merge(method, base, task_vectors, weights, **options)
        merge_s = time.perf_counter() - start
        model.load_state_dict(merged)
        ppl = probe.run(model, f"{method}@{lam}")
        gains = {d: (ppl_base[d] - ppl[d]) / (ppl_base[d] - ppl_expert[d]) for d in domains}
        row = {
            "method": method,
            "lam": lam,
            "options": " ".join(f"{k}={v}" for k, v in options.items() if k != "lam"),
            "mean_retained_gain": sum(gains.values()) / len(gains),
            "domains_below_base": sum(ppl[d] < ppl_base[d] for d in domains),
            "merge_s": merge_s,
        }
        row.update({f"retained_gain_{d}": gains[d] for d in domains})
        row.update({f"ppl_{d}": ppl[d] for d in domains})
        rows.append(row)
        print(
            f"{method:7s} λ={lam:<5} mean retained gain {row['mean_retained_gain']:.3f} "
            f"below base on {row['domains_below_base']}/{len(domains)}",
            flush=True,
        )
    baseline = rows[0]["mean_retained_gain"]
    for row in rows:
        row["ratio_vs_linear"] = row["mean_retained_gain"] / baseline if baseline else float("nan")
    columns = [
        "method",
        "lam",
        "options",
        "mean_retained_gain",
        "ratio_vs_linear",
        "domains_below_base",
        "merge_s",
        *(f"retained_gain_{d}" for d in domains),
        *(f"ppl_{d}" for d in domains),
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        # reference rows: the base, and each expert on its own domain (the gain a merge can retain)
        writer.writerow({"method": "base", **{f"ppl_{d}": ppl_base[d] for d in domains}})
        writer.writerow({"method": "expert_own_domain", **{f"ppl_{d}": ppl_expert[d] for d in domains}})
    write_meta(RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
