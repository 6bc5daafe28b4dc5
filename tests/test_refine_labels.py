"""Tests for the refine_labels stage: SQLite transactions, the update rule, out-of-fold scoring,
OOM back-off, convergence, promotion of refined labels, and (slow) the whole stage end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlite_utils
import torch
import yaml
from lm_fixtures import korean_docs, write_label_table_fixture, write_split_fixture
from tiny_lm import build_base, one_torch_thread  # noqa: F401 (autouse fixture)

from domainlm.common.params import section
from domainlm.common.threads import limit_threads
from domainlm.documents.labels import OVERRIDES_SCHEMA, apply_overrides, read_overrides, write_empty_overrides
from domainlm.refine import ensemble as ens
from domainlm.refine import features as feat
from domainlm.refine import loop, store
from domainlm.refine import members as mem
from stages import refine_labels as rl

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["law", "office_help", "faq"]


def toy_rows(n_per_class: int = 12, seed: int = 0) -> list[dict]:
    """Rows of the sentences table: three classes with disjoint vocabularies (tests/lm_fixtures)."""
    rows = []
    for d in DOMAINS:
        for i, text in enumerate(korean_docs(d, n_per_class, seed=seed)):
            split = "val" if i % 4 == 0 else "train"
            rows.append(
                {
                    "id": f"{d}-{i}",
                    "text": text,
                    "domain": d,
                    "split": split,
                    "original_label": d,
                    "current_label": d,
                    "confidence": None,
                    "label_last_updated": "2024-01-01T00:00:00+00:00",
                    "updated_iteration": None,
                }
            )
    return rows


def dump(db: sqlite_utils.Database) -> list[tuple]:
    return db.execute(f"SELECT * FROM {store.TABLE} ORDER BY rowid").fetchall()


@pytest.fixture
def db(tmp_path):
    path = store.create_store(tmp_path / "sentences.db", toy_rows(), chunksize=7)
    database = sqlite_utils.Database(path)
    yield database
    database.close()


# ------------------------------------------------------------------ the SQLite table


def test_store_schema_chunks_and_indexes(tmp_path):
    write_split_fixture(tmp_path / "split", {d: korean_docs(d, 10) for d in DOMAINS})
    report = store.LoadReport()
    rows = store.iter_split_rows(store.split_files(tmp_path / "split", DOMAINS), 3, report)
    path = store.create_store(tmp_path / "s.db", rows, chunksize=3)
    db = sqlite_utils.Database(path)
    table = db[store.TABLE]
    assert table.pks == ["id"]
    assert set(table.columns_dict) == set(store.COLUMNS)
    assert {tuple(ix.columns) for ix in table.indexes} >= {("current_label",), ("split",)}
    assert table.count == 30 and report.rows == 30 and report.per_split == {"train": 18, "val": 6, "test": 6}
    row = next(table.rows_where("id = ?", ["law-val-0"]))
    assert row["split"] == "val" and row["original_label"] == row["current_label"] == "law"
    assert row["label_last_updated"].endswith("+00:00")
    assert not list(tmp_path.glob(".s.db*"))  # the temporary sibling is gone


def test_store_takes_labels_from_the_label_table(tmp_path):
    write_split_fixture(tmp_path / "split", {d: korean_docs(d, 10) for d in DOMAINS})
    write_label_table_fixture(tmp_path / "split", tmp_path / "labels.parquet", {"law-train-0": "faq"})
    labels = store.label_map(tmp_path / "labels.parquet")
    rows = {
        r["id"]: r
        for r in store.iter_split_rows(store.split_files(tmp_path / "split", DOMAINS), 4, store.LoadReport(), labels)
    }
    assert rows["law-train-0"]["original_label"] == rows["law-train-0"]["current_label"] == "faq"
    assert rows["law-train-1"]["original_label"] == "law"
    del labels["law-val-0"]
    with pytest.raises(ValueError, match="law-val-0.*no row in the label table"):
        list(store.iter_split_rows(store.split_files(tmp_path / "split", DOMAINS), 4, store.LoadReport(), labels))


def test_store_rejects_duplicate_ids_and_missing_split(tmp_path):
    write_split_fixture(tmp_path / "split", {"law": korean_docs("law", 8)})
    files = store.split_files(tmp_path / "split", ["law"])
    with pytest.raises(ValueError, match="law-train-0.*twice"):
        store.create_store(tmp_path / "s.db", store.iter_split_rows(files + files[:1], 4, store.LoadReport()))
    assert not (tmp_path / "s.db").exists()
    with pytest.raises(FileNotFoundError, match="faq/train.parquet"):
        store.split_files(tmp_path / "split", ["law", "faq"])


def test_interrupted_iteration_leaves_db_unchanged(db):
    before = dump(db)
    ids = [r[0] for r in before]
    updates = [store.RowUpdate(i, 0.9, "faq") for i in ids]

    def crash_half_way():
        for k, u in enumerate(updates):
            if k == len(updates) // 2:
                raise RuntimeError("injected crash")
            yield u

    with pytest.raises(RuntimeError, match="injected crash"):
        store.apply_updates(db, crash_half_way(), iteration=0)
    assert dump(db) == before
    # an unknown id rolls back too
    with pytest.raises(KeyError, match="no-such-id"):
        store.apply_updates(db, updates[:3] + [store.RowUpdate("no-such-id", 0.5)], iteration=0)
    assert dump(db) == before
    # without the crash, the same updates all land together
    assert store.apply_updates(db, iter(updates), iteration=3, now="2030-01-01T00:00:00+00:00") == len(ids)
    after = db.execute(
        f"SELECT DISTINCT current_label, confidence, label_last_updated, updated_iteration FROM {store.TABLE}"
    ).fetchall()
    assert after == [("faq", 0.9, "2030-01-01T00:00:00+00:00", 3)]


def test_confidence_only_update_keeps_label_metadata(db):
    first = dump(db)[0]
    store.apply_updates(db, [store.RowUpdate(first[0], 0.42)], iteration=5)
    row = db[store.TABLE].get(first[0])
    assert row["confidence"] == 0.42
    assert row["current_label"] == first[5] and row["updated_iteration"] is None
    assert row["label_last_updated"] == first[7]


# ------------------------------------------------------------------ the update rule


def test_threshold_schedule():
    taus = [loop.threshold(t, 0.7, 0.05, 0.95) for t in range(8)]
    assert taus[:6] == pytest.approx([0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    assert taus[6:] == [0.95, 0.95]
    assert all(a <= b for a, b in zip(taus, taus[1:]))
    with pytest.raises(ValueError, match="iteration"):
        loop.threshold(-1, 0.7, 0.05, 0.95)
    with pytest.raises(ValueError, match="tau_max"):
        loop.threshold(0, 0.7, 0.05, 1.5)


def test_select_changes_threshold():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.1, 0.9], [0.3, 0.7], [0.2, 0.8], [0.95, 0.05]])
    new = loop.select_changes(y, proba, tau=0.75, max_change_fraction=1.0)
    # row 0: 0.9 >= 0.75 -> changes; row 1: 0.7 < 0.75 -> stays; row 2 agrees; row 3 changes
    assert new.tolist() == [1, 0, 1, 0]
    assert loop.select_changes(y, proba, tau=0.96, max_change_fraction=1.0).tolist() == y.tolist()


def test_select_changes_self_confidence_bound():
    y = np.array([0, 0, 0])
    proba = np.array([[0.30, 0.70, 0.00], [0.05, 0.85, 0.10], [0.02, 0.08, 0.90]])
    # every row's prediction beats its label at tau 0.6; only rows whose own label is implausible change
    assert loop.select_changes(y, proba, 0.6, 1.0).tolist() == [1, 1, 2]
    assert loop.select_changes(y, proba, 0.6, 1.0, max_self_confidence=0.1).tolist() == [0, 1, 2]
    assert loop.select_changes(y, proba, 0.6, 1.0, max_self_confidence=0.02).tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="max_self_confidence"):
        loop.select_changes(y, proba, 0.6, 1.0, max_self_confidence=1.5)


def test_select_changes_class_cap():
    rng = np.random.default_rng(0)
    n, c = 400, 5
    y = rng.integers(0, c, n)
    proba = rng.dirichlet(np.full(c, 0.3), n)
    for frac in (0.0, 0.05, 0.1, 0.3):
        new = loop.select_changes(y, proba, tau=0.5, max_change_fraction=frac)
        changed = new != y
        conf = proba.max(1)
        for k in range(c):
            in_k = y == k
            assert changed[in_k].sum() <= math.floor(frac * in_k.sum())
            # the changed rows are the most confident candidates of their class
            cand = in_k & (proba.argmax(1) != y) & (conf >= 0.5)
            if changed[in_k].any():
                assert conf[changed & in_k].min() >= conf[cand & ~changed].max(initial=0)
        assert (new[changed] == proba.argmax(1)[changed]).all()
        assert (conf[changed] >= 0.5).all()
    uncapped = loop.select_changes(y, proba, tau=0.5, max_change_fraction=1.0)
    capped = loop.select_changes(y, proba, tau=0.5, max_change_fraction=0.05)
    assert (uncapped != y).sum() > (capped != y).sum()  # the cap binds in this test


def test_feature_change_rate():
    a = {0: frozenset("abcd"), 1: frozenset("wxyz")}
    assert loop.feature_change_rate(a, a) == 0.0
    assert loop.feature_change_rate(a, {0: frozenset("abce"), 1: frozenset("wxyz")}) == pytest.approx(0.125)
    assert loop.feature_change_rate(a, {0: frozenset("abcd")}) == pytest.approx(0.5)


# ------------------------------------------------------------------ out-of-fold scoring


class Memorizer:
    """A member that remembers the rows it was trained on: it answers their training label with
    certainty and is uniform on rows it never saw, so any leak shows in its probabilities."""

    name = "memorizer"

    def fit(self, train_idx, y, n_classes, seed):
        return {int(i): int(y[i]) for i in train_idx}

    def predict_proba(self, model, idx, n_classes):
        out = np.full((len(idx), n_classes), 1.0 / n_classes)
        for r, i in enumerate(idx):
            if int(i) in model:
                out[r] = np.eye(n_classes)[model[int(i)]]
        return out


def test_out_of_fold_never_scores_a_training_row():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 97)
    folds = ens.assign_folds(y, 5, seed=3)
    oof = ens.out_of_fold(Memorizer(), y, folds, 4)
    assert np.allclose(oof.proba, 0.25)  # no row came from a model that saw it
    assert (oof.scored_by == folds).all()
    for i in range(len(y)):
        assert i not in set(oof.trained_on[oof.scored_by[i]].tolist())
    # the same member scoring its own training rows would give itself away
    model = Memorizer().fit(np.arange(len(y)), y, 4, 0)
    assert np.allclose(Memorizer().predict_proba(model, np.arange(len(y)), 4).max(1), 1.0)


def test_folds_are_stratified_and_cover_every_row():
    y = np.repeat(np.arange(3), [40, 20, 3])
    folds = ens.assign_folds(y, 4, seed=0)
    assert set(folds.tolist()) == {0, 1, 2, 3}
    for k in range(4):
        assert (y[folds == k] == 0).sum() == 10 and (y[folds == k] == 1).sum() == 5
    with pytest.raises(ValueError, match="folds"):
        ens.assign_folds(y, 1, seed=0)


def test_lexical_member_counts_words_and_jamo():
    texts = korean_docs("law", 4) + ["Only English words here, no Hangul at all."] * 2
    x, names = feat.lexical_counts(texts, min_df=1)
    assert x.shape == (6, len(names))
    assert any(n.startswith("j:") for n in names) and any(n.startswith("w:") for n in names)
    assert "j:대" in set(names)  # a jamo bigram of 대한민국
    english_only, enames = feat.lexical_counts(["plain english text", "more english text"], min_df=1)
    assert not any(n.startswith("j:") for n in enames) and english_only.shape[0] == 2


def test_char_tfidf_member_scores_every_row_with_probabilities_and_is_deterministic():
    texts = [t for d in DOMAINS for t in korean_docs(d, 10)]
    y = np.repeat(np.arange(3), 10)
    x = feat.char_tfidf(texts, ngrams=(1, 3), min_df=1)
    assert x.shape[0] == 30 and x.shape[1] > 0
    np.testing.assert_allclose(np.sqrt(x.multiply(x).sum(axis=1)).A.ravel(), 1.0)  # l2-normalised rows
    member = mem.CharTfidfLR(x, C=3.0)
    train, test = np.arange(30)[np.arange(30) % 3 != 0], np.arange(30)[np.arange(30) % 3 == 0]
    proba = member.predict_proba(member.fit(train, y, 4, seed=0), test, 4)  # 4 classes, one never seen
    assert proba.shape == (len(test), 4) and proba.dtype == np.float64
    assert np.allclose(proba.sum(axis=1), 1.0) and (proba[:, 3] == 0).all()
    assert (proba.argmax(1) == y[test]).all()  # disjoint vocabularies: easy
    again = member.predict_proba(member.fit(train, y, 4, seed=0), test, 4)
    assert np.array_equal(proba, again)
    folds = ens.assign_folds(y, 3, seed=0)
    oof = ens.out_of_fold(member, y, folds, 3, seed=0)
    assert np.array_equal(oof.proba, ens.out_of_fold(member, y, folds, 3, seed=0).proba)
    with pytest.raises(ValueError, match="analyzer"):
        feat.char_tfidf(texts, analyzer="word")
    with pytest.raises(ValueError, match="at least one text"):
        feat.char_tfidf([])


def test_build_members_has_the_char_tfidf_member(tmp_path):
    model, tok = build_base(tmp_path / "lm")
    texts = [t for d in DOMAINS for t in korean_docs(d, 4)]
    members, lexical, secs = mem.build_members(
        texts,
        tok,
        model,
        lexical=mem.LexicalConfig(min_df=1),
        tfidf=mem.TfidfConfig(C=1.0, min_df=1),
        lstm=mem.LSTMConfig(max_tokens=16, epochs=1),
        transformer=mem.TransformerConfig(max_tokens=16),
    )
    assert [m.name for m in members] == ["lexical", "tfidf", "lstm", "bilstm", "transformer"]
    assert members[0] is lexical and members[1].C == 1.0 and members[1].x.shape[0] == len(texts)
    assert {"lexical_features_s", "tfidf_features_s", "tokenize_s", "embed_s"} <= set(secs)


def test_cross_fitting_in_two_worker_processes_gives_the_same_probabilities(tmp_path):
    """Every member (naive Bayes, TF-IDF, LSTM, BiLSTM, the LM head), its folds fitted in two joblib worker
    processes of one thread each, gives exactly what one process fitting them one after another gives."""
    model, tok = build_base(tmp_path / "lm")
    texts = [t for d in DOMAINS for t in korean_docs(d, 8)]
    y = np.repeat(np.arange(len(DOMAINS)), 8)
    members, _, _ = mem.build_members(
        texts,
        tok,
        model,
        lexical=mem.LexicalConfig(min_df=1),
        tfidf=mem.TfidfConfig(C=1.0, min_df=1),
        lstm=mem.LSTMConfig(max_tokens=16, epochs=2),
        transformer=mem.TransformerConfig(max_tokens=16),
    )
    serial = ens.cross_fit_ensemble(members, y, len(DOMAINS), folds=3, seed=5, workers=1, threads=1)
    parallel = ens.cross_fit_ensemble(members, y, len(DOMAINS), folds=3, seed=5, workers=2, threads=1)
    for m in members:
        assert np.array_equal(serial.members[m.name].proba, parallel.members[m.name].proba), m.name
        assert (parallel.members[m.name].scored_by == parallel.folds).all()
        assert parallel.seconds[m.name] > 0
    assert np.array_equal(serial.proba, parallel.proba)
    with pytest.raises(ValueError, match="workers"):
        ens.cross_fit(members, y, serial.folds, len(DOMAINS), workers=0)


def test_temperature_scaling_softens_an_overconfident_member():
    rng = np.random.default_rng(0)
    n, c = 2000, 4
    y = rng.integers(0, c, n)
    # right 70% of the time, but always 99.7% sure
    pred = np.where(rng.random(n) < 0.7, y, (y + rng.integers(1, c, n)) % c)
    proba = np.full((n, c), 0.001)
    proba[np.arange(n), pred] = 0.997
    t = ens.fit_temperature(proba, y)
    assert t > 1.5
    calibrated = ens.apply_temperature(proba, t)
    assert (calibrated.argmax(1) == pred).all()  # ranking kept
    assert np.allclose(calibrated.sum(1), 1.0)
    assert abs(calibrated.max(1).mean() - 0.7) < 0.03  # confidence now matches accuracy
    # a calibrated member stays (about) as it is
    honest = ens.apply_temperature(proba, t)
    assert ens.fit_temperature(honest, y) == pytest.approx(1.0, abs=0.05)


def test_limit_threads_restores_settings():
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the module runs on one thread (tiny_lm.one_torch_thread)
    try:
        with limit_threads(1):
            assert torch.get_num_threads() == 1
            assert all(p["num_threads"] == 1 for p in threadpool_info())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_accuracy_weights():
    w = ens.accuracy_weights({"a": 0.9, "b": 0.7, "c": 0.4}, baseline=0.5)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["a"] == pytest.approx(2 * w["b"]) and w["c"] < 0.01


# ------------------------------------------------------------------ OOM back-off


def test_run_in_batches_halves_on_oom_and_processes_every_item_once():
    seen: list[int] = []

    def step(start, stop):
        if stop - start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.extend(range(start, stop))

    assert feat.run_in_batches(step, 20, 16) == 2
    assert seen == list(range(20))

    def cpu_oom(start, stop):
        if stop - start > 5:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    assert feat.run_in_batches(cpu_oom, 11, 8) == 4

    def other_error(start, stop):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        feat.run_in_batches(other_error, 4, 4)

    def always_oom(start, stop):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        feat.run_in_batches(always_oom, 4, 4)


def _oom_above(limit: int):
    def hook(module, args):
        if args[0].shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected for batch {args[0].shape[0]})")

    return hook


class OOMLSTM(mem.LSTMMember):
    """An LSTM member whose network 'runs out of memory' on batches above 5 rows."""

    def build_model(self, n_classes):
        model = super().build_model(n_classes)
        model.register_forward_pre_hook(_oom_above(5))
        return model


def test_lstm_member_survives_injected_oom():
    texts = [t for d in DOMAINS for t in korean_docs(d, 8)]
    y = np.repeat(np.arange(3), 8)
    tokens = [[ord(ch) for ch in t] for t in texts]  # code points as token ids
    ids, lengths, vocab = feat.token_matrix(tokens, max_len=24)
    member = OOMLSTM(ids, lengths, vocab, bidirectional=True, embed_dim=8, hidden=8, epochs=1, batch_size=16)
    model = member.fit(np.arange(24), y, 3, seed=0)
    proba = member.predict_proba(model, np.arange(24), 3)
    assert member.batch_size == 4  # 16 -> 8 -> 4
    assert proba.shape == (24, 3) and np.allclose(proba.sum(1), 1.0)


def test_embedding_survives_injected_oom(tmp_path):
    model, tok = build_base(tmp_path / "lm")
    texts = [t for d in DOMAINS for t in korean_docs(d, 3)]
    reference, bs = feat.embed_mean_pooled(model, tok, texts, max_tokens=16, batch_size=8, desc=None)
    assert bs == 8
    # Qwen2Model.forward is called with keyword arguments, so the hook reads input_ids from kwargs
    handle = model.base_model.register_forward_pre_hook(
        lambda m, args, kwargs: _oom_above(2)(m, (kwargs["input_ids"],)), with_kwargs=True
    )
    try:
        emb, bs = feat.embed_mean_pooled(model, tok, texts, max_tokens=16, batch_size=8, desc=None)
    finally:
        handle.remove()
    assert bs == 2
    assert emb.shape == (9, 32)
    np.testing.assert_allclose(emb, reference, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the loop


def small_members(texts):
    x, names = feat.lexical_counts(texts, min_df=1)
    lexical = mem.LexicalNB(x, names)
    tokens = [[ord(ch) for ch in t] for t in texts]
    ids, lengths, vocab = feat.token_matrix(tokens, max_len=32)
    lstm = mem.LSTMMember(ids, lengths, vocab, bidirectional=False, embed_dim=8, hidden=8, epochs=2, lr=0.02)
    return [lexical, lstm], lexical


def test_refine_config_reads_every_refine_param():
    p = section("refine", ROOT / "params.yaml")
    cfg = loop.RefineConfig.from_params(p)
    # every key of the refine section is a field (none silently ignored), in params.yaml's types
    assert set(p) <= {f.name for f in dataclasses.fields(loop.RefineConfig)}
    for name, sub in (
        ("lexical", cfg.lexical),
        ("tfidf", cfg.tfidf),
        ("lstm", cfg.lstm),
        ("transformer", cfg.transformer),
    ):
        assert set(p[name]) <= {f.name for f in dataclasses.fields(sub)}
        assert all(getattr(sub, k) == (tuple(v) if isinstance(v, list) else v) for k, v in p[name].items())
    assert all(getattr(cfg, k) == v for k, v in p.items() if not isinstance(v, dict))
    assert cfg.lexical.word_ngrams == tuple(p["lexical"]["word_ngrams"]) and isinstance(cfg.lexical.doc_tokens, float)
    # missing keys keep their defaults, other keys are ignored, threads may be null
    partial = loop.RefineConfig.from_params({"folds": "3", "threads": None, "lstm": {"hidden": 4}, "other": 1})
    assert partial.folds == 3 and partial.threads is None and partial.tau0 == loop.RefineConfig().tau0
    assert partial.lstm == mem.LSTMConfig(hidden=4) and partial.lexical == mem.LexicalConfig()
    assert partial.tfidf == mem.TfidfConfig() and cfg.tfidf.ngrams == tuple(p["tfidf"]["ngrams"])


def test_loop_corrects_flipped_labels_and_converges(db, tmp_path):
    labels = store.read_labels(db)
    # flip three labels (one per class) to another class
    flips = {"law-1": "faq", "office_help-2": "law", "faq-3": "office_help"}
    with db.atomic():
        for i, lab in flips.items():
            db.execute(f"UPDATE {store.TABLE} SET current_label = ?, original_label = ? WHERE id = ?", [lab, lab, i])
    members, lexical = small_members(labels.texts)
    cfg = loop.RefineConfig(
        folds=3, max_iterations=6, epsilon=0.01, tau0=0.5, tau_step=0.05, tau_max=0.9, max_change_fraction=0.25
    )
    seen = []
    result = loop.refine(
        db,
        members,
        lexical,
        cfg,
        splits=labels.splits,
        classes=DOMAINS,
        snapshot_dir=tmp_path / "snap",
        history_path=tmp_path / "plots" / "h.csv",
        on_iteration=lambda t, row: seen.append(t),
    )
    assert result.converged and len(result.iterations) < cfg.max_iterations
    assert seen == list(range(len(result.iterations)))
    assert result.iterations[-1].history["label_change_rate"] < cfg.epsilon
    current = dict(db.execute(f"SELECT id, current_label FROM {store.TABLE}").fetchall())
    assert all(current[i] == i.rsplit("-", 1)[0] for i in flips)  # every flipped label restored
    changed = db.execute(
        f"SELECT id, updated_iteration FROM {store.TABLE} WHERE updated_iteration IS NOT NULL"
    ).fetchall()
    assert {i for i, _ in changed} == set(flips)
    # one snapshot and one history row per iteration
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == [f"iter_{t}.parquet" for t in seen]
    snap = pq.read_table(tmp_path / "snap" / f"iter_{seen[-1]}.parquet")
    assert snap.schema.names == ["id", "current_label", "confidence"] and snap.num_rows == 36
    lines = (tmp_path / "plots" / "h.csv").read_text().splitlines()
    assert lines[0] == ",".join(loop.history_fields(["lexical", "lstm"]))
    assert len(lines) == 1 + len(seen)
    first = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert int(first["rows_changed"]) == 3 and float(first["tau"]) == 0.5
    assert 0 < float(first["lexical_feature_change_rate"]) <= 1


def test_loop_stops_at_max_iterations(db, tmp_path):
    labels = store.read_labels(db)
    members, lexical = small_members(labels.texts)
    cfg = loop.RefineConfig(folds=3, max_iterations=1, epsilon=0.0)  # a rate is never < 0
    result = loop.refine(
        db,
        members,
        lexical,
        cfg,
        splits=labels.splits,
        classes=DOMAINS,
        snapshot_dir=tmp_path / "snap",
        history_path=tmp_path / "h.csv",
    )
    assert len(result.iterations) == 1 and not result.converged


# ------------------------------------------------------------------ promotion


def test_promote_writes_and_merges_overrides(db, tmp_path):
    store.apply_updates(
        db,
        [store.RowUpdate("law-1", 0.97, "faq"), store.RowUpdate("faq-2", 0.91, "law"), store.RowUpdate("law-3", 0.2)],
        iteration=0,
    )
    path = tmp_path / "labels" / "overrides.parquet"
    write_empty_overrides(path)
    assert pq.read_table(path).num_rows == 0
    counts = loop.promote(tmp_path / "sentences.db", path)
    assert counts == {"new": 2, "kept": 0, "rows": 2}
    table = read_overrides(path)
    assert table.schema == OVERRIDES_SCHEMA
    assert table.to_pylist() == [{"id": "faq-2", "label": "law"}, {"id": "law-1", "label": "faq"}]
    # an older override survives unless a new one replaces it
    pq.write_table(pa.table({"id": ["law-1", "old-9"], "label": ["bill", "calc"]}, schema=OVERRIDES_SCHEMA), path)
    counts = loop.promote(tmp_path / "sentences.db", path)
    assert counts == {"new": 2, "kept": 1, "rows": 3}
    assert dict((r["id"], r["label"]) for r in read_overrides(path).to_pylist()) == {
        "faq-2": "law",
        "law-1": "faq",
        "old-9": "calc",
    }
    # the split stage applies what promote wrote
    docs = pa.table({"id": ["law-1", "x"], "label": ["law", "law"]})
    out, applied, unknown = apply_overrides(docs, read_overrides(path))
    assert out["label"].to_pylist() == ["faq", "law"] and applied == 1 and unknown == 2


def test_promote_cli(tmp_path):
    (tmp_path / "data" / "refined").mkdir(parents=True)
    path = store.create_store(tmp_path / "data" / "refined" / "sentences.db", toy_rows(4))
    db = sqlite_utils.Database(path)
    store.apply_updates(db, [store.RowUpdate("law-0", 0.99, "faq")], iteration=0)
    db.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "stages.refine_labels", "promote"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    assert pq.read_table(tmp_path / "data" / "labels" / "overrides.parquet").to_pylist() == [
        {"id": "law-0", "label": "faq"}
    ]


def test_two_promotes_at_once_wait_for_the_lock_and_do_not_interleave(tmp_path):
    """Two ``promote`` commands while a third party holds the overrides lock: neither touches the file until
    the lock is released; then they run one after the other and both succeed with the same overrides."""
    from filelock import FileLock

    (tmp_path / "data" / "refined").mkdir(parents=True)
    path = store.create_store(tmp_path / "data" / "refined" / "sentences.db", toy_rows(4))
    db = sqlite_utils.Database(path)
    store.apply_updates(db, [store.RowUpdate("law-0", 0.99, "faq"), store.RowUpdate("law-1", 0.98, "faq")], iteration=0)
    db.close()
    overrides = tmp_path / "data" / "labels" / "overrides.parquet"
    write_empty_overrides(overrides)
    before = overrides.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lock = FileLock(loop.promote_lock_path(overrides))
    lock.acquire()
    try:
        logs = [tmp_path / f"promote_{i}.log" for i in range(2)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "stages.refine_labels", "promote"],
                cwd=tmp_path,
                env=env,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
            )
            for log in logs
        ]
        deadline = time.monotonic() + 120
        while not all("another promote holds" in log.read_text() for log in logs):  # both reached the lock
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                log.read_text()[-2000:] for log in logs
            ]
            time.sleep(0.2)
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs), "a promote did not wait for the lock"
        assert overrides.read_bytes() == before
    finally:
        lock.release()
    for p in procs:
        p.wait(timeout=120)
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("wrote 2 overrides" in out for out in outputs), outputs
    assert pq.read_table(overrides).to_pylist() == [{"id": "law-0", "label": "faq"}, {"id": "law-1", "label": "faq"}]


def test_a_promote_that_cannot_get_the_lock_gives_up_with_a_clear_error(tmp_path):
    from filelock import FileLock

    path = store.create_store(tmp_path / "sentences.db", toy_rows(4))
    overrides = tmp_path / "overrides.parquet"
    with FileLock(loop.promote_lock_path(overrides)):
        # filelock's locks are per process and re-entrant within one; a thread-local lock object is not
        import threading

        errors = []
        t = threading.Thread(target=lambda: _promote_catching(path, overrides, errors))
        t.start()
        t.join(timeout=30)
    assert errors and isinstance(errors[0], TimeoutError) and "another promote has held" in str(errors[0])
    assert not overrides.exists()


def _promote_catching(db_path, overrides, errors):
    try:
        loop.promote(db_path, overrides, lock_timeout_s=0.5)
    except Exception as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


def test_repository_starts_with_an_empty_overrides_file():
    table = pq.read_table(ROOT / "data" / "labels" / "overrides.parquet")
    assert table.schema == OVERRIDES_SCHEMA and table.num_rows == 0


# ------------------------------------------------------------------ the stage, end to end


@pytest.mark.slow
def test_stage_end_to_end(tmp_path, monkeypatch):
    """``main()`` in a repository laid out as the pipeline's (domainlm.common.paths, params.yaml)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the stage's relative paths, and MLflow artifacts under ./mlruns
    texts = {d: korean_docs(d, 14) for d in DOMAINS}
    texts["law"][:2], texts["faq"][:2] = texts["faq"][:2], texts["law"][:2]  # two mislabelled docs each way
    write_split_fixture(tmp_path / "data" / "split", texts)
    write_label_table_fixture(tmp_path / "data" / "split", tmp_path / "data" / "labels" / "split_labels.parquet")
    build_base(tmp_path / "models" / "merged")
    params = {
        "chunksize": 8,
        "folds": 3,
        "seed": 0,
        "max_iterations": 3,
        "epsilon": 0.01,
        "tau0": 0.5,
        "tau_step": 0.05,
        "tau_max": 0.95,
        "max_change_fraction": 0.2,
        "review_size": 5,
        "top_k_features": 5,
        "max_chars": 400,
        "lexical": {
            "word_ngrams": [1, 2],
            "jamo_ngrams": [2, 3],
            "min_df": 1,
            "jamo_weight": 0.1,
            "alpha": 0.01,
            "doc_tokens": 30,
        },
        "lstm": {
            "max_tokens": 32,
            "min_token_count": 1,
            "embed_dim": 8,
            "hidden": 8,
            "epochs": 2,
            "batch_size": 16,
            "lr": 0.02,
        },
        "transformer": {"max_tokens": 32, "batch_size": 8, "C": 1.0, "max_iter": 100},
        "threads": 1,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"domains": DOMAINS, "refine": params}), encoding="utf-8")
    rl.main([])
    metrics = json.loads((tmp_path / "metrics" / "refine.json").read_text())
    assert metrics["stage"]["wall_s"] > 0 and metrics["stage"]["peak_rss_mb"] > 0
    assert (tmp_path / "logs" / "pipeline_run.log").read_text().startswith("refine_labels\t")
    assert metrics["rows"] == 42 and metrics["classes"] == 3
    assert 0 <= metrics["label_change_rate"] <= 1
    db = sqlite_utils.Database(tmp_path / "data" / "refined" / "sentences.db")
    moved = dict(
        db.execute(
            f"SELECT id, current_label FROM {store.TABLE} WHERE id IN "
            "('law-train-0','law-train-1','faq-train-0','faq-train-1')"
        ).fetchall()
    )
    assert moved == {"law-train-0": "faq", "law-train-1": "faq", "faq-train-0": "law", "faq-train-1": "law"}
    assert db.execute(f"SELECT count(*) FROM {store.TABLE} WHERE confidence IS NULL").fetchone()[0] == 0
    db.close()
    queue = [json.loads(x) for x in (tmp_path / "data" / "refined" / "review_queue.jsonl").read_text().splitlines()]
    assert len(queue) == 5
    assert [q["confidence"] for q in queue] == sorted(q["confidence"] for q in queue)
    assert len(queue[0]["suggestions"]) == 3 and queue[0]["text"]
    snaps = sorted((tmp_path / "data" / "refined" / "snapshots").iterdir())
    assert len(snaps) == metrics["iterations"]
    history = (tmp_path / "plots" / "refine_history.csv").read_text().splitlines()
    assert len(history) == 1 + metrics["iterations"]
    assert "val_accuracy_transformer" in history[0] and "val_accuracy_bilstm" in history[0]

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["domain-lm"], output_format="list")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == metrics["iterations"]
    assert all(c.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for c in children)
    assert "rows_changed" in children[0].data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent[0].info.run_id, "refine")}
    assert {"refine/review_queue.jsonl", f"refine/iter_{metrics['iterations'] - 1}.parquet"} <= artifacts


# ------------------------------------------------------------------ the cross-fitted stacker


def _complementary_members(n_per_class: int = 60, seed: int = 0):
    """Two members with complementary skills on 3 classes: ``a`` knows classes 0 and 1 but calls every class-2 row
    a confident 0; ``b`` only knows class 2 (softly) and cannot tell 0 from 1. Returns (y, probas)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    a, b = np.zeros((len(y), 3)), np.zeros((len(y), 3))
    for i, c in enumerate(y):
        jitter = rng.uniform(-0.03, 0.03)
        a[i] = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05]][c]
        b[i] = [0.45 + jitter, 0.45 - jitter, 0.1] if c < 2 else [0.2 + jitter, 0.2 - jitter, 0.6]
    return y, {"a": a, "b": b}


def test_stacker_learns_per_class_trust_that_the_vote_cannot():
    y, probas = _complementary_members()
    folds = ens.assign_folds(y, 3, seed=0)
    stacked = ens.stack(probas, y, folds, 3, C=1.0)
    assert stacked.shape == (len(y), 3) and np.allclose(stacked.sum(axis=1), 1.0)
    vote = ens.soft_vote(probas, {"a": 0.5, "b": 0.5})  # a's confident 0 outvotes b's 2 on every class-2 row
    assert (vote.argmax(1) == y).mean() == pytest.approx(2 / 3)
    assert (stacked.argmax(1) == y).mean() > 0.95


def test_stacker_is_cross_fitted_so_no_row_sees_its_own_label():
    y, probas = _complementary_members()
    folds = ens.assign_folds(y, 3, seed=0)
    before = ens.stack(probas, y, folds, 3)
    row = 7
    flipped = y.copy()
    flipped[row] = 2  # a wrong label on one row changes every other fold's stacker, never the row's own
    after = ens.stack(probas, flipped, folds, 3)
    assert np.array_equal(after[row], before[row])
    same_fold = folds == folds[row]
    assert np.array_equal(after[same_fold], before[same_fold])  # the row's whole fold used the same stacker
    others = ~same_fold
    assert not np.allclose(after[others], before[others])
    with pytest.raises(ValueError, match="wrong shape"):
        ens.stack({"a": probas["a"][:, :2]}, y, folds, 3)


def test_cross_fit_ensemble_combines_by_vote_or_by_stacker():
    texts = [f"{w} 문서 {i}" for i in range(24) for w in ("헌법", "셀")][:24]
    y = np.array([0, 1] * 12)
    members, _ = small_members(texts)
    stacked = ens.cross_fit_ensemble(members, y, 2, folds=3, seed=0, combiner="stack")
    voted = ens.cross_fit_ensemble(members, y, 2, folds=3, seed=0)
    assert stacked.combiner == "stack" and voted.combiner == "soft_vote"
    assert np.allclose(stacked.proba.sum(axis=1), 1.0) and not np.allclose(stacked.proba, voted.proba)
    assert stacked.weights == voted.weights  # reported either way
    with pytest.raises(ValueError, match="combiner"):
        ens.cross_fit_ensemble(members, y, 2, folds=3, seed=0, combiner="median")
