"""Tests for domainlm.lm.merging (linear / TIES / DARE behind one signature) and the merge stage."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_lm import build_base, build_lora, one_torch_thread  # noqa: F401 (autouse fixture)

from domainlm.lm import merging
from domainlm.lm.merging import MERGE_METHODS, load_causal_lm
from domainlm.lm.task_vectors import task_vector
from stages import merge as merge_stage

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_base(root / "base", tie_word_embeddings=True)
    for seed, domain in enumerate(["law", "faq"], start=1):
        build_lora(root / "base", root / "lora" / domain, seed=seed)
    return root


def _toy():
    base = {
        "w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
        "h": torch.randn(5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
        "untouched": torch.arange(3),
    }
    tvs = {
        "a": {
            "w": torch.randn(4, 3, generator=torch.Generator().manual_seed(2)),
            "h": torch.randn(5, generator=torch.Generator().manual_seed(3)),
        },
        "b": {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(4))},
    }
    return base, tvs


def test_linear_single_expert_reproduces_peft_merge_and_unload(tiny):
    from peft import PeftModel

    model = load_causal_lm(tiny / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tv = task_vector(tiny / "base", tiny / "lora" / "law")
    merged = merging.merge("linear", base, {"law": tv}, {"law": 1.0}, lam=1.0)
    expert = PeftModel.from_pretrained(load_causal_lm(tiny / "base"), str(tiny / "lora" / "law")).merge_and_unload()
    reference = expert.state_dict()
    assert set(merged) == set(reference)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(merged[k], base[k]) for k in tv)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_every_method_keeps_keys_shapes_and_dtypes(method):
    base, tvs = _toy()
    merged = merging.merge(method, base, tvs, {"a": 1.0, "b": 0.5}, lam=0.7)
    assert set(merged) == set(base)
    for key in base:
        assert merged[key].shape == base[key].shape and merged[key].dtype == base[key].dtype
    assert merged["untouched"] is base["untouched"]
    assert not torch.equal(merged["w"], base["w"])


def test_linear_is_weighted_task_arithmetic():
    base, tvs = _toy()
    merged = merging.linear(base, tvs, {"a": 0.5, "b": 2.0}, lam=0.3)
    expected = base["w"] + 0.3 * (0.5 * tvs["a"]["w"] + 2.0 * tvs["b"]["w"])
    torch.testing.assert_close(merged["w"], expected)
    torch.testing.assert_close(merged["h"], (base["h"].float() + 0.3 * 0.5 * tvs["a"]["h"]).to(torch.bfloat16))


def test_ties_density_one_single_domain_equals_linear():
    base, tvs = _toy()
    one = {"a": tvs["a"]}
    for weight in (1.0, 0.4):
        torch.testing.assert_close(
            merging.ties(base, one, {"a": weight}, lam=0.8, density=1.0),
            merging.linear(base, one, {"a": weight}, lam=0.8),
        )


def test_ties_elects_sign_and_takes_disjoint_mean():
    base = {"w": torch.zeros(3)}
    tvs = {"a": {"w": torch.tensor([3.0, 1.0, -1.0])}, "b": {"w": torch.tensor([-2.0, 2.0, -4.0])}}
    merged = merging.ties(base, tvs, {"a": 1.0, "b": 1.0}, lam=1.0, density=1.0)
    # sums 1, 3, -5 elect +, +, -; entry 0 keeps only a's 3, entry 1 averages 1 and 2, entry 2 averages -1 and -4
    torch.testing.assert_close(merged["w"], torch.tensor([3.0, 1.5, -2.5]))


def test_ties_trim_keeps_top_magnitudes():
    delta = torch.tensor([0.1, -5.0, 0.3, 4.0])
    torch.testing.assert_close(merging.trim_top_magnitude(delta, 0.5), torch.tensor([0.0, -5.0, 0.0, 4.0]))
    with pytest.raises(ValueError, match="density"):
        merging.trim_top_magnitude(delta, 0.0)


def test_dare_without_drop_equals_linear():
    base, tvs = _toy()
    weights = {"a": 1.0, "b": 0.5}
    torch.testing.assert_close(
        merging.dare(base, tvs, weights, lam=0.6, drop_rate=0.0, seed=3),
        merging.linear(base, tvs, weights, lam=0.6),
        rtol=0,
        atol=0,
    )


def test_dare_is_seeded_and_rescales_survivors():
    base = {"w": torch.zeros(200, 50)}
    tvs = {"a": {"w": torch.full((200, 50), 2.0)}}
    first = merging.dare(base, tvs, {"a": 1.0}, drop_rate=0.75, seed=7)["w"]
    again = merging.dare(base, tvs, {"a": 1.0}, drop_rate=0.75, seed=7)["w"]
    other = merging.dare(base, tvs, {"a": 1.0}, drop_rate=0.75, seed=8)["w"]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 8.0}  # survivors are 2 / (1 - 0.75)
    assert (first == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ValueError, match="drop_rate"):
        merging.dare(base, tvs, {"a": 1.0}, drop_rate=1.0)


def test_bad_inputs_are_named():
    base, tvs = _toy()
    with pytest.raises(KeyError, match="unknown merge method 'nope'"):
        merging.merge("nope", base, tvs, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"no merge weight for domain\(s\) \['b'\]"):
        merging.linear(base, tvs, {"a": 1.0})
    with pytest.raises(ValueError, match="shape"):
        merging.linear(base, {"a": {"w": torch.zeros(3, 4)}}, {"a": 1.0})
    with pytest.raises(ValueError, match="'missing'"):
        merging.linear(base, {"a": {"missing": torch.zeros(1)}}, {"a": 1.0})
    with pytest.raises(ValueError, match="unknown domain"):
        merging.resolve_weights({"news": 1.0}, ["law"])


def test_adding_a_method_is_one_function():
    @merging.register("negate_for_test")
    def negate(base, task_vectors, weights, *, lam=1.0):
        return merging.linear(base, task_vectors, weights, lam=-lam)

    try:
        base, tvs = _toy()
        assert merging.method_options({"method": "negate_for_test", "lam": 2.0}) == ("negate_for_test", {"lam": 2.0})
        torch.testing.assert_close(
            merging.merge("negate_for_test", base, tvs, {"a": 1.0, "b": 1.0}, lam=1.0)["w"],
            base["w"] - tvs["a"]["w"] - tvs["b"]["w"],
        )
    finally:
        del MERGE_METHODS["negate_for_test"]


def test_main_writes_loadable_merged_folder(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(tiny / "base", tmp_path / "models" / "base")
    tvs = {}
    for domain in ("law", "faq"):
        tvs[domain] = task_vector(tiny / "base", tiny / "lora" / domain)
        (tmp_path / "models" / "diff").mkdir(parents=True, exist_ok=True)
        save_file(tvs[domain], str(tmp_path / "models" / "diff" / f"{domain}.safetensors"))
    (tmp_path / "params.yaml").write_text(
        "domains: [law, faq]\nmerge:\n  method: ties\n  lam: 0.9\n  weights: {faq: 0.5}\n  ties: {density: 0.5}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    merge_stage.main()

    out = tmp_path / "models" / "merged"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (
        tok("대한민국 법률").input_ids
        == AutoTokenizer.from_pretrained(tiny / "base").__call__("대한민국 법률").input_ids
    )
    base = load_causal_lm(tiny / "base").state_dict()
    expected = merging.ties(base, tvs, {"law": 1.0, "faq": 0.5}, lam=0.9, density=0.5)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key])
    assert model.config.tie_word_embeddings is True
    metrics = json.loads((tmp_path / "metrics" / "merge.json").read_text())
    assert metrics["method"] == "ties" and metrics["lam"] == 0.9 and metrics["options"] == {"density": 0.5}
    assert metrics["domains"]["faq"]["weight"] == 0.5 and metrics["merged_update_l2_norm"] > 0
    assert -1 <= metrics["domains"]["law"]["cosine_to_merged_update"] <= 1
    assert not any(p.name.startswith(".merged") for p in (tmp_path / "models").iterdir())
