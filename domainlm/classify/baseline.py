"""The classifier's baseline: character n-gram TF-IDF (sublinear tf) and a multinomial logistic regression,
both scikit-learn (``TfidfVectorizer(analyzer="char_wb")`` + ``LogisticRegression``).

Character n-grams need no Korean tokenizer and see inside eojeol (the particles and endings glued to a word);
it is the strongest single member of the refinement benchmark (``benchmarks/label_noise.py``). The stage scores
it exactly as the LoRA classifier (:func:`domainlm.classify.metrics.score`), so the LoRA model's value shows as
a ratio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def fit_baseline(texts: Sequence[str], labels: Sequence[str], params: Mapping[str, Any], *, seed: int = 0):
    """Fit the TF-IDF + logistic-regression pipeline on ``texts`` (str) and ``labels`` (str).

    Args:
        params: the ``classifier.baseline`` params: ``ngram_range`` ([min, max] characters), ``min_df``,
            ``max_features`` (null = all), ``C`` (inverse L2 strength), ``max_iter`` (lbfgs), ``max_chars``
            (documents are cut to this many characters; null = whole).
        seed: the logistic regression's ``random_state``.

    Returns:
        A fitted ``sklearn.pipeline.Pipeline``; ``pipeline.classes_`` are the sorted labels.

    Raises:
        ValueError: (from scikit-learn) fewer than two distinct labels, or no n-gram left after ``min_df``.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    lo, hi = (int(n) for n in params.get("ngram_range", (1, 3)))
    pipeline = make_pipeline(
        TfidfVectorizer(
            analyzer="char_wb",
            ngram_range=(lo, hi),
            min_df=int(params.get("min_df", 2)),
            max_features=params.get("max_features"),
            sublinear_tf=True,
            dtype=np.float32,
        ),
        LogisticRegression(
            C=float(params.get("C", 10.0)), max_iter=int(params.get("max_iter", 1000)), random_state=seed
        ),
    )
    pipeline.fit(_cut(texts, params.get("max_chars")), list(labels))
    return pipeline


def fit_sample(labels: Sequence[str], max_docs: int | None, *, seed: int = 0) -> np.ndarray:
    """Which train documents the baseline is fitted on: all of them (``max_docs`` None or ≥ their number), else a
    stratified random sample of ``max_docs`` (scikit-learn ``train_test_split(stratify=labels)``; a label with one
    document is kept whole). A TF-IDF matrix grows with the documents fitted, so a split of millions is sampled.

    Returns:
        int64 array of indices into ``labels``, sorted.

    Raises:
        ValueError: ``max_docs`` below the number of distinct labels.
    """
    n = len(labels)
    if max_docs is None or int(max_docs) >= n:
        return np.arange(n, dtype=np.int64)
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels, dtype=object)
    values, counts = np.unique(labels, return_counts=True)
    if int(max_docs) < len(values):
        raise ValueError(f"classifier.baseline.max_train_docs {max_docs} is below the {len(values)} labels")
    single = np.isin(labels, values[counts == 1])  # stratification needs two documents of a label
    idx = np.flatnonzero(~single)
    picked, _ = train_test_split(
        idx, train_size=int(max_docs) - int(single.sum()), stratify=labels[idx], random_state=seed
    )
    return np.sort(np.concatenate([np.asarray(picked, dtype=np.int64), np.flatnonzero(single)]))


def baseline_proba(
    pipeline, texts: Sequence[str], classes: Sequence[str], *, max_chars: int | None = None
) -> np.ndarray:
    """Probabilities of ``texts`` in the column order of ``classes`` (float64 ``[n, len(classes)]``); a class the
    pipeline never saw gets probability 0."""
    proba = pipeline.predict_proba(_cut(texts, max_chars))
    out = np.zeros((len(texts), len(classes)))
    col = {c: j for j, c in enumerate(classes)}
    for k, c in enumerate(pipeline.classes_):
        if c in col:
            out[:, col[c]] = proba[:, k]
    return out


def _cut(texts: Sequence[str], max_chars: int | None) -> list[str]:
    return [t[:max_chars] for t in texts] if max_chars else list(texts)
