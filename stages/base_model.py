"""base_model: train a byte-level BPE tokenizer and pretrain a small Qwen2 causal LM from scratch (nanoGPT-style
loop, Karpathy 2022; ``transformers.Qwen2ForCausalLM``), or copy a local HF checkpoint; then measure its
validation perplexity on every domain. The recipe lives in :mod:`domainlm.lm.pretrain`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.compute import resolve
from domainlm.common.metrics import peak_rss_mb
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.common.tracking import mlflow_run
from domainlm.lm import data as lm_data
from domainlm.lm.pretrain import build, copy_checkpoint, save_hf_folder, val_perplexities


def run(
    split_dir: str | os.PathLike,
    domains: Sequence[str],
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    compute=None,
) -> dict[str, Any]:
    """Build (or copy) the base model into ``out_dir`` and measure it.

    Args:
        split_dir: folder of ``<domain>/{train,val}.parquet``; train texts of all ``domains`` are pooled
            for pretraining, each domain's val texts give its perplexity.
        params: the ``base_model`` params section (source, path, seed, tokenizer, model, train).
        out_dir: the HF folder written (config.json, model.safetensors, tokenizer files), atomically.
        on_log: called as ``on_log(step, {"loss", "lr"})`` every ``train.log_every`` pretraining steps.
        compute: the compute policy (:mod:`domainlm.common.compute`): pretraining and the perplexity passes run
            under its autocast; None = fp32.

    Returns:
        metrics: ``n_params``, ``val_perplexity`` ({domain: perplexity}), and for ``source: build`` also
        ``train_loss`` (nats/token), ``tokens_seen``, ``tokens_per_s``, ``train_s``, ``n_blocks``;
        ``wall_s`` (seconds) and ``peak_rss_mb`` (MiB).

    Raises:
        ValueError: ``source`` is neither ``build`` nor ``path``, or ``path`` is unset for ``source: path``;
            from :func:`~domainlm.lm.pretrain.copy_checkpoint` when the folder is not a causal LM.
        FileNotFoundError: a split file or the checkpoint folder is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    source = params.get("source", "build")
    if source == "build":
        train_texts = lm_data.read_domain_texts(split_dir, domains, "train")
        model, tokenizer, stats = build(train_texts, params, on_log=on_log, compute=compute)
        save_hf_folder(model, tokenizer, out_dir)
    elif source == "path":
        if not params.get("path"):
            raise ValueError("base_model.source is 'path' but base_model.path is not set")
        copy_checkpoint(params["path"], out_dir)
        stats = None
    else:
        raise ValueError(f"base_model.source must be 'build' or 'path', got {source!r}")

    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    block_size = min(int(params["model"]["context_length"]), int(model.config.max_position_embeddings))
    val_ppl = val_perplexities(
        model,
        tokenizer,
        lm_data.read_domain_texts(split_dir, domains, "val"),
        block_size,
        int(params["train"]["eval_batch_size"]),
        compute=compute,
    )
    metrics: dict[str, Any] = {"n_params": int(model.num_parameters()), "val_perplexity": val_ppl}
    if stats is not None:
        metrics.update(
            {
                "train_loss": stats["final_loss"],
                "tokens_seen": stats["tokens_seen"],
                "tokens_per_s": stats["tokens_per_s"],
                "train_s": stats["train_s"],
                "n_blocks": stats["n_blocks"],
            }
        )
    metrics.update({"wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    return metrics


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("base_model", __doc__, argv)
    with stage_run("base_model") as st:
        cfg = P.section("base_model")
        compute = st.use_compute(resolve(P.load_params().get("compute")))
        with mlflow_run("base_model", cfg) as mlflow:
            metrics = run(
                paths.LM_DATA_DIR,
                P.required_domains("base_model"),
                cfg,
                paths.BASE_DIR,
                compute=compute,
                on_log=lambda step, m: mlflow.log_metrics({"train_loss": m["loss"], "lr": m["lr"]}, step=step),
            )
            st.write_metrics("base_model", metrics)
            mlflow.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, dict)})
            mlflow.log_metrics({f"val_perplexity.{d}": v for d, v in metrics["val_perplexity"].items()})
        st.log.info("base model written to %s: %s", paths.BASE_DIR, metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
