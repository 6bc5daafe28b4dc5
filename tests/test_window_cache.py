"""The classifier's streamed data path (domainlm.classify.window_cache): memory-mapped token-window caches built
from the split files give the same windows, labels, training run and probabilities as encoding the texts in
memory; a cache is reused, keyed by its inputs, never half-written; an epoch can be bounded; and building the cache
of a 200k-document split stays within a stated RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from classifier_fixtures import CLASSES, DOMAINS, build_tiny_lm, classifier_params, write_labelled_splits
from tiny_lm import one_torch_thread  # noqa: F401  (autouse: tiny models run faster on one thread)

from domainlm.classify import data, gate, training, window_cache
from domainlm.classify import model as cls_model

MAX_LENGTH = 12  # short windows, so that most fixture documents have several


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("window_cache")
    split_dir, labels_path = write_labelled_splits(root, overrides={"calc-train-0": "writer"})
    lm_dir = build_tiny_lm(root / "lm")
    from transformers import AutoTokenizer

    return {
        "root": root,
        "split_dir": split_dir,
        "labels_path": labels_path,
        "lm_dir": lm_dir,
        "tok": AutoTokenizer.from_pretrained(lm_dir, local_files_only=True),
        "splits": data.read_splits(split_dir, labels_path, DOMAINS),
    }


def caches(corpus, cache_root, params):
    return training.split_caches(corpus["tok"], corpus["lm_dir"], corpus["split_dir"], DOMAINS, params, cache_root)


def test_cache_holds_the_in_memory_windows_and_lengths(corpus, tmp_path):
    params = classifier_params(max_length=MAX_LENGTH, windows={"train": 2, "predict": 3})
    built = caches(corpus, tmp_path, params)
    for split, n_windows in (("train", 2), ("val", 3), ("test", 3)):
        cache, labelled = built[split], corpus["splits"][split]
        texts = data.read_split(
            corpus["split_dir"], corpus["labels_path"], DOMAINS, split, label_column="label"
        ).texts  # every document has a label in the fixture, so these are all the split's texts, in file order
        expected, lengths = cls_model.encode_windows(corpus["tok"], texts, MAX_LENGTH, n_windows, return_lengths=True)
        assert len(cache) == len(expected)
        assert [cache.doc_windows(d) for d in range(len(cache))] == expected
        assert cache.n_tokens.tolist() == lengths
        assert max(cache.n_windows) > 1  # the windowing is exercised
        assert [cache.window_length(d, 0) for d in range(len(cache))] == [len(w[0]) for w in expected]
        assert cache.ids == [
            i for d in DOMAINS for i in pq.read_table(corpus["split_dir"] / d / f"{split}.parquet")["id"].to_pylist()
        ]
        assert [cache.ids[r] for r in labelled.rows] == labelled.ids


def test_read_split_without_texts_keeps_ids_labels_and_rows(corpus):
    with_texts = corpus["splits"]["train"]
    without = data.read_split(corpus["split_dir"], corpus["labels_path"], DOMAINS, "train", with_texts=False)
    assert without.texts == [] and len(with_texts.texts) == len(with_texts)
    assert (without.ids, without.labels, without.rows) == (with_texts.ids, with_texts.labels, with_texts.rows)
    assert dict(zip(without.ids, without.labels))["calc-train-0"] == "writer"  # the override


def test_cache_is_reused_and_keyed_by_its_inputs(corpus, tmp_path):
    params = classifier_params(max_length=MAX_LENGTH)
    first = caches(corpus, tmp_path, params)
    stamp = {s: (c.folder, (c.folder / window_cache.WINDOWS_FILE).stat().st_mtime_ns) for s, c in first.items()}
    again = caches(corpus, tmp_path, params)
    assert {s: (c.folder, (c.folder / window_cache.WINDOWS_FILE).stat().st_mtime_ns) for s, c in again.items()} == stamp
    longer = caches(corpus, tmp_path, classifier_params(max_length=MAX_LENGTH + 4))
    assert all(longer[s].folder != first[s].folder for s in first)
    assert json.loads((longer["train"].folder / window_cache.MANIFEST_FILE).read_text())["max_length"] == MAX_LENGTH + 4
    # the pruning keeps the most recently used caches only
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 6
    window_cache.prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(c.folder.name for c in longer.values())


def test_a_failed_build_leaves_nothing_that_looks_finished(corpus, tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"id": ["x"], "text": [None]}, schema=pa.schema([("id", pa.string()), ("text", pa.string())])), bad
    )
    good = corpus["split_dir"] / "law" / "train.parquet"
    out = tmp_path / "caches" / "train-key"
    with pytest.raises((TypeError, ValueError)):
        window_cache.build_window_cache(corpus["tok"], [("law", good), ("law", bad)], out, max_length=8, max_windows=2)
    assert not out.exists()
    assert list((tmp_path / "caches").iterdir()) == []  # the temporary folder went too
    with pytest.raises(FileNotFoundError, match="has no windows.arrow"):
        out.mkdir()
        window_cache.WindowCache(out)


def test_sampled_dataset_reads_the_same_items_from_cache_and_memory(corpus, tmp_path):
    params = classifier_params(max_length=MAX_LENGTH)
    cache = caches(corpus, tmp_path, params)["train"]
    train = corpus["splits"]["train"]
    y = [CLASSES.index(lab) for lab in train.labels]
    in_memory = training.WindowSampledDataset(
        cls_model.encode_windows(corpus["tok"], train.texts, MAX_LENGTH, 2), y, seed=3
    )
    streamed = training.WindowSampledDataset(cache, y, seed=3, docs=train.rows)
    for epoch in (0, 1, 2):
        in_memory.epoch = streamed.epoch = epoch
        assert [streamed[i] for i in range(len(streamed))] == [in_memory[i] for i in range(len(in_memory))]
    streamed.epoch = 0
    assert streamed.lengths() == [len(streamed[i]["input_ids"]) for i in range(len(streamed))]


def test_a_bounded_epoch_reads_each_document_once_before_any_twice(corpus, tmp_path):
    cache = caches(corpus, tmp_path, classifier_params(max_length=MAX_LENGTH))["train"]
    train = corpus["splits"]["train"]
    n, k = len(train), 10
    ds = training.WindowSampledDataset(cache, [0] * n, seed=1, docs=train.rows, docs_per_epoch=k)
    assert len(ds) == k
    read = []
    for epoch in range(n // k):
        ds.epoch = epoch
        read += [ds.position(i) for i in range(k)]
    assert len(set(read)) == len(read) == (n // k) * k  # disjoint epochs until the documents run out
    ds.epoch = n // k + 1
    assert len({ds.position(i) for i in range(k)}) == k
    settings = {"max_steps_per_epoch": 3, "batch_size": 4, "gradient_accumulation_steps": 2}
    assert training.docs_per_epoch(settings, world_size=2) == 48
    assert training.docs_per_epoch({"batch_size": 4}) is None
    with pytest.raises(ValueError, match="max_steps_per_epoch"):
        training.docs_per_epoch({"max_steps_per_epoch": 0, "batch_size": 4})


def test_training_and_prediction_from_caches_match_the_in_memory_path(corpus, tmp_path):
    """The same attempt twice, once from the window caches and once from texts encoded in memory: the same steps,
    losses, validation macro-F1 and test probabilities."""
    cfg = classifier_params()
    settings = {**gate.attempt_settings(cfg["train"], cfg["gate"], 0), "epochs": 2}
    splits = corpus["splits"]
    built = caches(corpus, tmp_path, cfg)
    runs = {}
    for name, windows in (("memory", None), ("cache", built)):
        model, tok, info = training.train_attempt(
            corpus["lm_dir"], splits["train"], splits["val"], CLASSES, cfg, settings, seed=0, windows=windows
        )
        scoring = training.scoring_kwargs(cfg)
        if windows is None:
            proba = cls_model.predict_proba(model, tok, splits["test"].texts, **scoring)
        else:
            proba = cls_model.predict_windows(
                model, tok, built["test"], splits["test"].rows, batch_size=scoring["batch_size"], chunk_docs=7
            )
        runs[name] = (info, proba)
    (mem, p_mem), (cached, p_cache) = runs["memory"], runs["cache"]
    for key in ("steps", "train_loss", "val_macro_f1", "best_epoch", "docs_per_epoch", "docs_seen"):
        assert cached[key] == mem[key], key
    assert cached["docs_per_epoch"] == len(splits["train"])
    np.testing.assert_allclose(p_cache, p_mem, rtol=0, atol=1e-6)  # chunks of 7 documents batch other windows


def test_a_bounded_epoch_trains_the_stated_steps(corpus, tmp_path):
    cfg = classifier_params()
    settings = {**gate.attempt_settings(cfg["train"], cfg["gate"], 0), "epochs": 2, "max_steps_per_epoch": 2}
    splits = corpus["splits"]
    _, _, info = training.train_attempt(
        corpus["lm_dir"],
        splits["train"],
        splits["val"],
        CLASSES,
        cfg,
        settings,
        seed=0,
        windows=caches(corpus, tmp_path, cfg),
    )
    assert info["steps"] == 4 and info["docs_per_epoch"] == 2 * cfg["train"]["batch_size"]
    assert info["docs_seen"] == 4 * cfg["train"]["batch_size"]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, random, sys, time
    from pathlib import Path
    def hwm_mb():  # this process's peak RSS (ru_maxrss would carry the parent's across fork and exec)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    import pyarrow as pa, pyarrow.parquet as pq
    from transformers import AutoTokenizer
    from domainlm.classify import window_cache
    split_file, lm_dir, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tok = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    words = ["헌법", "국민", "권리", "의무", "설치", "패키지", "데비안", "선택합니다", "문서", "서식", "셀", "표"]
    rng = random.Random(0)
    with pq.ParquetWriter(split_file, pa.schema([("id", pa.string()), ("text", pa.string())])) as w:
        for start in range(0, n, 10000):
            ids = [f"doc-{i}" for i in range(start, min(n, start + 10000))]
            texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in ids]
            w.write_table(pa.table({"id": ids, "text": texts}))
    base = hwm_mb()
    t0 = time.perf_counter()
    cache = window_cache.build_window_cache(tok, [("d", split_file)], out, max_length=128, max_windows=4)
    print(json.dumps({"docs": len(cache), "windows": int(cache.n_windows.sum()), "s": time.perf_counter() - t0,
                      "rss_before_mb": base, "peak_rss_mb": hwm_mb()}))
    """
)


@pytest.mark.slow
def test_building_a_200k_document_cache_stays_within_its_memory(corpus, tmp_path):
    """The cache of a 200k-document split (about 80 tokens a document, 128-token windows, <= 4 per document) is
    built in batches: the process's peak RSS stays under 768 MB (about 400 MB of it is Python, torch and
    transformers), whereas the in-memory path keeps every window's ids as Python ints (~36 bytes each: ~600 MB of
    windows alone at this size, growing with the split)."""
    script = tmp_path / "build.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "docs.parquet"),
            str(corpus["lm_dir"]),
            str(tmp_path / "c"),
            "200000",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "true"},
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["docs"] == 200_000
    assert figures["windows"] >= 200_000
    assert figures["peak_rss_mb"] < 768, figures
    cache = window_cache.WindowCache(tmp_path / "c")
    assert cache.window(199_999, 0)[-1] == corpus["tok"].eos_token_id


def test_texts_at_reads_the_asked_rows_in_their_order(corpus):
    train = corpus["splits"]["train"]
    rows = train.rows[::-3] + train.rows[:2]
    expected = dict(zip(train.rows, train.texts))
    assert data.texts_at(corpus["split_dir"], DOMAINS, "train", rows, batch_docs=5) == [expected[r] for r in rows]
    with pytest.raises(IndexError, match="past"):
        data.texts_at(corpus["split_dir"], DOMAINS, "train", [10_000])


def test_the_baseline_is_fitted_on_a_stratified_sample_of_a_large_split():
    from domainlm.classify.baseline import fit_sample

    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 99 + ["d"]
    assert fit_sample(labels, None).tolist() == list(range(1000))
    assert fit_sample(labels, 5000).tolist() == list(range(1000))
    idx = fit_sample(labels, 100, seed=0)
    assert len(idx) == 100 and (np.diff(idx) > 0).all()
    picked = [labels[i] for i in idx]
    assert (picked.count("a"), picked.count("b"), picked.count("d")) == (59, 30, 1)  # the label shares, d kept whole
    assert fit_sample(labels, 100, seed=0).tolist() == idx.tolist()
    with pytest.raises(ValueError, match="below the 4 labels"):
        fit_sample(labels, 3)
