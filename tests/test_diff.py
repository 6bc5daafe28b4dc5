"""Tests for domainlm.lm.task_vectors and the diff stage: task vectors from LoRA adapters, their statistics and
cosine similarities."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import build_base, build_lora, one_torch_thread  # noqa: F401 (autouse fixture)

from domainlm.lm import task_vectors
from domainlm.lm.merging import load_causal_lm
from stages import diff

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_base(root / "base")
    build_lora(root / "base", root / "lora" / "law", seed=1)
    build_lora(root / "base", root / "lora" / "faq", seed=2, target_modules=("q_proj", "v_proj"))
    return root


def _merged_minus_base(base_dir, adapter_dir):
    from peft import PeftModel

    base_sd = {k: v.clone() for k, v in load_causal_lm(base_dir).state_dict().items()}
    merged = PeftModel.from_pretrained(load_causal_lm(base_dir), str(adapter_dir)).merge_and_unload()
    return {k: v - base_sd[k] for k, v in merged.state_dict().items()}


def test_task_vector_equals_merge_and_unload_minus_base(tiny):
    tv = task_vectors.task_vector(tiny / "base", tiny / "lora" / "law")
    reference = _merged_minus_base(tiny / "base", tiny / "lora" / "law")
    changed = {k for k, d in reference.items() if d.abs().max() > 0}
    assert set(tv) == changed
    assert len(tv) == 2 * 4  # 2 layers x q/k/v/o
    assert all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in tv)
    for key, delta in tv.items():
        assert delta.dtype == torch.float32
        torch.testing.assert_close(delta, reference[key], rtol=1e-5, atol=1e-6)
        assert delta.abs().max() > 0


def test_task_vector_only_touches_target_modules(tiny):
    tv = task_vectors.task_vector(tiny / "base", tiny / "lora" / "faq")
    assert sorted({k.rsplit(".", 2)[-2] for k in tv}) == ["q_proj", "v_proj"]


def test_fan_in_fan_out_conv1d_matches_merge(tmp_path):
    """GPT-2 stores c_attn as Conv1D (in, out): Δ must be transposed to the base weight's layout."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2"
    )
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(load_causal_lm(tmp_path / "gpt2"), config).save_pretrained(tmp_path / "adapter")

    tv = task_vectors.task_vector(tmp_path / "gpt2", tmp_path / "adapter")
    base = load_causal_lm(tmp_path / "gpt2").state_dict()
    merged = PeftModel.from_pretrained(load_causal_lm(tmp_path / "gpt2"), str(tmp_path / "adapter")).merge_and_unload()
    assert list(tv) == ["transformer.h.0.attn.c_attn.weight"]
    key = "transformer.h.0.attn.c_attn.weight"
    assert tv[key].shape == base[key].shape == (16, 48)
    torch.testing.assert_close(base[key] + tv[key], merged.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_dora_adapter_is_rejected(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    get_peft_model(load_causal_lm(tiny / "base"), config).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        task_vectors.task_vector(tiny / "base", tmp_path / "dora")


def test_missing_adapter_folder_is_named(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        task_vectors.task_vector(tiny / "base", tmp_path / "nowhere")


def test_task_vector_stats():
    tv = {"a": torch.tensor([[3.0, -4.0]]), "b": torch.tensor([0.0, 12.0, 0.0])}
    base = {"a": torch.tensor([[0.0, 1.0]]), "b": torch.tensor([0.0, 0.0, 0.0])}
    stats = task_vectors.task_vector_stats(tv, base, top_k=1)
    assert stats["l2_norm"] == pytest.approx(13.0)
    assert stats["max"] == 12.0 and stats["min"] == -4.0
    assert stats["mean_abs"] == pytest.approx(19.0 / 5)
    assert stats["n_params"] == 5 and stats["n_tensors"] == 2
    assert stats["relative_l2_norm"] == pytest.approx(13.0)
    assert stats["top_tensor_l2_norms"] == {"b": pytest.approx(12.0)}


def test_pairwise_cosine():
    x = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([2.0])}
    rows = task_vectors.pairwise_cosine(
        {
            "a": x,
            "neg": {k: -t for k, t in x.items()},
            "orth": {"w": torch.tensor([0.0, 5.0])},  # lacks "v": counts as zeros
        }
    )
    table = {(r["domain_a"], r["domain_b"]): r["cosine"] for r in rows}
    assert len(rows) == 9
    assert table["a", "a"] == pytest.approx(1.0)
    assert table["a", "neg"] == pytest.approx(-1.0)
    assert table["a", "orth"] == pytest.approx(0.0)
    assert table["neg", "a"] == table["a", "neg"]


def test_pairwise_cosine_rejects_zero_vector():
    with pytest.raises(ValueError, match="'z'.*all zeros"):
        task_vectors.pairwise_cosine({"a": {"w": torch.ones(2)}, "z": {"w": torch.zeros(2)}})


def test_training_summary(tmp_path):
    (tmp_path / "law.json").write_text(json.dumps({"train_loss": 2.5, "val": {"perplexity": 9.0}, "note": "x"}))
    rows = task_vectors.training_summary({"law": tmp_path / "law.json"})
    assert rows == [{"domain": "law", "train_loss": 2.5, "val.perplexity": 9.0}]
    with pytest.raises(FileNotFoundError, match="train_lora@faq"):
        task_vectors.training_summary({"faq": tmp_path / "faq.json"})


def test_main_writes_declared_outputs(tiny, tmp_path, monkeypatch):
    import shutil

    import mlflow

    shutil.copytree(tiny / "base", tmp_path / "models" / "base")
    shutil.copytree(tiny / "lora", tmp_path / "models" / "lora")
    (tmp_path / "metrics" / "train_lora").mkdir(parents=True)
    for d, loss in [("law", 2.0), ("faq", 3.0)]:
        (tmp_path / "metrics" / "train_lora" / f"{d}.json").write_text(json.dumps({"val_loss": loss}))
    (tmp_path / "params.yaml").write_text("domains: [law, faq]\ndiff:\n  top_k: 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    diff.main()

    law = load_file(str(tmp_path / "models/diff/law.safetensors"))
    torch.testing.assert_close(law, task_vectors.task_vector(tiny / "base", tiny / "lora" / "law"))
    metrics = json.loads((tmp_path / "metrics/diff/faq.json").read_text())
    assert metrics["n_tensors"] == 4 and len(metrics["top_tensor_l2_norms"]) == 3 and metrics["l2_norm"] > 0
    with open(tmp_path / "plots/task_vector_cosine.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["domain_a"], r["domain_b"]) for r in rows] == [
        ("law", "law"),
        ("law", "faq"),
        ("faq", "law"),
        ("faq", "faq"),
    ]
    assert float(rows[0]["cosine"]) == pytest.approx(1.0)
    assert -1.0 <= float(rows[1]["cosine"]) <= 1.0
    with open(tmp_path / "metrics/summary.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"domain": "law", "val_loss": "2.0"}, {"domain": "faq", "val_loss": "3.0"}]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["domain-lm"], filter_string="tags.`dvc.stage` = 'diff'")
    law_norm = json.loads((tmp_path / "metrics/diff/law.json").read_text())["l2_norm"]
    assert len(runs) == 1 and runs["metrics.law.l2_norm"][0] == pytest.approx(law_norm)


def test_pairwise_cosine_does_not_depend_on_the_hash_seed():
    """The dot products sum tensors in sorted key order, so the CSV is the same in every process."""
    import subprocess
    import sys

    code = (
        "import torch; from domainlm.lm.task_vectors import pairwise_cosine; g = torch.Generator().manual_seed(0); "
        "tv = {d: {f'layer{i}.w': torch.randn(64, generator=g) * (i + 1) ** 3 for i in range(40)} for d in 'ab'}; "
        "print(repr([r['cosine'] for r in pairwise_cosine(tv)]))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={
                "PYTHONHASHSEED": str(seed),
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1]),
            },
        ).stdout
        for seed in (0, 1, 2, 3)
    }
    assert len(outs) == 1
