"""DeepSpeed ZeRO-2 through train_classifier on DeepSpeed's CPU accelerator (the switch and code of train_lora,
domainlm.common.zero): the shipped config and its CPU adaptation, gradient checkpointing with LoRA, and a real two-rank
run over gloo on 127.0.0.1, ``torchrun --nproc_per_node 2 -m stages.train_classifier`` with a gate that fails, so its
retry continues the first attempt under DeepSpeed, against a single process on the same global batch."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
import yaml
from classifier_fixtures import CLASSES, DOMAINS, build_tiny_lm, classifier_params, write_labelled_splits
from conftest import ROOT
from safetensors.torch import load_file
from test_train_lora_zero import torchrun
from tiny_lm import one_torch_thread  # noqa: F401  (autouse: tiny models run faster on one thread)

from domainlm.classify import data, gate, training
from domainlm.classify import model as cls_model
from domainlm.common import zero

# Attempt 0's training losses on 2 ZeRO-2 ranks x 8 documents must equal a single process's on 16 within this relative
# tolerance. Both are fp32 on the same global batches (the length-grouped order puts the same 16 documents in a step),
# and differ only by summation order (each rank pads its 8 windows to its own longest, the loss is the mean over
# ranks, the gradients are all-reduced) and DeepSpeedCPUAdam vs torch AdamW: measured <= 1.0e-6 over the 8 steps.
LOSS_RTOL = 1e-5
# The saved model/ (adapter merged into the weights) reloaded in another process vs the test-set probabilities rank 0
# scored after training: plots/classifier_confusion.csv keeps 6 decimals (5e-7 of rounding); measured 4.9e-7.
PROBA_ATOL = 2e-6
SETTINGS = {"epochs": 2, "logging_steps": 1, "early_stopping_patience": 3}


def shipped() -> dict:
    with open(ROOT / "params.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)["classifier"]["deepspeed"]


def test_the_shipped_config_is_zero2_with_optimizer_offload_and_cpu_config_turns_bf16_off():
    config = shipped()["config"]
    zo = config["zero_optimization"]
    assert zo["stage"] == 2 and zo["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zo  # ZeRO-3's; ZeRO-2 keeps the whole model on every rank
    assert config["gradient_accumulation_steps"] == "auto" and config["optimizer"]["type"] == "AdamW"
    adapted, changes = zero.cpu_config(config)
    assert [(c.key, c.shipped, c.used) for c in changes] == [("bf16.enabled", "auto", False)]
    assert {k: v for k, v in adapted.items() if k != "bf16"} == {k: v for k, v in config.items() if k != "bf16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default on a machine without CUDA")
def test_auto_is_off_without_cuda_so_the_default_pipeline_trains_as_before(caplog):
    assert training.deepspeed_config({"deepspeed": shipped()}) is None
    assert "classifier.deepspeed.enabled: auto uses it on GPU only" in caplog.text
    assert shipped()["enabled"] == "auto"
    with pytest.raises(ValueError, match="classifier.deepspeed.enabled must be auto, true or false"):
        training.deepspeed_config({"deepspeed": {"enabled": "true", "config": shipped()["config"]}})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The pipeline's layout under a fresh root: data/split, data/labels/split_labels.parquet, models/merged."""
    root = tmp_path_factory.mktemp("classifier_zero")
    split_dir, labels_path = write_labelled_splits(
        root / "data", labels_path=root / "data" / "labels" / "split_labels.parquet"
    )
    lm_dir = build_tiny_lm(root / "models" / "merged")
    splits = data.read_splits(split_dir, labels_path, DOMAINS)
    return {"root": root, "lm_dir": lm_dir, "train": splits["train"], "val": splits["val"], "test": splits["test"]}


def single_process(corpus, cfg: dict, settings: dict, *, seed: int):
    """One attempt in this process: ``(training loss by step, the trained model)``."""
    losses = {}
    model, _, _ = training.train_attempt(
        corpus["lm_dir"],
        corpus["train"],
        corpus["val"],
        CLASSES,
        cfg,
        settings,
        seed=seed,
        on_log=lambda step, figures: losses.update({step: figures["loss"]} if "loss" in figures else {}),
    )
    return losses, model


def test_gradient_checkpointing_trains_the_lora_classifier_as_without_it(corpus):
    """Recomputed activations (non-reentrant checkpointing) give the same LoRA gradients, so the same losses."""
    cfg = classifier_params(train={"epochs": 1, "logging_steps": 1})
    settings = gate.attempt_settings(cfg["train"], cfg["gate"], 0)
    plain, model = single_process(corpus, cfg, settings, seed=0)
    checkpointed, model_gc = single_process(corpus, cfg, settings | {"gradient_checkpointing": True}, seed=0)
    assert [m.get_base_model().is_activation_checkpointing for m in (model, model_gc)] == [False, True]
    assert sorted(plain) == sorted(checkpointed) and len(plain) >= 4
    for step, loss in plain.items():
        assert checkpointed[step] == pytest.approx(loss, rel=1e-5), step


# ------------------------------------------------------------------------------------------------- two CPU ranks
@pytest.fixture(scope="module")
def zero_run(corpus):
    """``torchrun --nproc_per_node 2 -m stages.train_classifier`` with ``deepspeed.enabled: true`` (the shipped
    config), ``compile: true`` (which DeepSpeed turns off) and a gate no attempt passes (attempt 0 and one retry).

    Returns ``(root, classifier params, metrics, probe records by (rank, attempt))``.
    """
    if torch.cuda.is_available():
        pytest.skip("checks DeepSpeed on its CPU accelerator")
    root = corpus["root"]
    cfg = classifier_params(
        compile=True,
        train=SETTINGS,
        gate={"min_f1": 0.99, "max_retries": 1, "retry_epochs": 1},
        bootstrap={"confidence": 0.95, "resamples": 200},
        deepspeed=shipped() | {"enabled": True},
    )
    params = {"domains": DOMAINS, "classifier": cfg, "compute": {"dtype": "fp32", "threads": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    proc = torchrun(
        ["-m", "stages.train_classifier"],
        root,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", zero.PROBE_ENV: str(root / "probe")},
    )
    assert "classifier.compile is off under DeepSpeed" in proc.stderr
    metrics = json.loads((root / "metrics" / "classifier.json").read_text())
    probes = {
        (r, a): json.loads((root / "probe" / f"rank{r}_seed{a}.json").read_text()) for r in (0, 1) for a in (0, 1)
    }
    return root, cfg, metrics, probes


@pytest.mark.slow
def test_every_attempt_trains_on_a_zero2_engine_over_two_gloo_ranks(zero_run):
    _, _, metrics, probes = zero_run
    assert metrics["gate"]["attempts"] == 2 and metrics["gate"]["passed"] == 0 and metrics["compiled_layers"] == 0
    for (rank, _), p in probes.items():
        assert p["rank"] == rank and p["trainer_process_index"] == rank
        assert p["engine_class"] == "deepspeed.runtime.engine.DeepSpeedEngine" and p["zero_stage"] == 2
        assert p["engine_world_size"] == p["dp_world_size"] == p["dist_world_size"] == p["trainer_world_size"] == 2
        assert p["dist_backend"] == "gloo" and p["accelerator"] == "cpu" and p["bf16"] is False
        assert p["optimizer_class"] == "DeepSpeedZeroOptimizer" and p["basic_optimizer_class"] == "DeepSpeedCPUAdam"
        assert p["base_digest_before"] == p["base_digest_after"]  # the merged LM stays frozen
    for attempt in (0, 1):  # both ranks logged the same (all-reduced) losses
        a, b = ([h["loss"] for h in probes[r, attempt]["log_history"] if "loss" in h] for r in (0, 1))
        assert a == b and a


@pytest.mark.slow
def test_first_attempt_losses_match_a_single_process_on_the_same_global_batch(zero_run, corpus):
    _, cfg, _, probes = zero_run
    single = copy.deepcopy(cfg)
    single["compile"], single["deepspeed"]["enabled"] = False, False
    single["train"]["batch_size"] = 2 * cfg["train"]["batch_size"]  # one process, the global batch of 2 ranks
    plain, _ = single_process(corpus, single, gate.attempt_settings(single["train"], single["gate"], 0), seed=0)
    zero2 = {h["step"]: h["loss"] for h in probes[0, 0]["log_history"] if "loss" in h}
    assert sorted(plain) == sorted(zero2) and len(zero2) == 2 * 4  # 2 epochs of 64 documents in steps of 16
    for step in plain:
        assert zero2[step] == pytest.approx(plain[step], rel=LOSS_RTOL), step


@pytest.mark.slow
def test_rank0_alone_saved_and_registered_and_the_saved_model_predicts_as_in_training(zero_run, corpus):
    import mlflow

    root, cfg, metrics, _ = zero_run
    runs = (root / "logs" / "pipeline_run.log").read_text().splitlines()
    assert len(runs) == 1 and runs[0].startswith("train_classifier\t") and "\tok\t" in runs[0]
    assert sorted(p.name for p in (root / "models").iterdir()) == ["classifier", "merged"]  # no temp sibling left
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("domain-lm").experiment_id])
    assert sorted(r.info.run_name for r in found) == ["attempt_0", "attempt_1", "train_classifier"]
    (version,) = client.search_model_versions("name = 'domain-lm-classifier'")
    assert int(version.version) == metrics["registry"]["version"] == 1

    kept = metrics["gate"]["kept_attempt"]
    saved = load_file(root / "models" / "classifier" / "adapter" / "adapter_model.safetensors")
    for rank in (0, 1):  # the saved adapter is what every rank trained in the kept attempt
        trained = load_file(root / "probe" / f"rank{rank}_seed{kept}_lora.safetensors")
        assert trained.keys() == saved.keys() and any(".score." in k for k in saved)
        for k in saved:
            assert torch.equal(trained[k], saved[k].float()), k

    model, tok = cls_model.load_classifier(root / "models" / "classifier" / "model")
    proba = cls_model.predict_proba(model, tok, corpus["test"].texts, **training.scoring_kwargs(cfg))
    with (root / "plots" / "classifier_confusion.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == corpus["test"].ids
    for row, p in zip(rows, proba):
        assert row["predicted"] == CLASSES[int(p.argmax())]
        assert float(row["confidence"]) == pytest.approx(float(p.max()), abs=PROBA_ATOL)
