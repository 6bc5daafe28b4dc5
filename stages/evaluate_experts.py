"""evaluate_experts: the reference perplexities of the merge, measured once per base and task vectors: the base
model and every expert (base + its task vector, λ = 1) on every domain's test stream.

``evaluate`` reads them to compute retained gain, (ppl_base − ppl_merged) / (ppl_base − ppl_expert), and scores
only the merged model itself; so an experiment on the merge (``dvc exp run -S merge.method=ties``) re-runs the
merged model's pass, not the other 1 + len(domains) passes. Writes ``eval/reference_perplexity.json``
(:func:`domainlm.lm.evaluation.reference_record`: the perplexities and the probe's fingerprint, which ``evaluate``
checks) and ``metrics/evaluate_experts.json``.

Perplexity follows the Hugging Face sliding-window recipe (:mod:`domainlm.lm.evaluation`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.atomic import write_json
from domainlm.common.compute import autocast, resolve
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.lm.evaluation import PerplexityProbe, expert_states, read_test_split, reference_record
from domainlm.lm.merging import load_causal_lm, load_task_vectors


def run(
    domains: Sequence[str],
    cfg: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike,
    diff_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    reference_json: str | os.PathLike,
    compute=None,
) -> dict[str, Any]:
    """Measure the base and every expert on every domain's test stream and write ``reference_json``.

    Args:
        domains: the domains (one task vector and one test split each).
        cfg: the ``evaluate`` params (``seed``, ``max_length``, ``stride``, ``batch_size``, ``max_tokens_per_domain``).
        base_dir: the base model's HF folder (weights + tokenizer).
        diff_dir: ``<domain>.safetensors`` task vectors.
        split_dir: ``<domain>/test.parquet``.
        reference_json: where :func:`~domainlm.lm.evaluation.reference_record` goes (atomically).
        compute: the compute policy (:mod:`domainlm.common.compute`) the passes run under; None = fp32.

    Returns:
        metrics: ``perplexity`` ({"base" | "expert_<d>": {domain: ppl}}), ``tokens`` ({domain: stream tokens}),
        ``timing`` (``perplexity_s`` seconds, ``scored_tokens_per_s``).

    Raises:
        FileNotFoundError: the base, a task vector or a test split is missing.
        ValueError: an empty test split.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = load_causal_lm(base_dir)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task_vectors = load_task_vectors(diff_dir, list(domains))
    texts = {d: read_test_split(split_dir, d, int(cfg.get("seed", 0))) for d in domains}
    probe = PerplexityProbe.from_params(cfg, tokenizer, texts, model.config.max_position_embeddings)

    t0 = time.perf_counter()
    with autocast(compute):
        ppl: dict[str, dict[str, float]] = {"base": probe.run(model, "base")}
        for domain, state in expert_states(base_state, task_vectors):
            model.load_state_dict(state, strict=True)
            ppl[f"expert_{domain}"] = probe.run(model, f"expert_{domain}")
    perplexity_s = time.perf_counter() - t0
    write_json(reference_json, reference_record(probe, ppl))
    scored = sum(int(ids.numel()) - 1 for ids in probe.streams.values()) * len(ppl)
    return {
        "perplexity": ppl,
        "tokens": {d: int(ids.numel()) for d, ids in probe.streams.items()},
        "timing": {"perplexity_s": perplexity_s, "scored_tokens_per_s": scored / perplexity_s},
    }


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("evaluate_experts", __doc__, argv)
    with stage_run("evaluate_experts") as st:
        cfg = P.section("evaluate")
        domains = P.required_domains("evaluate_experts")
        compute = st.use_compute(resolve(P.load_params().get("compute")))
        metrics = run(
            domains,
            cfg,
            compute=compute,
            base_dir=paths.BASE_DIR,
            diff_dir=paths.DIFF_DIR,
            split_dir=paths.LM_DATA_DIR,
            reference_json=paths.REFERENCE_PERPLEXITY_JSON,
        )
        st.write_metrics("evaluate_experts", metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
