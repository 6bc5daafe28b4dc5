"""train_lora stage (domainlm.lm.lora): LoRA freezes the base, best adapter by val loss is kept, determinism,
DeepSpeed config, main()."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from lm_fixtures import TINY, TRAIN_TEXTS, korean_docs, write_split_fixture
from safetensors.torch import load_file

from domainlm.lm import data as lm_data
from domainlm.lm import lora, pretrain
from stages import train_lora


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def default_params() -> dict:
    with open("params.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)["train_lora"]


LORA_TINY = {
    "seed": 3,
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "train": {
        "context_length": None,
        "max_steps": 15,
        "max_epochs": 100,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "lr": 1.0e-2,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "eval_steps": 3,
        "logging_steps": 3,
        "eval_batch_size": 64,
        "eval_max_blocks": None,
    },
    "deepspeed": default_params()["deepspeed"],
}
# Train on law, validate on office_help: the adapter drifts away from the val domain, so the
# best val loss comes before the last evaluation and "keep the best" is observable.
LAW_TRAIN = korean_docs("law", 16, seed=1)
SHIFTED_VAL = korean_docs("office_help", 3, seed=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    model, tok, _ = pretrain.build(TRAIN_TEXTS, TINY)
    return pretrain.save_hf_folder(model, tok, tmp_path_factory.mktemp("models") / "base")


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """One adapter trained with LORA_TINY: (metrics, adapter dir, log path)."""
    root = tmp_path_factory.mktemp("run")
    metrics = lora.train_adapter(
        base_dir, LAW_TRAIN, SHIFTED_VAL, LORA_TINY, root / "models" / "lora" / "law", root / "logs" / "train_law.log"
    )
    return metrics, root / "models" / "lora" / "law", root / "logs" / "train_law.log"


def load_base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)


def test_lora_freezes_the_base_and_trains_only_lora_weights(base_dir):
    model = lora.attach_lora(load_base(base_dir), LORA_TINY["lora"], seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # r * (in + out) per wrapped linear: q and o are 32x32, k and v 32x16 (one of two heads is a kv head).
    r, layers = LORA_TINY["lora"]["r"], TINY["model"]["num_hidden_layers"]
    expected = layers * r * ((32 + 32) * 2 + (32 + 16) * 2)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # B starts at zero: the wrapped model computes exactly what the base does.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_base(base_dir)(ids).logits)


def test_unknown_target_module_is_an_error(base_dir):
    bad = {**LORA_TINY["lora"], "target_modules": ["no_such_proj"]}
    with pytest.raises(ValueError, match="no_such_proj"):
        lora.attach_lora(load_base(base_dir), bad, seed=0)


def test_saved_adapter_loads_with_peft_and_changes_the_base(trained, base_dir):
    from peft import PeftModel

    metrics, out, _ = trained
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["law"]  # no temp sibling left behind
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())  # B moved off zero
    model = PeftModel.from_pretrained(load_base(base_dir), out)
    blocks = lm_data.pack_blocks(_tokenizer(base_dir), SHIFTED_VAL, 32)
    nll, _ = lm_data.mean_nll(model, blocks)
    assert nll == pytest.approx(metrics["val_loss"], abs=1e-5)
    assert metrics["trainable_params"] == sum(v.numel() for v in tensors.values())
    assert metrics["total_params"] == load_base(base_dir).num_parameters() + metrics["trainable_params"]


def _tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)


def test_best_adapter_by_val_loss_is_kept(trained):
    metrics, _, log_path = trained
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, log_path.read_text().splitlines()) if "eval_loss" in r}
    assert 0 in evals  # evaluation on start: the base's val loss
    trained_evals = {s: v for s, v in evals.items() if s > 0}
    best_step = min(trained_evals, key=trained_evals.get)
    last_step = max(trained_evals)
    assert best_step != last_step and trained_evals[last_step] - trained_evals[best_step] > 1e-3  # fixture sanity
    assert metrics["best_step"] == best_step
    # The val set fits in one eval batch, so the Trainer's eval_loss is the token-weighted NLL.
    assert metrics["val_loss"] == pytest.approx(trained_evals[best_step], abs=1e-5)
    assert metrics["base_val_loss"] == pytest.approx(evals[0], abs=1e-5)


def test_log_has_one_json_line_per_logging_step(trained):
    metrics, _, log_path = trained
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [3, 6, 9, 12, 15]
    for r in records:
        assert {"step", "epoch"} <= set(r)
        if "loss" in r:
            assert r["lr"] >= 0 and r["loss"] > 0
    assert metrics["steps"] == 15 and metrics["tokens_seen"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["val_perplexity"] == pytest.approx(2.718281828 ** metrics["val_loss"], rel=1e-6)


def test_same_params_give_the_same_adapter(base_dir, tmp_path):
    params = copy.deepcopy(LORA_TINY)
    params["lora"]["lora_dropout"] = 0.1  # the dropout masks must be seeded too
    params["train"].update(max_steps=4, eval_steps=2)
    for run in ("a", "b"):
        lora.train_adapter(base_dir, LAW_TRAIN, SHIFTED_VAL, params, tmp_path / run, tmp_path / f"{run}.log")
    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    params["seed"] += 1
    lora.train_adapter(base_dir, LAW_TRAIN, SHIFTED_VAL, params, tmp_path / "c", tmp_path / "c.log")
    c = load_file(tmp_path / "c" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_planned_steps_bounded_by_max_steps_and_epochs():
    tp = {"batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 100, "max_epochs": 3}
    assert lora.planned_steps(10, tp) == 4  # ceil(3 * 10 / 8)
    assert lora.planned_steps(1000, tp) == 100  # capped by max_steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_trains_without_deepspeed_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="domainlm.lm.lora"):
        assert lora.deepspeed_config(default_params()["deepspeed"]) is None
    assert "without DeepSpeed" in caplog.text


def test_deepspeed_config_is_accepted_by_transformers_integration(base_dir, tmp_path):
    """Our ZeRO-2 config + our TrainingArguments pass transformers' HfTrainerDeepSpeedConfig checks.

    ``TrainingArguments(deepspeed=...)`` runs ``trainer_config_process`` (fills "auto" from the
    args, records mismatches); ``trainer_config_finalize`` then raises on any mismatch.
    """
    pytest.importorskip("deepspeed")
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ds = copy.deepcopy(default_params()["deepspeed"]["config"])
    tp = {**default_params()["train"], "batch_size": 4, "gradient_accumulation_steps": 2}
    try:
        args = lora.training_arguments(tmp_path, tp, max_steps=10, seed=0, deepspeed=ds, use_cpu=True)
        hf_ds = args.hf_deepspeed_config
        model = lora.attach_lora(load_base(base_dir), LORA_TINY["lora"], seed=0)
        hf_ds.trainer_config_finalize(args, model, num_training_steps=10)
        cfg = hf_ds.config
        assert "auto" not in json.dumps(cfg)
        assert hf_ds.is_zero2() and hf_ds.is_offload()
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert args.bf16 and cfg["bf16"]["enabled"] and hf_ds.dtype() == torch.bfloat16
        assert cfg["gradient_accumulation_steps"] == 2 and cfg["train_micro_batch_size_per_gpu"] == 4
        assert cfg["train_batch_size"] == 8
        assert cfg["optimizer"]["params"]["lr"] == float(tp["lr"])
        assert cfg["zero_optimization"]["reduce_bucket_size"] == 32 * 32  # hidden_size²
    finally:
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_main_trains_one_domain_expert(base_dir, tmp_path, monkeypatch):
    import shutil

    import mlflow

    write_split_fixture(tmp_path / "data" / "lm", {d: korean_docs(d, 12) for d in TRAIN_TEXTS})
    shutil.copytree(base_dir, tmp_path / "models" / "base")
    params = {"domains": list(TRAIN_TEXTS), "train_lora": {**copy.deepcopy(LORA_TINY)}}
    params["train_lora"]["train"].update(max_steps=4, eval_steps=2, logging_steps=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValueError, match="unknown domain 'news'"):
        train_lora.main(["news"])
    train_lora.main(["faq"])

    metrics = json.loads((tmp_path / "metrics" / "train_lora" / "faq.json").read_text(encoding="utf-8"))
    for key in (
        "train_loss",
        "val_loss",
        "val_perplexity",
        "tokens_per_s",
        "trainable_params",
        "total_params",
        "wall_s",
    ):
        assert metrics[key] > 0, key
    assert (tmp_path / "models" / "lora" / "faq" / "adapter_model.safetensors").exists()
    lines = (tmp_path / "logs" / "train_faq.log").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == [1, 2, 3, 4]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("domain-lm").experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert [r.data.tags["dvc.stage"] for r in finished] == ["train_lora@faq"]
    assert finished[0].data.params["domain"] == "faq"
    assert finished[0].data.metrics["final_val_loss"] == pytest.approx(metrics["val_loss"])


def test_adapter_config_lists_are_sorted_whatever_the_hash_seed(tmp_path):
    """peft writes target_modules in set order (PYTHONHASHSEED); sort_adapter_config makes the file stable."""
    import json

    from domainlm.common.peft_files import sort_adapter_config

    path = tmp_path / "adapter_config.json"
    path.write_text(
        json.dumps({"target_modules": ["v_proj", "q_proj", "o_proj", "k_proj"], "r": 8, "modules_to_save": None})
    )
    sort_adapter_config(path)
    first = path.read_bytes()
    assert json.loads(first)["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    path.write_text(
        json.dumps({"r": 8, "modules_to_save": None, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    )
    sort_adapter_config(path)
    assert path.read_bytes() == first
