"""train_classifier: a LoRA sequence classifier on the merged LM (peft ``SEQ_CLS``, Hu et al. 2021) trained on the
refined labels, scored on the test split's source labels against a char TF-IDF baseline (scikit-learn), gated on
macro-F1 with bounded retries that continue the previous model (a warm start), alerted, and registered in MLflow so that
the champion never regresses. The deployed model (``models/deployed``) is scored first whenever its classes match: on
the LM it was trained on it is kept when it passes, and otherwise the retries continue it (a warm start); after an LM
release it is scored beside a classifier trained on the new LM, the challenger, and the round keeps the better one.

The parts live in :mod:`domainlm.classify`; token statistics of the corpus are measured first.

Usage: ``python -m stages.train_classifier``; with ``classifier.deepspeed.enabled: true``, also under a launcher:
``torchrun --nproc_per_node 2 --master_addr 127.0.0.1 -m stages.train_classifier`` (docs/guides/scaling.md). Every rank
trains each attempt; rank 0 alone scores, saves, writes the metrics, logs to MLflow, registers and alerts.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from domainlm.classify import deployed as dep
from domainlm.classify import registry
from domainlm.classify.alerts import gate_alerts
from domainlm.classify.baseline import baseline_proba, fit_baseline, fit_sample
from domainlm.classify.candidates import DEPLOYED, LineTrainer, candidate_scores, choose_line, run_lines
from domainlm.classify.data import class_list, count_label_overrides, read_split, texts_at
from domainlm.classify.metrics import (
    classifier_metrics,
    macro_f1_intervals,
    new_data_scores,
    predicted_labels,
    prediction_rows,
    score,
)
from domainlm.classify.model import (
    ADAPTER_SUBDIR,
    BACKBONE_SUBDIR,
    MODEL_SUBDIR,
    appends_eos,
    predict_proba,
)
from domainlm.classify.token_stats import lengths_stats
from domainlm.classify.training import (
    follow_attempts,
    leading_attempts,
    scoring_kwargs,
    split_caches,
    windows_params,
)
from domainlm.classify.window_cache import DEFAULT_CACHE_DIR
from domainlm.common import params as P
from domainlm.common import paths, zero
from domainlm.common.atomic import atomic_path, scratch_folder, write_json, write_text
from domainlm.common.compute import resolve
from domainlm.common.metrics import flatten_numbers, rows_to_csv
from domainlm.common.stage import configure_logging, git_commit, parse_stage_args, stage_run
from domainlm.common.tracking import mlflow_run

STAGE = "train_classifier"
log = logging.getLogger(f"stages.{STAGE}")  # the logger stage_run(STAGE) configures
CONFUSION_COLUMNS = ["id", "actual", "predicted", "confidence"]


def run(
    domains: Sequence[str],
    cfg: Mapping[str, Any],
    mlflow,
    *,
    split_dir: str | os.PathLike,
    labels_path: str | os.PathLike,
    lm_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    token_stats_json: str | os.PathLike,
    confusion_csv: str | os.PathLike,
    baseline_confusion_csv: str | os.PathLike,
    alerts_json: str | os.PathLike,
    deployed_dir: str | os.PathLike | None = None,
    release_labels_path: str | os.PathLike | None = None,
    compute=None,
    window_cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
) -> dict[str, Any]:
    """Score the deployed model or train, then gate, register and alert; return the metrics.

    Steps: read the labelled splits (train/val: ``label``; test: ``source_label``) and the classes (train's
    labels); tokenize each split once into a memory-mapped window cache (:mod:`domainlm.classify.window_cache`,
    reused while the split files, the tokenizer and the window settings stay the same), which training, validation
    and test prediction read; write token statistics from the caches (``token_stats_json``, also an MLflow
    artifact); fit and score the TF-IDF baseline; plan the start from the deployed model
    (:func:`domainlm.classify.deployed.plan_start`) and run a gate (:func:`domainlm.classify.gate.run_gate`: attempt
    ``r`` is a nested MLflow run ``attempt_<r>``, seeded ``seed + r``; a retry continues the previous attempt) per
    candidate line (:mod:`domainlm.classify.candidates`): the deployed line (the deployed model scored as attempt 0,
    or its widened head continued; on its own backbone, runs ``deployed_attempt_<r>``, after an LM release) and the
    challenger (trained from the merged LM); keep the line :func:`domainlm.classify.candidates.choose_line` picks and
    write its kept attempt to ``out_dir`` (``model/``, ``adapter/``, ``backbone/``) atomically; write one CSV row per
    test document for the LoRA model and the baseline (``dvc plots`` confusion matrices); register the kept model as
    champion or challenger, or nothing when the deployed model was kept
    (:func:`domainlm.classify.registry.register_kept`);
    write ``alerts_json`` and POST its alerts to ``classifier.alert.webhook_url`` when set
    (:func:`domainlm.classify.alerts.gate_alerts`); bootstrap both test macro-F1s and their difference
    (:func:`domainlm.classify.metrics.macro_f1_intervals`, ``classifier.bootstrap``); assemble the metrics
    (:func:`domainlm.classify.metrics.classifier_metrics`) and log them, the run's tags and the CSVs to MLflow.

    Args:
        domains: the domains whose documents are classified, in order.
        cfg: the ``classifier`` params section.
        mlflow: the ``mlflow`` module inside the stage's active run.
        split_dir, labels_path: the split stage's documents and label table.
        lm_dir: the merged LM (HF folder with tokenizer).
        deployed_dir: the deployed classifier (``models/deployed``; :mod:`domainlm.classify.deployed`), or None.
        release_labels_path: the LM release's label table (``data/release/split_labels.parquet``), or None: test
            documents it lacks are the new ones (``new_data`` in the metrics).
        compute: the compute policy (:mod:`domainlm.common.compute`) of training and prediction; None = fp32.
        window_cache_dir: where the splits' window caches live (not a pipeline output: derived data, rebuilt
            when missing).

    Returns:
        Metrics (fractions in [0, 1], durations in seconds): ``classes``, ``docs``, ``label_overrides``,
        ``lora`` and ``baseline`` (:func:`domainlm.classify.metrics.score` on the test split, plus training
        figures and ``macro_f1_low``/``macro_f1_high``, the bootstrap interval), ``lora_to_baseline`` (ratios, and
        ``macro_f1_difference`` LoRA - baseline with its interval), ``bootstrap`` (confidence, resamples,
        method), ``start`` (``case``: ``fresh`` (nothing deployed, or a label space its head cannot map onto) |
        ``deployed_kept`` | ``deployed_retrained`` | ``deployed_widened`` (new classes: its head widened, known rows
        kept, and continued) | ``challenger`` (a new LM's classifier kept over the deployed line), ``reason``,
        ``line``, ``widened``, ``new_classes``, ``candidates`` (every candidate's scores,
        :func:`domainlm.classify.candidates.candidate_scores`), ``deployed_version``, ``deployed_test_macro_f1``, and
        ``lora_minus_deployed`` with its paired bootstrap interval when both were scored), ``new_data`` (test
        documents the LM release lacks: the deployed and the kept model's scores on them), ``gate``, ``registry``,
        ``alerts``, ``timing`` (seconds per step; the stage contract adds ``stage.wall_s``, ``stage.peak_rss_mb``
        and ``compute``).

    Raises:
        FileNotFoundError: a split file, the label table or the merged LM is missing.
        ValueError: fewer than two classes, no usable val document, bad gate params or retry schedule.
    """
    from transformers import AutoConfig, AutoTokenizer

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    seed = int(cfg.get("seed", 0))
    max_length = int(cfg["max_length"])
    gate_cfg, alert_cfg = cfg.get("gate") or {}, cfg.get("alert") or {}
    model_name = (cfg.get("registry") or {}).get("model_name", "domain-lm-classifier")
    n_train_windows, n_predict_windows = windows_params(cfg)
    serving_cfg = {
        "max_length": max_length,
        "max_windows": n_predict_windows,
        **(cfg.get("serving") or {}),
        "dtype": compute.dtype if compute is not None else "fp32",
    }
    min_f1 = float(gate_cfg.get("min_f1", 0.75))

    # the train split without its texts (training reads its token windows, the baseline a sample of its texts)
    train = read_split(split_dir, labels_path, domains, "train", with_texts=False)
    if not len(train):
        raise ValueError(f"no labelled train document in {labels_path} for domains {list(domains)}")
    val, test = (read_split(split_dir, labels_path, domains, s) for s in ("val", "test"))
    classes = class_list(train)
    log.info(
        "%d classes %s; %d train, %d val, %d test documents (test scored on source labels)",
        len(classes),
        classes,
        len(train),
        len(val),
        len(test),
    )

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    context = int(AutoConfig.from_pretrained(lm_dir, local_files_only=True).max_position_embeddings)
    caches = split_caches(tokenizer, lm_dir, split_dir, domains, cfg, window_cache_dir)
    window_cache_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = lengths_stats(
        {d: {s: c.n_tokens[c.domains == d] for s, c in caches.items()} for d in domains},
        max_length=max_length,
        context=context,
        appends_eos=appends_eos(tokenizer),
    )
    write_json(token_stats_json, stats)
    mlflow.log_artifact(str(token_stats_json))
    token_stats_s = time.perf_counter() - t0
    log.info(
        "token stats: train p50 %.0f / p95 %.0f tokens; %.1f%% of train documents cut at max_length %d",
        stats["all"]["train"]["p50_tokens"],
        stats["all"]["train"]["p95_tokens"],
        100 * stats["all"]["train"]["truncated_at_max_length"],
        max_length,
    )

    t0 = time.perf_counter()
    base_cfg = cfg.get("baseline") or {}
    fit_idx = fit_sample(train.labels, base_cfg.get("max_train_docs"), seed=seed)
    baseline = fit_baseline(
        texts_at(split_dir, domains, "train", [train.rows[i] for i in fit_idx]),
        [train.labels[i] for i in fit_idx],
        base_cfg,
        seed=seed,
    )
    base_proba = baseline_proba(baseline, test.texts, classes, max_chars=base_cfg.get("max_chars"))
    base_scores = {**score(test.labels, base_proba, classes), "train_s": time.perf_counter() - t0}
    log.info("TF-IDF baseline: test accuracy %.4f, macro-F1 %.4f", base_scores["accuracy"], base_scores["macro_f1"])

    # ---- the start from the deployed model: score it, continue it (its head widened for new classes), or not
    manifest = dep.read_manifest(deployed_dir) if deployed_dir is not None else None
    plan = dep.plan_start(
        manifest,
        deployed_dir,
        classes=classes,
        lm_dir=lm_dir,
        merged_lm_sha256=dep.tree_sha256(lm_dir),
    )
    log.info("deployed model: %s%s", plan.reason, f" (v{manifest['version']})" if manifest else "")

    t0 = time.perf_counter()
    scoring = scoring_kwargs(cfg, compute)

    def predict(model, tok, texts):
        return predict_proba(model, tok, texts, **scoring)

    with scratch_folder(out_dir.parent, "attempts") as work:  # a killed run's folder is removed by the next
        deployed = None
        if plan.score:
            deployed = dep.score_deployed(deployed_dir, manifest, val, test, classes, predict, min_f1)
        lines = run_lines(
            plan,
            LineTrainer(
                train,
                val,
                test,
                classes,
                cfg,
                seed=seed,
                min_f1=min_f1,
                work=Path(work),
                stage=STAGE,
                compute=compute,
                batch_size=scoring["batch_size"],
            ),
            deployed=deployed,
            manifest=manifest,
            deployed_dir=deployed_dir,
            lm_dir=lm_dir,
            windows=caches,
            windows_on=lambda backbone: split_caches(
                AutoTokenizer.from_pretrained(backbone, local_files_only=True),
                backbone,
                split_dir,
                domains,
                cfg,
                window_cache_dir,
            ),
            gate={"gate": gate_cfg, "train": cfg["train"]},
        )
        line = choose_line(lines)
        outcome = lines[line]
        kept = outcome.kept
        candidates = candidate_scores(lines, deployed)
        log.info(
            "kept the %s line (%s): %s",
            line,
            kept.source,
            "; ".join(f"{k} test macro-F1 {v['test_macro_f1']:.4f}" for k, v in candidates.items()),
        )
        with atomic_path(out_dir, is_dir=True) as tmp:
            for sub in (MODEL_SUBDIR, ADAPTER_SUBDIR):
                shutil.copytree(Path(kept.model_dir) / sub, Path(tmp) / sub)
            if kept.backbone_dir is not None:  # the LM its adapter loads back onto (the DVC cache stores it once)
                shutil.copytree(kept.backbone_dir, Path(tmp) / BACKBONE_SUBDIR)
    gate_s = time.perf_counter() - t0
    from_deployed = line == DEPLOYED

    write_text(
        confusion_csv, rows_to_csv(prediction_rows(test.ids, test.labels, kept.test_proba, classes), CONFUSION_COLUMNS)
    )
    write_text(
        baseline_confusion_csv,
        rows_to_csv(prediction_rows(test.ids, test.labels, base_proba, classes), CONFUSION_COLUMNS),
    )

    # ---- registry: a new version; champion only when it passed and does not regress on this test set
    t0 = time.perf_counter()
    overrides = count_label_overrides(labels_path)
    commit = git_commit()
    alias, registered, champion = registry.register_kept(
        mlflow,
        out_dir / MODEL_SUBDIR,
        outcome,
        model_name=model_name,
        classes=classes,
        test=test,
        split_dir=split_dir,
        labels_path=labels_path,
        domains=domains,
        label_overrides=overrides,
        git_commit=commit,
        deployed_version=manifest["version"] if from_deployed else None,
        serving_config=serving_cfg,
        logger=log,
    )
    register_s = time.perf_counter() - t0

    # ---- alerts
    published = gate_alerts(
        outcome,
        alerts_json,
        stage=STAGE,
        model_name=model_name,
        alias=alias,
        registered_version=registered["version"],
        champion=champion,
        git_commit=commit,
        mlflow_run_id=mlflow.active_run().info.run_id,
        webhook_url=alert_cfg.get("webhook_url"),
        timeout_s=float(alert_cfg.get("timeout_s", 5)),
        deployed_beside=(
            {"version": int(manifest["version"]), "macro_f1": deployed.macro_f1}
            if deployed is not None and not from_deployed
            else None
        ),
    )

    # ---- how far apart two test figures must be: paired bootstrap intervals of macro-F1 and of LoRA - baseline
    t0 = time.perf_counter()
    boot_cfg = cfg.get("bootstrap") or {}
    compared = {"lora": predicted_labels(kept.test_proba, classes), "baseline": predicted_labels(base_proba, classes)}
    if deployed is not None and kept.source != "deployed":
        compared["deployed"] = predicted_labels(deployed.test_proba, classes)
    boot = macro_f1_intervals(
        test.labels,
        compared,
        confidence=float(boot_cfg.get("confidence", 0.95)),
        n_resamples=int(boot_cfg.get("resamples", 1000)),
        seed=seed,
    )
    bootstrap_s = time.perf_counter() - t0
    lo, ba, diff = boot["macro_f1"]["lora"], boot["macro_f1"]["baseline"], boot["difference"]["lora-baseline"]
    log.info(
        "test macro-F1, %.0f%% %s bootstrap intervals (%d resamples, %d documents): LoRA %.4f [%.3f, %.3f], "
        "TF-IDF %.4f [%.3f, %.3f], LoRA - TF-IDF %+.4f [%+.3f, %+.3f]",
        100 * boot["confidence"],
        boot["method"],
        boot["n_resamples"],
        len(test),
        lo["value"],
        lo["low"],
        lo["high"],
        ba["value"],
        ba["low"],
        ba["high"],
        diff["value"],
        diff["low"],
        diff["high"],
    )

    new_data = new_data_scores(test, release_labels_path, classes, kept=kept, deployed=deployed)
    metrics = classifier_metrics(
        classes=classes,
        train=train,
        val=val,
        test=test,
        label_overrides=overrides,
        outcome=outcome,
        baseline=base_scores,
        baseline_docs=len(fit_idx),
        intervals=boot,
        deployed=deployed,
        from_deployed=from_deployed,
        start_reason=plan.reason,
        new_classes=list(plan.new_classes),
        candidates=candidates,
        line=line,
        deployed_version=int(manifest["version"]) if manifest else None,
        new_data=new_data,
        windows={"max_length": max_length, "train": n_train_windows, "predict": n_predict_windows},
        registered_version=registered["version"],
        promoted=alias == registry.CHAMPION,
        champion=champion,
        alerts=len(published["alerts"]),
        timing={
            "window_cache_s": window_cache_s,
            "token_stats_s": token_stats_s,
            "baseline_s": base_scores["train_s"],
            "gate_s": gate_s,
            "register_s": register_s,
            "bootstrap_s": bootstrap_s,
            "run_s": time.perf_counter() - t_start,
        },
    )
    mlflow.set_tags(
        {
            "gate": "passed" if outcome.passed else "failed",
            "registry.alias": alias,
            "registry.version": str(registered["version"]),
        }
    )
    mlflow.log_metrics(
        {
            k: v
            for k, v in flatten_numbers({k: metrics[k] for k in metrics if k != "registry"}).items()
            if ".confusion." not in k and ".per_class." not in k
        }
    )
    for path in (confusion_csv, baseline_confusion_csv, alerts_json):
        mlflow.log_artifact(str(path))
    return metrics


def main(argv: Sequence[str] = ()) -> None:
    parse_stage_args("train_classifier", __doc__, argv)
    if not zero.is_main_process():  # a DeepSpeed rank > 0: trains its share of rank 0's attempts, writes nothing
        configure_logging()
        compute = resolve(P.load_params().get("compute"))
        compute.apply()
        follow_attempts(
            paths.MERGED_DIR,
            paths.SPLIT_DIR,
            paths.LABELS_PATH,
            P.required_domains(STAGE),
            P.section("classifier"),
            compute=compute,
            window_cache_dir=DEFAULT_CACHE_DIR,
        )
        return
    with stage_run(STAGE) as st:
        cfg = P.section("classifier")
        domains = P.required_domains(STAGE)
        compute = st.use_compute(resolve(P.load_params().get("compute")))
        with leading_attempts(cfg), mlflow_run(STAGE, cfg) as mlflow:  # under DeepSpeed, rank 0 leads the other ranks
            metrics = run(
                domains,
                cfg,
                mlflow,
                compute=compute,
                deployed_dir=paths.DEPLOYED_DIR,
                release_labels_path=paths.RELEASE_LABELS_PATH,
                split_dir=paths.SPLIT_DIR,
                labels_path=paths.LABELS_PATH,
                lm_dir=paths.MERGED_DIR,
                out_dir=paths.CLASSIFIER_DIR,
                token_stats_json=paths.TOKEN_STATS_JSON,
                confusion_csv=paths.CLASSIFIER_CONFUSION_CSV,
                baseline_confusion_csv=paths.BASELINE_CONFUSION_CSV,
                alerts_json=paths.CLASSIFIER_ALERTS_JSON,
            )
            st.write_metrics("classifier", metrics)
        st.log.info(
            "%s: LoRA macro-F1 %.4f vs TF-IDF %.4f (x%.2f); gate %s after %d attempt(s); v%d is %s",
            STAGE,
            metrics["lora"]["macro_f1"],
            metrics["baseline"]["macro_f1"],
            metrics["lora_to_baseline"]["macro_f1"] or float("nan"),
            "passed" if metrics["gate"]["passed"] else "FAILED",
            metrics["gate"]["attempts"],
            metrics["registry"]["version"],
            "champion" if metrics["registry"]["champion"] else "challenger",
        )


if __name__ == "__main__":
    main(sys.argv[1:])
