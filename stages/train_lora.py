"""train_lora@<domain>: one domain expert, a LoRA adapter (Hu et al. 2021, via ``peft``) on the frozen base,
trained with the HF Trainer and kept at its best validation loss (:mod:`domainlm.lm.lora`).

Usage: ``python -m stages.train_lora <domain>``; with ``train_lora.deepspeed.enabled: true``, also under a launcher:
``torchrun --nproc_per_node 2 --master_addr 127.0.0.1 -m stages.train_lora <domain>`` (docs/guides/scaling.md).
Rank 0 alone writes the adapter, the log, the metrics and the MLflow run; the other ranks only train.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from domainlm.common import params as P
from domainlm.common import paths, zero
from domainlm.common.compute import resolve
from domainlm.common.metrics import peak_rss_mb
from domainlm.common.stage import configure_logging, parse_stage_args, stage_run
from domainlm.common.tracking import mlflow_run
from domainlm.lm import data as lm_data
from domainlm.lm.lora import train_adapter


def run(
    domain: str,
    base_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    log_path: str | os.PathLike,
    *,
    mlflow=None,
    compute=None,
) -> dict[str, Any]:
    """Train ``domain``'s adapter on ``<split_dir>/<domain>/train.parquet``, validating on its ``val.parquet``.

    Args:
        base_dir: HF folder of the base causal LM with its tokenizer.
        params: the ``train_lora`` params section (seed, lora, train, deepspeed).
        out_dir: the adapter folder written (peft ``save_pretrained``), atomically.
        log_path: the Trainer log written, one JSON line per log event.
        mlflow: the ``mlflow`` module inside an active run, or None.
        compute: the compute policy (:mod:`domainlm.common.compute`); None = fp32.

    Returns:
        :func:`~domainlm.lm.lora.train_adapter`'s metrics plus ``wall_s`` (seconds) and ``peak_rss_mb`` (MiB);
        on a DeepSpeed rank other than 0, which writes nothing, ``{}``.

    Raises:
        FileNotFoundError: a split file is missing. ValueError: see :func:`~domainlm.lm.lora.train_adapter`.
    """
    t0 = time.perf_counter()
    metrics = train_adapter(
        base_dir,
        lm_data.read_texts(paths.split_path(split_dir, domain, "train")),
        lm_data.read_texts(paths.split_path(split_dir, domain, "val")),
        params,
        out_dir,
        log_path,
        mlflow=mlflow,
        compute=compute,
    )
    if metrics:
        metrics.update({"wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    return metrics


def main(argv: Sequence[str] = ()) -> None:
    domain = parse_stage_args("train_lora", __doc__, argv, domain=True).domain
    if not zero.is_main_process():  # a DeepSpeed rank > 0: trains its share of each batch, writes nothing
        configure_logging()
        compute = resolve(P.load_params().get("compute"))
        compute.apply()
        run(
            domain,
            paths.BASE_DIR,
            paths.LM_DATA_DIR,
            P.section("train_lora"),
            paths.LORA_DIR / domain,
            paths.train_log_path(domain),
            compute=compute,
        )
        return
    stage = f"train_lora@{domain}"
    with stage_run(stage) as st:
        known = P.domains()
        if domain not in known:
            raise ValueError(f"unknown domain {domain!r}: params.yaml domains are {known}")
        cfg = P.section("train_lora")
        compute = st.use_compute(resolve(P.load_params().get("compute")))
        out_dir = paths.LORA_DIR / domain
        with mlflow_run(stage, {"domain": domain, **cfg}) as mlflow:
            metrics = run(
                domain,
                paths.BASE_DIR,
                paths.LM_DATA_DIR,
                cfg,
                out_dir,
                paths.train_log_path(domain),
                mlflow=mlflow,
                compute=compute,
            )
            st.write_metrics(f"train_lora/{domain}", metrics)
            mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
        st.log.info("%s: adapter written to %s: %s", stage, out_dir, metrics)


if __name__ == "__main__":
    main(sys.argv[1:])
