"""train_classifier (domainlm.classify): which labels each split uses, token statistics, scores, the TF-IDF baseline,
the LoRA sequence classifier, the gate's retries, alerts to a real webhook, the registry's champion rule, and the
whole stage's run() against a real MLflow store (sqlite in tmp)."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from classifier_fixtures import (
    CLASSES,
    COUNTS,
    DOMAINS,
    build_tiny_lm,
    classifier_params,
    labelled_docs,
    write_labelled_splits,
)
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from tiny_lm import one_torch_thread  # noqa: F401  (autouse: tiny models run faster on one thread)

from domainlm.classify import alerts, data, gate, metrics, registry, serving, token_stats, training
from domainlm.classify import model as cls_model
from domainlm.classify.baseline import baseline_proba, fit_baseline
from domainlm.common.tracking import mlflow_run
from stages import train_classifier

OVERRIDES = {"calc-train-0": "writer", "calc-test-0": "writer", "law-val-1": "faq"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    split_dir, labels_path = write_labelled_splits(root, overrides=OVERRIDES)
    return {"root": root, "split_dir": split_dir, "labels_path": labels_path, "lm_dir": build_tiny_lm(root / "lm")}


@pytest.fixture(scope="module")
def splits(corpus):
    return data.read_splits(corpus["split_dir"], corpus["labels_path"], DOMAINS)


@pytest.fixture(scope="module")
def trained(corpus, splits):
    """One LoRA attempt with the tiny params (unweighted): (peft model, tokenizer, info)."""
    cfg = classifier_params()
    settings = gate.attempt_settings(cfg["train"], cfg["gate"], 0)
    return training.train_attempt(corpus["lm_dir"], splits["train"], splits["val"], CLASSES, cfg, settings, seed=0)


class Webhook:
    """A real HTTP server on 127.0.0.1 that records JSON POST bodies; ``/fail`` answers 500."""

    def __init__(self):
        self.bodies: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.bodies.append(
                    {
                        "path": self.path,
                        "content_type": self.headers["Content-Type"],
                        "json": json.loads(body.decode("utf-8")),
                    }
                )
                self.send_response(500 if self.path == "/fail" else 200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A real MLflow tracking store and registry: a sqlite file in tmp, artifacts beside it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in tmp too
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------------------------ data


def test_training_uses_refined_labels_and_test_uses_source_labels(splits):
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert (train.label_column, val.label_column, test.label_column) == ("label", "label", "source_label")
    lab = dict(zip(train.ids, train.labels))
    assert lab["calc-train-0"] == "writer" and lab["calc-train-1"] == "calc"  # the override is trained on
    assert dict(zip(val.ids, val.labels))["law-val-1"] == "faq"
    assert dict(zip(test.ids, test.labels))["calc-test-0"] == "calc"  # never the override on test
    assert len(train) == len(CLASSES) * COUNTS["train"] and train.unlabelled == 0
    assert train.domains[0] == "law" and set(train.domains) == set(DOMAINS)


def test_classes_overrides_and_hashes(corpus, splits, tmp_path):
    assert data.class_list(splits["train"]) == CLASSES
    assert data.count_label_overrides(corpus["labels_path"]) == len(OVERRIDES)
    assert len(data.split_sha256(splits["test"])) == 64
    assert data.split_sha256(splits["test"]) != data.split_sha256(splits["val"])
    files = sorted(corpus["split_dir"].rglob("*.parquet"))
    assert data.files_sha256(files) == data.files_sha256(list(reversed(files)))  # order-free
    _, other = write_labelled_splits(tmp_path, overrides={"faq-test-0": "law"})  # an override on test only
    assert data.split_sha256(data.read_split(tmp_path / "split", other, DOMAINS, "test")) == data.split_sha256(
        splits["test"]
    )
    one_class = data.LabelledSplit("train", "label", ["a"], ["t"], ["law"], ["law"])
    with pytest.raises(ValueError, match="needs two"):
        data.class_list(one_class)


def test_a_document_missing_from_the_label_table_is_an_error(corpus, tmp_path):
    table = pq.read_table(corpus["labels_path"])
    pq.write_table(table.slice(1), tmp_path / "labels.parquet")
    with pytest.raises(ValueError, match="has no 'train' row in the label table"):
        data.read_split(corpus["split_dir"], tmp_path / "labels.parquet", DOMAINS, "train")
    with pytest.raises(FileNotFoundError, match="split"):
        data.read_split(tmp_path / "nowhere", corpus["labels_path"], DOMAINS, "train")


# ------------------------------------------------------------------------------------------------ token stats


def test_token_stats_match_the_tokenizer(corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus["lm_dir"])
    texts = {
        d: {s: pq.read_table(corpus["split_dir"] / d / f"{s}.parquet")["text"].to_pylist() for s in data.SPLITS}
        for d in DOMAINS
    }
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts["law"]["train"]]
    max_length = sorted(lengths)[len(lengths) // 2] + 1  # the median document fits, the longest do not
    stats = token_stats.token_stats(tok, texts, max_length=max_length, context=32)
    law = stats["domains"]["law"]["train"]
    assert law["docs"] == len(lengths) and law["tokens"] == sum(lengths) and law["max_tokens"] == max(lengths)
    assert law["p50_tokens"] == pytest.approx(float(np.median(lengths)))
    assert law["p95_tokens"] == pytest.approx(float(np.percentile(lengths, 95)))
    truncated = np.mean([n > max_length - 1 for n in lengths])  # max_length - 1 text tokens + EOS
    assert law["truncated_at_max_length"] == pytest.approx(truncated) and 0 < truncated < 1
    assert law["truncated_at_context"] == pytest.approx(np.mean([n > 32 for n in lengths]))
    assert stats["all"]["test"]["docs"] == len(CLASSES) * COUNTS["test"]
    assert stats["settings"] == {
        "classifier_max_length": max_length,
        "classifier_max_text_tokens": max_length - 1,
        "lm_context": 32,
    }
    empty = token_stats.length_summary(np.array([], dtype=np.int64), max_text_tokens=3, context=4)
    assert empty["docs"] == 0 and empty["truncated_at_context"] == 0.0


# ------------------------------------------------------------------------------------------------ scores


def test_score_matches_scikit_learn_and_counts_unknown_labels():
    from sklearn.metrics import f1_score, roc_auc_score

    classes = ["a", "b", "c"]
    proba = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    y = ["a", "b", "c", "b", "z"]  # "z" is unknown to the model
    s = metrics.score(y, proba, classes)
    pred = ["a", "b", "c", "a", "c"]
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert s["unknown_label_docs"] == 1 and s["docs"] == 5
    assert s["confusion"]["b"] == {"a": 1, "b": 1, "c": 0, "z": 0} and s["confusion"]["z"]["c"] == 1
    assert s["per_class"]["b"]["recall"] == 0.5 and s["per_class"]["b"]["support"] == 2
    assert s["per_class"]["a"]["roc_auc"] == pytest.approx(roc_auc_score([1, 0, 0, 0, 0], proba[:, 0]))
    assert "roc_auc" not in s["per_class"]["z"]
    rows = metrics.prediction_rows(["1", "2", "3", "4", "5"], y, proba, classes)
    assert rows[3] == {"id": "4", "actual": "b", "predicted": "a", "confidence": 0.6}
    with pytest.raises(ValueError, match="shape"):
        metrics.score(y, proba[:, :2], classes)


def test_bootstrap_intervals_bracket_the_figures_and_separate_only_a_real_gap():
    rng = np.random.default_rng(0)
    truth = [str(c) for c in rng.integers(0, 4, 400)]
    good = [t if rng.random() < 0.95 else "0" for t in truth]  # ~95% right
    poor = [t if rng.random() < 0.55 else "1" for t in truth]  # ~55% right
    close = [t if rng.random() < 0.94 else "2" for t in truth]  # as good as `good`, other errors
    out = metrics.macro_f1_intervals(truth, {"good": good, "poor": poor, "close": close}, n_resamples=500, seed=3)
    assert out["method"] == "BCa" and out["confidence"] == 0.95 and out["n_resamples"] == 500
    for name, pred in (("good", good), ("poor", poor), ("close", close)):
        f = out["macro_f1"][name]
        assert f["value"] == metrics.macro_f1(truth, pred) and f["low"] < f["value"] < f["high"]
        assert f["high"] - f["low"] < 0.2
    gap, tie = out["difference"]["good-poor"], out["difference"]["good-close"]
    assert gap["value"] == pytest.approx(out["macro_f1"]["good"]["value"] - out["macro_f1"]["poor"]["value"])
    assert gap["low"] > 0.2  # a real gap: the interval excludes 0
    assert tie["low"] < 0 < tie["high"]  # within noise: it does not
    assert metrics.macro_f1_intervals(truth, {"good": good, "poor": poor}, n_resamples=500, seed=3)["difference"] == {
        "good-poor": gap
    }  # deterministic per seed, paired resamples
    # no spread at all (every prediction right): BCa is undefined, the percentile interval is the point
    perfect = metrics.macro_f1_intervals(truth[:50], {"a": truth[:50], "b": truth[:50]}, n_resamples=50)
    assert perfect["method"] == "percentile" and perfect["macro_f1"]["a"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert perfect["difference"]["a-b"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    for bad in ({}, {"a": truth[:3]}):
        with pytest.raises(ValueError):
            metrics.macro_f1_intervals(truth, bad)
    with pytest.raises(ValueError, match="confidence"):
        metrics.macro_f1_intervals(truth, {"a": good}, confidence=1.0)


def test_tfidf_baseline_scores_in_the_models_class_order(splits):
    train, test = splits["train"], splits["test"]
    pipe = fit_baseline(train.texts, train.labels, classifier_params()["baseline"])
    proba = baseline_proba(pipe, test.texts, ["zzz"] + CLASSES)  # a class the baseline never saw: probability 0
    assert (
        proba.shape == (len(test), len(CLASSES) + 1) and np.allclose(proba.sum(axis=1), 1.0) and not proba[:, 0].any()
    )
    s = metrics.score(test.labels, proba, ["zzz"] + CLASSES)
    assert s["accuracy"] > 0.8  # the four vocabularies are disjoint: character n-grams separate them


# ------------------------------------------------------------------------------------------------ the LoRA classifier


def test_encode_ends_every_input_with_eos_within_max_length(corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus["lm_dir"])
    ids = cls_model.encode(tok, ["대한민국 국민 " * 20, "셀"], 8)
    assert len(ids[0]) == 8 and all(x[-1] == tok.eos_token_id for x in ids) and len(ids[1]) < 8
    with pytest.raises(ValueError, match="max_length"):
        cls_model.encode(tok, ["셀"], 1)


def test_window_spans_are_evenly_spaced_and_cover_the_document():
    assert cls_model.window_spans(5, 8, 4) == [(0, 5)]  # fits in one window
    assert cls_model.window_spans(100, 10, 1) == [(0, 10)]  # one window: the document's start
    spans = cls_model.window_spans(100, 10, 4)
    assert spans[0] == (0, 10) and spans[-1] == (90, 100) and len(spans) == 4
    assert all(b - a == 10 for a, b in spans) and [a for a, _ in spans] == sorted(a for a, _ in spans)
    full = cls_model.window_spans(95, 10, 50)  # enough windows: ceil(95 / 10) = 10, every token covered
    assert len(full) == 10 and set().union(*(range(a, b) for a, b in full)) == set(range(95))
    with pytest.raises(ValueError):
        cls_model.window_spans(10, 0, 1)


def test_encode_windows_reads_past_the_first_window_and_ends_each_with_eos(corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus["lm_dir"])
    long_text = " ".join(f"대한민국 국민 셀 수식 {i}" for i in range(40))
    all_ids = tok(long_text, add_special_tokens=False)["input_ids"]
    ((windows, short),) = [cls_model.encode_windows(tok, [long_text, "셀"], 8, 3)]
    assert len(windows) == 3 and all(len(w) == 8 and w[-1] == tok.eos_token_id for w in windows)
    assert windows[0][:-1] == all_ids[:7] and windows[-1][:-1] == all_ids[-7:]  # first and last tokens are read
    assert len(short) == 1 and cls_model.encode_windows(tok, [long_text], 8, 1)[0] == [
        cls_model.encode(tok, [long_text], 8)[0]
    ]
    with pytest.raises(ValueError, match="max_windows"):
        cls_model.encode_windows(tok, ["셀"], 8, 0)


def test_window_logits_are_pooled_by_their_mean_per_document():
    logits = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    pooled = cls_model.pool_window_logits(logits, [0, 0, 1], 2)
    assert np.allclose(pooled, [[2.0, 1.0], [0.0, 4.0]])
    with pytest.raises(ValueError, match="no window"):
        cls_model.pool_window_logits(logits, [0, 0, 0], 2)


def test_window_sampled_dataset_draws_a_seeded_window_per_epoch():
    ds = training.WindowSampledDataset([[[1], [2], [3], [4]], [[9]]], [0, 1], seed=0)
    seen = set()
    for epoch in range(12):
        ds.epoch = epoch
        seen.add(ds[0]["input_ids"][0])
        assert ds[1] == {"input_ids": [9], "labels": 1}
    assert len(seen) > 1  # different windows over the epochs
    ds.epoch = 5
    again = training.WindowSampledDataset([[[1], [2], [3], [4]], [[9]]], [0, 1], seed=0)
    again.epoch = 5
    assert ds[0] == again[0]  # the draw is a function of (seed, epoch, document)


def test_a_retry_continues_from_the_saved_adapter(corpus, splits, trained, tmp_path):
    model, tok, _ = trained
    saved = cls_model.save_classifier(model, tok, tmp_path / "attempt_0")
    test = splits["test"]
    before = cls_model.predict_proba(model, tok, test.texts, max_length=24, max_windows=3)
    cfg = classifier_params()
    loaded, tok2 = cls_model.load_adapter(corpus["lm_dir"], CLASSES, saved / cls_model.ADAPTER_SUBDIR)
    assert np.allclose(
        cls_model.predict_proba(loaded, tok2, test.texts, max_length=24, max_windows=3), before, atol=1e-5
    )
    settings = {**gate.attempt_settings(cfg["train"], {"retry_epochs": 1, "retry_lr": 1e-6}, 1)}
    cont, _, info = training.train_attempt(
        corpus["lm_dir"],
        splits["train"],
        splits["val"],
        CLASSES,
        cfg,
        settings,
        seed=1,
        init_adapter=saved / cls_model.ADAPTER_SUBDIR,
    )
    assert info["continued"] == 1 and info["class_weighted"] == 1 and info["epochs_run"] == 1
    after = cls_model.predict_proba(cont, tok, test.texts, max_length=24, max_windows=3)
    # a tiny learning rate barely moves the continued model: it starts where the saved one ended, not afresh
    assert np.abs(after - before).max() < 0.05


def test_lora_classifier_trains_only_adapter_and_head_and_saves_a_servable_model(corpus, splits, trained, tmp_path):
    model, tok, info = trained
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or "score" in n for n in names)
    assert any("score" in n for n in names)  # the head is trained through modules_to_save
    assert info["trainable_params"] < info["total_params"] and info["class_weighted"] == 0
    assert 0.0 <= info["val_macro_f1"] <= 1.0 and 1 <= info["best_epoch"] <= info["epochs_run"]
    assert model.config.id2label == dict(enumerate(CLASSES))

    test = splits["test"]
    proba = cls_model.predict_proba(model, tok, test.texts, max_length=24, batch_size=5)
    assert proba.shape == (len(test), len(CLASSES)) and np.allclose(proba.sum(axis=1), 1.0)
    out = cls_model.save_classifier(model, tok, tmp_path / "classifier")
    reloaded, tok2 = cls_model.load_classifier(out / cls_model.MODEL_SUBDIR)
    assert cls_model.classes_of(reloaded) == CLASSES
    assert np.allclose(cls_model.predict_proba(reloaded, tok2, test.texts, max_length=24), proba, atol=1e-5)

    from peft import PeftModel  # the adapter folder loads back onto the merged LM

    base, _ = cls_model.load_sequence_classifier(corpus["lm_dir"], CLASSES)
    again = PeftModel.from_pretrained(base, out / cls_model.ADAPTER_SUBDIR).eval()
    assert np.allclose(cls_model.predict_proba(again, tok, test.texts, max_length=24), proba, atol=1e-5)


def test_attention_defaults_to_sdpa_and_the_setting_is_checked(trained):
    model, _, info = trained
    assert cls_model.attention_implementation(None) == "sdpa" and cls_model.attention_implementation("eager") == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        cls_model.attention_implementation("flash")
    assert info["attn_implementation"] == "sdpa" and model.config._attn_implementation == "sdpa"
    assert info["compiled_layers"] == 0  # compile is off unless classifier.compile says so


def test_eager_and_sdpa_attention_give_the_same_probabilities(corpus, splits, trained, tmp_path):
    """Trained with one attention kernel (sdpa by default), the classifier scores the same under the other: eager and
    sdpa compute the same function, so switching ``classifier.attn_implementation`` changes only rounding."""
    model, tok, _ = trained
    saved = cls_model.save_classifier(model, tok, tmp_path / "c")
    texts = splits["test"].texts
    proba = {}
    for impl in ("eager", "sdpa"):
        m, t = cls_model.load_adapter(
            corpus["lm_dir"], CLASSES, saved / cls_model.ADAPTER_SUBDIR, trainable=False, attn_implementation=impl
        )
        assert m.config._attn_implementation == impl
        proba[impl] = cls_model.predict_proba(m.eval(), t, texts, max_length=24, max_windows=3, batch_size=4)
    assert np.allclose(proba["eager"], proba["sdpa"], atol=1e-5)  # padded batches included (batch_size 4)


def _lora_steps(corpus, tok_texts, *, compiled: bool, steps: int = 3):
    """``steps`` SGD steps of a fresh tiny LoRA classifier (seed 0, fp32) on one padded batch: the losses, the
    trained parameters, and how many layers ran compiled during the steps."""
    base, tok = cls_model.load_sequence_classifier(corpus["lm_dir"], CLASSES, attn_implementation="eager")
    model = cls_model.attach_lora(base, classifier_params()["lora"], seed=0).train()
    batch = tok.pad({"input_ids": cls_model.encode(tok, tok_texts, 24)}, return_tensors="pt", padding_side="right")
    assert int((batch["attention_mask"] == 0).sum()) > 0  # padded rows: the masked path is exercised
    labels = torch.arange(len(tok_texts)) % len(CLASSES)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    with cls_model.compiled_layers(model, enabled=compiled) as n_compiled:
        layers = cls_model.decoder_layers(model)
        running = sum(layer._compiled_call_impl is not None for layer in layers)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    assert all(layer._compiled_call_impl is None for layer in cls_model.decoder_layers(model))  # eager again after
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, n_compiled, running


def test_compiled_decoder_layers_train_as_the_eager_ones_do(corpus, splits):
    """``classifier.compile``: Inductor-compiled decoder layers compute the same loss and updates as eager ones
    (fp32; only rounding may differ), every layer runs compiled inside the block, and none after it."""
    texts = splits["train"].texts[:5] + ["헌법 국민"]  # one short text: its row is padded
    eager_losses, eager_params, n0, running0 = _lora_steps(corpus, texts, compiled=False)
    losses, params, n, running = _lora_steps(corpus, texts, compiled=True)
    layers = len(cls_model.decoder_layers(cls_model.load_sequence_classifier(corpus["lm_dir"], CLASSES)[0]))
    assert (n0, running0) == (0, 0) and n == running == layers >= 2
    assert eager_losses[0] > eager_losses[-1]  # the steps train
    assert np.allclose(losses, eager_losses, rtol=1e-4, atol=1e-5)
    assert eager_params.keys() == params.keys() and len(params) > 2
    for name, value in params.items():
        assert torch.allclose(value, eager_params[name], rtol=1e-3, atol=1e-5), name


def test_compiled_layers_need_a_cxx_compiler_and_decoder_layers(corpus, monkeypatch):
    model, _ = cls_model.load_sequence_classifier(corpus["lm_dir"], CLASSES)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*classifier.compile: false"):
        with cls_model.compiled_layers(model):
            pass
    with cls_model.compiled_layers(model, enabled=False) as n:  # off: no compiler needed, nothing compiled
        assert n == 0
    with pytest.raises(ValueError, match="no decoder layers"):
        cls_model.decoder_layers(torch.nn.Linear(2, 2))


def test_an_attempt_with_compile_on_trains_compiled_and_reports_it(corpus, splits):
    cfg = classifier_params(compile=True, attn_implementation="eager", train={"epochs": 2})
    settings = gate.attempt_settings(cfg["train"], cfg["gate"], 0)
    model, tok, info = training.train_attempt(
        corpus["lm_dir"], splits["train"], splits["val"], CLASSES, cfg, settings, seed=0
    )
    assert info["compiled_layers"] == len(cls_model.decoder_layers(model)) and info["epochs_run"] == 2.0
    assert info["attn_implementation"] == "eager" and 0.0 <= info["val_macro_f1"] <= 1.0
    assert all(layer._compiled_call_impl is None for layer in cls_model.decoder_layers(model))


def test_the_classifier_learns_the_labels(splits, trained):
    model, tok, info = trained
    test = splits["test"]
    proba = cls_model.predict_proba(model, tok, test.texts, max_length=24)
    s = metrics.score(test.labels, proba, CLASSES)
    assert info["val_macro_f1"] > 0.4 and s["accuracy"] > 0.4  # chance is 0.25


def test_class_weights_are_inverse_frequency_and_weight_the_loss():
    w = training.balanced_class_weights([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1), 1.0]))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([1, 0])
    loss = training.weighted_cross_entropy(w)({"logits": logits}, labels)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits, labels, weight=w))
    assert not torch.isclose(loss, training.weighted_cross_entropy(None)({"logits": logits}, labels))


# ------------------------------------------------------------------------------------------------ the gate


def test_a_retry_continues_for_retry_epochs_at_retry_lr_with_a_class_weighted_loss():
    train = classifier_params()["train"]
    g = {"retry_epochs": 3, "retry_lr": 1.0e-3}
    first = gate.attempt_settings(train, g, 0)
    assert first["class_weighted"] is False and first["epochs"] == train["epochs"] and first["lr"] == train["lr"]
    for r in (1, 2, 3):  # every retry is the same short continuation, not a longer fresh run
        retry = gate.attempt_settings(train, g, r)
        assert retry["epochs"] == 3 and retry["lr"] == 1.0e-3 and retry["class_weighted"] and retry["warmup_steps"] == 0
    assert (
        gate.attempt_settings(train, {}, 1)["lr"] == train["lr"] and gate.attempt_settings(train, {}, 1)["epochs"] == 3
    )
    with pytest.raises(ValueError, match="retry_epochs"):
        gate.attempt_settings(train, {"retry_epochs": 0}, 1)


def _fake_attempts(test_f1s, val_f1s, min_f1):
    calls = []

    def train_and_score(index, settings, previous):
        calls.append((settings, previous))
        return gate.Attempt(
            index=index,
            settings=settings,
            val_macro_f1=val_f1s[index],
            test={"macro_f1": test_f1s[index]},
            passed=gate.passes(test_f1s[index], min_f1),
        )

    return train_and_score, calls


def test_gate_stops_at_the_first_passing_attempt_and_each_retry_continues_the_previous_attempt():
    fn, calls = _fake_attempts([0.5, 0.6, 0.9], [0.5, 0.6, 0.7], 0.75)
    out = gate.run_gate(fn, classifier_params()["train"], {"retry_epochs": 3}, min_f1=0.75, max_retries=3)
    assert out.passed and out.retries == 2 and out.kept.index == 2 and len(calls) == 3
    assert calls[0][1] is None  # attempt 0 trains from the merged LM
    assert calls[1][1].index == 0 and calls[2][1].index == 1  # retry r continues attempt r - 1
    assert calls[1][0]["class_weighted"] and calls[1][0]["epochs"] == 3


def test_gate_that_never_passes_spends_every_retry_and_keeps_the_best_validation_attempt():
    fn, calls = _fake_attempts([0.5, 0.7, 0.6, 0.4], [0.6, 0.5, 0.9, 0.3], 0.99)
    out = gate.run_gate(fn, classifier_params()["train"], {}, min_f1=0.99, max_retries=3)
    assert not out.passed and out.retries == 3 and len(out.attempts) == 4
    assert out.kept.index == 2  # best validation macro-F1, not best test macro-F1
    with pytest.raises(ValueError, match="min_f1"):
        gate.run_gate(fn, classifier_params()["train"], {}, min_f1=1.5, max_retries=1)
    with pytest.raises(ValueError, match="retry_lr"):  # bad retry settings fail before any training
        gate.run_gate(fn, classifier_params()["train"], {"retry_lr": -1.0}, min_f1=0.5, max_retries=1)


def test_a_passing_deployed_model_is_kept_and_nothing_is_trained():
    fn, calls = _fake_attempts([None, 0.9], [None, 0.7], 0.75)
    deployed = gate.Attempt(
        index=0, settings={}, val_macro_f1=0.8, test={"macro_f1": 0.8}, passed=True, source="deployed"
    )
    out = gate.run_gate(fn, classifier_params()["train"], {}, min_f1=0.75, max_retries=3, initial=deployed)
    assert out.passed and out.kept is deployed and calls == []


def test_a_failing_deployed_model_is_fine_tuned_by_the_retries():
    fn, calls = _fake_attempts([None, 0.6, 0.8], [None, 0.6, 0.7], 0.75)
    deployed = gate.Attempt(
        index=0, settings={}, val_macro_f1=0.5, test={"macro_f1": 0.5}, passed=False, source="deployed"
    )
    out = gate.run_gate(fn, classifier_params()["train"], {}, min_f1=0.75, max_retries=3, initial=deployed)
    assert out.passed and out.kept.index == 2 and len(calls) == 2
    assert calls[0][1] is deployed and calls[0][0]["class_weighted"]  # retry 1 continues the deployed model


# ------------------------------------------------------------------------------------------------ alerts


def _record(**kw):
    base = dict(
        stage="train_classifier",
        severity="error",
        metric="macro_f1",
        value=0.42,
        threshold=0.75,
        attempts=4,
        git_commit="abc123",
        mlflow_run_id="run1",
        message="gate failed",
    )
    return alerts.alert_record(**{**base, **kw})


def test_alert_is_posted_as_json_with_a_slack_text_to_a_real_webhook(webhook, tmp_path):
    doc = alerts.publish(
        [_record()],
        tmp_path / "alerts.json",
        stage="train_classifier",
        gate="failed",
        webhook_url=webhook.url + "/hook",
    )
    assert doc["alerts"][0]["webhook"] == "delivered (HTTP 200)"
    (got,) = webhook.bodies
    assert got["path"] == "/hook" and got["content_type"].startswith("application/json")
    body = got["json"]
    assert {k: body[k] for k in alerts.ALERT_FIELDS if k != "time"} == {
        k: _record()[k] for k in alerts.ALERT_FIELDS if k != "time"
    }
    assert "[ERROR] train_classifier" in body["text"] and "0.4200" in body["text"] and "4 attempt(s)" in body["text"]
    written = json.loads((tmp_path / "alerts.json").read_text())
    assert written["gate"] == "failed" and written["alerts"][0]["metric"] == "macro_f1"
    assert set(alerts.ALERT_FIELDS) <= set(written["alerts"][0])


def test_a_failing_webhook_is_logged_and_never_fails(webhook, tmp_path, caplog):
    from conftest import free_port

    doc = alerts.publish(
        [_record(), _record(severity="warning")],
        tmp_path / "a.json",
        stage="s",
        gate="failed",
        webhook_url=webhook.url + "/fail",
    )
    assert [a["webhook"] for a in doc["alerts"]] == ["failed: HTTP 500 Internal Server Error"] * 2
    refused = alerts.post_webhook(f"http://127.0.0.1:{free_port()}/x", _record(), timeout_s=2)
    assert refused.startswith("failed:")
    assert "alert webhook" in caplog.text
    assert (
        alerts.publish([_record()], tmp_path / "b.json", stage="s", gate="failed")["alerts"][0]["webhook"]
        == "not configured"
    )
    with pytest.raises(ValueError, match="severity"):
        _record(severity="fatal")


# ------------------------------------------------------------------------------------------------ serving input


def test_serving_input_checks_name_the_row_and_the_problem():
    ok = serving.texts_from_input(["셀 수식", "국회"], max_batch_rows=2)
    assert ok == ["셀 수식", "국회"]
    limits = {"max_batch_rows": 3, "max_text_chars": 5, "max_request_bytes": 24}
    assert serving.texts_from_input(["가나다라", "마바사아"], **limits) == [
        "가나다라",
        "마바사아",
    ]  # 24 bytes: at the limit
    cases = [
        ({"text": ["a"]}, "must be a list of texts, got dict"),
        ("a", "must be a list of texts, got str"),
        (["a", 3], "row 1: the text must be a string, got int 3"),
        (["a", True], "row 1: the text must be a string, got bool True"),
        (["a", ["b"]], "row 1: the text must be a string, got list"),
        (["a", {"b": 1}], "row 1: the text must be a string, got dict"),
        (["a", None], r"row 1: the text is missing \(null\)"),
        (["a", float("nan")], r"row 1: the text is missing \(NaN\)"),
        (["a", " \n\u3000"], "row 1: the text is empty"),
        (["a"] * 4, "4 rows, over the limit of 3"),
        ([], "no rows"),
        (["a", "가나다라마바"], "row 1: the text has 6 characters, over the limit of 5"),
        (["가나다라", "마바사아", "자"], "row 2: the request's texts pass 24 bytes"),
    ]
    for bad, message in cases:
        with pytest.raises(MlflowException, match=message) as err:
            serving.texts_from_input(bad, **limits)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400


# ------------------------------------------------------------------------------------------------ registry


def test_choose_alias_never_lets_the_champion_regress():
    none = {"how": "none", "macro_f1": None}
    assert registry.choose_alias(True, 0.5, none) == "champion"
    assert registry.choose_alias(False, 0.9, none) == "challenger"
    assert registry.choose_alias(True, 0.8, {"how": "tag", "macro_f1": 0.8}) == "champion"  # ties promote
    assert registry.choose_alias(True, 0.79, {"how": "tag", "macro_f1": 0.8}) == "challenger"
    assert registry.choose_alias(True, 0.99, {"how": "unavailable", "macro_f1": None}) == "challenger"
    # A re-run that reproduces the champion's predictions ties with it, whether the champion's tag holds the score
    # rounded to 6 decimals (as older registries' tags do) or in full.
    reproduced = 0.7543107963518088
    assert registry.choose_alias(True, reproduced, {"how": "tag", "macro_f1": 0.754311}) == "champion"
    tag = registry.score_tag(reproduced)
    assert float(tag) == reproduced
    assert registry.choose_alias(True, reproduced, {"how": "tag", "macro_f1": float(tag)}) == "champion"
    assert registry.choose_alias(True, reproduced - 1e-5, {"how": "tag", "macro_f1": float(tag)}) == "challenger"


# ------------------------------------------------------------------------------------------------ the stage


def _run_stage(corpus, cfg, out: Path, labels_path=None) -> dict:
    with mlflow_run("train_classifier", cfg) as ml:
        return train_classifier.run(
            DOMAINS,
            cfg,
            ml,
            split_dir=corpus["split_dir"],
            labels_path=labels_path or corpus["labels_path"],
            lm_dir=corpus["lm_dir"],
            out_dir=out / "models" / "classifier",
            token_stats_json=out / "metrics" / "token_stats.json",
            confusion_csv=out / "plots" / "classifier_confusion.csv",
            baseline_confusion_csv=out / "plots" / "classifier_baseline_confusion.csv",
            alerts_json=out / "metrics" / "classifier_alerts.json",
        )


def test_stage_gates_retries_alerts_and_never_regresses_the_champion(corpus, tracking, webhook, tmp_path):
    client = MlflowClient()
    name = "domain-lm-classifier"

    # Round 1: the gate passes, there is no champion yet: version 1 becomes champion, no alert.
    first = _run_stage(corpus, classifier_params(alert={"webhook_url": webhook.url + "/hook"}), tmp_path)
    assert first["gate"]["passed"] == 1 and first["gate"]["attempts"] == 1 and first["alerts"] == 0
    assert first["registry"] == {
        "version": 1,
        "champion": 1,
        "previous_champion_version": None,
        "previous_champion_macro_f1": None,
    }
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    tags = client.get_model_version(name, "1").tags
    assert {"git_commit", "data_sha256", "test_sha256", "label_overrides", "macro_f1", "gate"} <= set(tags)
    assert tags["label_overrides"] == str(len(OVERRIDES)) and float(tags["macro_f1"]) == first["lora"]["macro_f1"]
    assert json.loads((tmp_path / "metrics" / "classifier_alerts.json").read_text())["alerts"] == []
    assert not webhook.bodies
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_ovr_macro", "per_class", "confusion"):
        assert key in first["lora"] and key in first["baseline"]
    assert first["lora_to_baseline"]["macro_f1"] == pytest.approx(
        first["lora"]["macro_f1"] / first["baseline"]["macro_f1"]
    )
    for side in ("lora", "baseline"):
        assert first[side]["macro_f1_low"] <= first[side]["macro_f1_high"]
    lead = first["lora_to_baseline"]
    assert lead["macro_f1_difference"] == pytest.approx(first["lora"]["macro_f1"] - first["baseline"]["macro_f1"])
    assert lead["macro_f1_difference_low"] <= lead["macro_f1_difference_high"]
    assert first["bootstrap"]["resamples"] == 1000 and first["bootstrap"]["method"] in ("BCa", "percentile")
    assert set(first["lora"]["per_class"]) == set(CLASSES)
    rows = (tmp_path / "plots" / "classifier_confusion.csv").read_text().splitlines()
    assert rows[0] == "id,actual,predicted,confidence" and len(rows) == 1 + len(CLASSES) * COUNTS["test"]
    assert (tmp_path / "models" / "classifier" / "model" / "config.json").exists()
    assert (tmp_path / "models" / "classifier" / "adapter" / "adapter_config.json").exists()
    assert (
        json.loads((tmp_path / "metrics" / "token_stats.json").read_text())["all"]["train"]["docs"]
        == len(CLASSES) * COUNTS["train"]
    )

    # Round 2: an unreachable bar: every retry is spent, the alert goes out, v2 is only a challenger.
    cfg = classifier_params(gate={"min_f1": 0.99}, alert={"webhook_url": webhook.url + "/hook"})
    second = _run_stage(corpus, cfg, tmp_path)
    assert second["gate"]["passed"] == 0 and second["gate"]["attempts"] == 3 and second["gate"]["retries"] == 2
    assert set(second["gate"]["test_macro_f1"]) == {"attempt_0", "attempt_1", "attempt_2"}
    assert second["registry"]["version"] == 2 and second["registry"]["champion"] == 0
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2
    parent = mlflow.search_runs(experiment_names=["domain-lm"], filter_string="tags.`registry.version` = '2'")
    children = mlflow.search_runs(
        experiment_names=["domain-lm"], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id'][0]}'"
    )
    assert sorted(children["tags.mlflow.runName"]) == ["attempt_0", "attempt_1", "attempt_2"]
    assert set(children["tags.gate"]) == {"failed"} and children["metrics.test_macro_f1"].notna().all()
    assert list(children.sort_values("tags.mlflow.runName")["params.class_weighted"]) == ["False", "True", "True"]
    doc = json.loads((tmp_path / "metrics" / "classifier_alerts.json").read_text())
    (alert,) = doc["alerts"]
    assert doc["gate"] == "failed" and alert["severity"] == "error" and alert["attempts"] == 3
    assert alert["threshold"] == 0.99 and alert["mlflow_run_id"] == parent["run_id"][0]
    assert alert["webhook"] == "delivered (HTTP 200)"
    (posted,) = webhook.bodies
    assert posted["json"]["attempts"] == 3 and "gate failed after 3 attempts" in posted["json"]["text"]

    # A changed test set (new data arrived): the champion is loaded and re-scored on it; the same one: its tag.
    champion = registry.champion_macro_f1(
        client,
        name,
        test_sha256="another test set",
        texts=[labelled_docs("law", 1, "x")[0], "셀 수식 차트"],
        labels=["law", "calc"],
    )
    assert champion["how"] == "rescored" and champion["version"] == 1 and 0.0 <= champion["macro_f1"] <= 1.0
    same = data.split_sha256(data.read_split(corpus["split_dir"], corpus["labels_path"], DOMAINS, "test"))
    assert registry.champion_macro_f1(client, name, test_sha256=same, texts=[], labels=[])["how"] == "tag"


def test_stage_refuses_bad_retry_settings_before_training(corpus, tracking, tmp_path):
    cfg = classifier_params(gate={"min_f1": 0.99, "retry_epochs": -1})
    with pytest.raises(ValueError, match="retry_epochs"):
        _run_stage(corpus, cfg, tmp_path)
    assert not (tmp_path / "models" / "classifier").exists()
