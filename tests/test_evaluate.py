"""Tests for domainlm.lm.evaluation (sliding-window perplexity, continuations, Korean-safe ROUGE-L), domainlm.lm.gate
and the evaluate_experts + evaluate stages (expert x domain reference perplexities, the merged model against them,
gate, MLflow Model Registry aliases)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest
import torch
from rouge_score import rouge_scorer
from safetensors.torch import save_file
from tiny_lm import DOMAIN_TEXTS, build_base, one_torch_thread, train_lora, write_split  # noqa: F401 (autouse fixture)

from domainlm.lm import evaluation as lm_eval
from domainlm.lm import gate
from domainlm.lm.merging import linear, load_causal_lm
from domainlm.lm.task_vectors import task_vector
from stages import evaluate as ev
from stages import evaluate_experts as ev_ref

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KO_REF = "대한민국의 주권은 국민에게 있고 모든 권력은 국민으로부터 나온다"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model, tok = build_base(root / "base")
    return root, model, tok


# ------------------------------------------------------------------------------------ text metrics
def test_default_rouge_tokenizer_deletes_hangul_and_ours_keeps_it():
    default = rouge_scorer.RougeScorer(["rougeL"])
    assert default._tokenizer.tokenize(KO_REF) == []
    assert default.score(KO_REF, KO_REF)["rougeL"].fmeasure == 0.0
    ours = rouge_scorer.RougeScorer(["rougeL"], tokenizer=lm_eval.UnicodeWordTokenizer())
    assert ours.score(KO_REF, KO_REF)["rougeL"].fmeasure == pytest.approx(1.0)
    # 4 of 8 eojeol in order: P = R = 0.5
    assert ours.score(KO_REF, "대한민국의 주권은 국민에게 있고")["rougeL"].fmeasure == pytest.approx(2 / 3)


def test_unicode_word_tokenizer():
    tok = lm_eval.UnicodeWordTokenizer()
    assert tok.tokenize("대한민국의 헌법, 제1조!") == ["대한민국의", "헌법", "제1조"]
    assert tok.tokenize("The Quick fox_x") == ["the", "quick", "fox", "x"]
    assert tok.tokenize("日本語のテキスト") == list("日本語のテキスト")
    # NFD (decomposed jamo) input tokenizes like its NFC form
    import unicodedata

    assert tok.tokenize(unicodedata.normalize("NFD", "한국어 문장")) == ["한국어", "문장"]


def test_text_scores_identical_and_different():
    same = lm_eval.text_scores([KO_REF, "셀에 수식을 입력"], [KO_REF, "셀에 수식을 입력"])
    assert same == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0), "rougeL": pytest.approx(1.0)}
    diff = lm_eval.text_scores(["국민에게 있고 권력은", "문서 서식"], [KO_REF, "셀에 수식을 입력"])
    assert 0 < diff["chrf"] < 100 and 0 < diff["bleu"] < 100 and 0 < diff["rougeL"] < 1
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        lm_eval.text_scores(["a", "b"], ["a"])


# -------------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("n,max_length,stride", [(10, 4, 2), (9, 4, 3), (3, 8, 4), (17, 5, 1), (64, 16, 15)])
def test_sliding_windows_score_every_token_but_the_first_once(n, max_length, stride):
    scored = []
    for begin, end, n_targets in lm_eval.sliding_windows(n, max_length, stride):
        assert end - begin <= max_length
        scored += [t for t in range(end - n_targets, end) if t > begin]  # a window's first token has no context
    assert scored == list(range(1, n))


def test_disjoint_windows_cannot_score_each_window_start():
    windows = lm_eval.sliding_windows(10, 4, 4)
    assert windows == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]


def test_sliding_windows_reject_gaps():
    with pytest.raises(ValueError, match="stride"):
        lm_eval.sliding_windows(10, 4, 5)


def _hf_recipe_ppl(model, ids, max_length, stride):
    """The transformers docs' perplexity loop (labels -100 on context tokens), weighting each window's
    mean loss by its exact number of shifted labels (the docs subtract 1 per window even when the
    window's first label is already masked, slightly under-weighting later windows)."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.size(0)
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end].unsqueeze(0)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def test_perplexity_matches_transformers_recipe(tiny):
    _, model, tok = tiny
    ids = lm_eval.token_stream(tok, DOMAIN_TEXTS["law"] * 2)
    assert ids.numel() > 100
    for stride in (16, 32, 64):
        expected, n = _hf_recipe_ppl(model, ids, 64, stride)
        got = lm_eval.perplexity(model, ids, 64, stride, batch_size=3)
        n_windows = len(lm_eval.sliding_windows(ids.numel(), 64, stride))
        assert got["tokens"] == n == (ids.numel() - 1 if stride < 64 else ids.numel() - n_windows)
        assert got["perplexity"] == pytest.approx(expected, rel=1e-4)
    one = lm_eval.perplexity(model, ids, 64, 16, batch_size=1)["perplexity"]
    assert one == pytest.approx(lm_eval.perplexity(model, ids, 64, 16, batch_size=16)["perplexity"], rel=1e-5)


def test_single_window_perplexity_is_exp_of_model_loss(tiny):
    _, model, tok = tiny
    ids = lm_eval.token_stream(tok, ["셀에 수식을 입력"])
    with torch.no_grad():
        loss = model(ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()
    assert lm_eval.perplexity(model, ids, 64, 64)["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_token_stream_separates_documents_and_caps(tiny):
    _, _, tok = tiny
    a = tok("가나다", add_special_tokens=False)["input_ids"]
    b = tok("법률", add_special_tokens=False)["input_ids"]
    ids = lm_eval.token_stream(tok, ["가나다", "법률"])
    assert ids.tolist() == a + [tok.eos_token_id] + b + [tok.eos_token_id]
    assert lm_eval.token_stream(tok, ["가나다", "법률"], max_tokens=len(a) + 1).tolist() == a + [tok.eos_token_id]
    with pytest.raises(ValueError, match="at least 2"):
        lm_eval.token_stream(tok, [""])


# ----------------------------------------------------------------------------------- continuations
def test_continuation_pairs_and_greedy_decoding(tiny):
    _, model, tok = tiny
    texts = ["짧다", DOMAIN_TEXTS["law"][0], DOMAIN_TEXTS["law"][1], DOMAIN_TEXTS["faq"][0]]
    prompts, refs, too_short = lm_eval.continuation_pairs(tok, texts, n_docs=2, prompt_tokens=10, reference_tokens=6)
    assert too_short == 1 and len(prompts) == 2
    full = tok(texts[1], add_special_tokens=False)["input_ids"]
    assert prompts[0] == full[:10] and refs[0] == full[10:16]
    gens = lm_eval.greedy_continuations(model, prompts, new_tokens=6, batch_size=2, pad_token_id=tok.pad_token_id)
    assert [len(g) for g in gens] == [6, 6]
    x = torch.tensor([prompts[1]])  # manual argmax loop without eos suppression beyond min length
    for _ in range(6):
        logits = model(x).logits[0, -1]
        logits[tok.eos_token_id] = -float("inf")
        x = torch.cat([x, logits.argmax().view(1, 1)], dim=1)
    assert gens[1] == x[0, 10:].tolist()


# ------------------------------------------------------------------------------------ gate, registry
PPL = {
    "base": {"law": 10.0, "faq": 20.0},
    "merged": {"law": 8.0, "faq": 17.0},
    "expert_law": {"law": 6.0, "faq": 25.0},
    "expert_faq": {"law": 12.0, "faq": 14.0},
}


def test_retained_gain_and_gate():
    retained = lm_eval.retained_gains(PPL, ["law", "faq"])
    assert retained == {"law": pytest.approx(0.5), "faq": pytest.approx(0.5)}
    assert (
        gate.check_gate(PPL, retained, {"min_mean_retained_gain": 0.5, "max_perplexity": 20, "merged_below_base": True})
        == []
    )
    failures = gate.check_gate(
        PPL, retained, {"min_mean_retained_gain": 0.6, "max_perplexity": 16, "merged_below_base": True}
    )
    assert [(f["rule"], f["metric"]) for f in failures] == [
        ("min_mean_retained_gain", "mean_retained_gain"),
        ("max_perplexity", "perplexity.merged.faq"),
    ]
    assert failures[0]["value"] == pytest.approx(0.5) and failures[0]["threshold"] == 0.6


def test_gate_flags_expert_that_does_not_beat_base():
    ppl = {**PPL, "expert_faq": {"law": 12.0, "faq": 21.0}, "merged": {"law": 11.0, "faq": 19.0}}
    retained = lm_eval.retained_gains(ppl, ["law", "faq"])
    assert retained["faq"] == 0.0 and retained["law"] == pytest.approx(-0.25)
    rules = [f["rule"] for f in gate.check_gate(ppl, retained, {"merged_below_base": True})]
    assert rules == ["expert_below_base", "merged_below_base"]


def test_read_test_split_shuffles_reproducibly(tmp_path):
    write_split(tmp_path, "law", [f"문서 {i}" for i in range(20)], repeat=1)
    in_order = lm_eval.read_test_split(tmp_path, "law")
    shuffled = lm_eval.read_test_split(tmp_path, "law", seed=0)
    assert in_order == [f"문서 {i}" for i in range(20)]
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    assert lm_eval.read_test_split(tmp_path, "law", seed=0) == shuffled
    with pytest.raises(FileNotFoundError, match="faq"):
        lm_eval.read_test_split(tmp_path, "faq")


def test_read_train_log_merges_steps(tmp_path):
    log = tmp_path / "train_law.log"
    log.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 10, "loss": 3.0, "learning_rate": 1e-3},
                {"step": 10, "eval_loss": 3.2},
                {"step": 20, "loss": 2.5},
                {"step": 20, "train_runtime": 4.0, "train_loss": 2.7},
            ]
        )
        + "\n"
    )
    assert lm_eval.read_train_log(log) == [
        {"step": 10, "loss": 3.0, "eval_loss": 3.2},
        {"step": 20, "loss": 2.5, "eval_loss": None},
    ]
    log.write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(ValueError, match="train_law.log:2"):
        lm_eval.read_train_log(log)


def test_register_merged_sets_aliases(tmp_path, monkeypatch, tiny):
    import mlflow
    from mlflow import MlflowClient

    from domainlm.common.tracking import mlflow_run

    root, _, _ = tiny
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow_run("evaluate") as ml:
        first = gate.register_merged(ml, root / "base", "tiny-lm", passed=True)
    with mlflow_run("evaluate") as ml:
        second = gate.register_merged(ml, root / "base", "tiny-lm", passed=False)
    assert (first["version"], first["alias"]) == (1, "champion")
    assert (second["version"], second["alias"]) == (2, "challenger")
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("tiny-lm", "champion").version) == 1
    assert int(client.get_model_version_by_alias("tiny-lm", "challenger").version) == 2
    local = mlflow.artifacts.download_artifacts("models:/tiny-lm@champion", dst_path=str(tmp_path / "dl"))
    assert load_causal_lm(local).config.hidden_size == 32


# ------------------------------------------------------------------------------------- whole stage
@pytest.fixture(scope="module")
def stage_repo(tmp_path_factory, tiny):
    """A working tree with everything evaluate reads: base, trained experts' task vectors, merged, splits, logs."""
    root, _, _ = tiny
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(root / "base", repo / "models" / "base")
    base = load_causal_lm(root / "base").state_dict()
    tvs = {}
    for domain, texts in DOMAIN_TEXTS.items():
        adapter = train_lora(root / "base", root / "lora" / domain, texts)
        tvs[domain] = task_vector(root / "base", adapter)
        (repo / "models" / "diff").mkdir(parents=True, exist_ok=True)
        save_file(tvs[domain], str(repo / "models" / "diff" / f"{domain}.safetensors"))
        write_split(repo / "data" / "lm", domain, texts)
        (repo / "logs").mkdir(exist_ok=True)
        (repo / "logs" / f"train_{domain}.log").write_text(
            json.dumps({"step": 5, "loss": 4.0}) + "\n" + json.dumps({"step": 5, "eval_loss": 4.5}) + "\n"
        )
    merged_model = load_causal_lm(root / "base")
    merged_model.load_state_dict(linear(base, tvs, {d: 1.0 for d in tvs}, lam=1.0))
    merged_model.save_pretrained(repo / "models" / "merged")
    return repo


def _params(repo, gate):
    (repo / "params.yaml").write_text(
        json.dumps(
            {  # JSON is YAML
                "domains": list(DOMAIN_TEXTS),
                "evaluate": {
                    "stride": 32,
                    "batch_size": 4,
                    "max_tokens_per_domain": 400,
                    "bleu_tokenize": "char",
                    "continuation": {"n_docs": 2, "prompt_tokens": 12, "new_tokens": 8, "show_per_domain": 2},
                    "gate": gate,
                    "registry": {"model_name": "tiny-merged"},
                },
            }
        )
    )


def test_main_pass_then_fail(stage_repo, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(stage_repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{stage_repo / 'mlflow.db'}")
    _params(stage_repo, {"min_mean_retained_gain": -100.0, "max_perplexity": None, "merged_below_base": False})
    with pytest.raises(FileNotFoundError):  # evaluate needs evaluate_experts' reference perplexities
        ev.main()
    ev_ref.main()
    ev.main()

    m = json.loads((stage_repo / "metrics" / "evaluate.json").read_text())
    ref = json.loads((stage_repo / "metrics" / "evaluate_experts.json").read_text())
    domains = list(DOMAIN_TEXTS)
    assert set(m["perplexity"]) == {"base", "merged", *(f"expert_{d}" for d in domains)}
    assert set(ref["perplexity"]) == {"base", *(f"expert_{d}" for d in domains)}
    for name, per in ref["perplexity"].items():  # evaluate reports the reference as evaluate_experts measured it
        assert m["perplexity"][name] == per
    for d in domains:  # trained experts beat the base on their own domain
        assert m["perplexity"][f"expert_{d}"][d] < m["perplexity"]["base"][d]
        assert set(m["perplexity"][f"expert_{d}"]) == set(domains)
    assert m["mean_retained_gain"] == pytest.approx(sum(m["retained_gain"].values()) / len(domains))
    for metric in ("bleu", "chrf", "rougeL"):
        assert set(m[metric]) == {"base", "merged"} and set(m[metric]["merged"]) == set(domains)
    assert m["gate"]["passed"] == 1
    assert m["tokens"]["perplexity_stream"]["law"] == 400

    with open(stage_repo / "plots" / "perplexity.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == (2 + len(domains)) * len(domains)
    assert float(rows[0]["perplexity"]) == pytest.approx(m["perplexity"][rows[0]["model"]][rows[0]["domain"]])
    with open(stage_repo / "plots" / "train_loss.csv", newline="") as fh:
        assert next(csv.DictReader(fh)) == {"domain": "law", "step": "5", "loss": "4.0", "eval_loss": "4.5"}
    md = (stage_repo / "eval" / "eval_prompt_comparison.md").read_text()
    assert "## office_help" in md and md.count("\n| ") >= 3 * 3
    assert json.loads((stage_repo / "metrics" / "alerts.json").read_text())["failures"] == []

    _params(stage_repo, {"min_mean_retained_gain": 100.0, "max_perplexity": 1.0, "merged_below_base": False})
    ev.main()

    alerts = json.loads((stage_repo / "metrics" / "alerts.json").read_text())
    assert alerts["gate"] == "failed" and alerts["model"]["alias"] == "challenger"
    assert {f["rule"] for f in alerts["failures"]} == {"min_mean_retained_gain", "max_perplexity"}
    assert json.loads((stage_repo / "metrics" / "evaluate.json").read_text())["gate"]["passed"] == 0
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("tiny-merged", "champion").version) == 1
    challenger = client.get_model_version_by_alias("tiny-merged", "challenger")
    assert int(challenger.version) == 2 and challenger.tags["gate"] == "failed"
    run = client.get_run(challenger.run_id)
    assert run.data.tags["gate"] == "failed" and "mean_retained_gain" in run.data.tags["gate.alert"]
    assert run.data.metrics["gate.passed"] == 0


def test_evaluate_refuses_a_reference_measured_on_other_tokens(stage_repo, monkeypatch):
    """A reference perplexity file from other streams or windows (here: another stride) is stale: evaluate stops
    with an error naming evaluate_experts instead of mixing perplexities measured two ways."""
    monkeypatch.chdir(stage_repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{stage_repo / 'mlflow.db'}")
    _params(stage_repo, {"min_mean_retained_gain": -100.0, "max_perplexity": None, "merged_below_base": False})
    ev_ref.main()
    reference = json.loads((stage_repo / "eval" / "reference_perplexity.json").read_text())
    assert reference["probe"]["stride"] == 32 and set(reference["probe"]["streams"]) == set(DOMAIN_TEXTS)
    params = json.loads((stage_repo / "params.yaml").read_text())
    params["evaluate"]["stride"] = 16
    (stage_repo / "params.yaml").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="evaluate_experts"):
        ev.main()
    reference["perplexity"].pop("expert_law")
    (stage_repo / "eval" / "reference_perplexity.json").write_text(json.dumps(reference))
    _params(stage_repo, {"min_mean_retained_gain": -100.0, "max_perplexity": None, "merged_below_base": False})
    with pytest.raises(ValueError, match="expert_law"):
        ev.main()
