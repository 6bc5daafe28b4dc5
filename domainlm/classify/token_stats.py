"""Token statistics of the corpus under the base tokenizer (a look at the data before any training): per domain
and split, documents, tokens, mean/p50/p95/max document length in tokens, and the share of documents longer
than the classifier's input and than the LM's context (so truncation is a measured choice, not a surprise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm


def document_lengths(
    tokenizer, texts: Sequence[str], *, batch_docs: int = 256, desc: str = "token stats"
) -> np.ndarray:
    """Tokens per document (no special tokens), int64 ``[len(texts)]``."""
    lengths: list[int] = []
    for start in tqdm(range(0, len(texts), batch_docs), desc=desc, unit="batch", leave=False):
        enc = tokenizer(list(texts[start : start + batch_docs]), add_special_tokens=False, verbose=False)["input_ids"]
        lengths.extend(len(ids) for ids in enc)
    return np.asarray(lengths, dtype=np.int64)


def length_summary(lengths: np.ndarray, *, max_text_tokens: int, context: int) -> dict[str, Any]:
    """Summary of document lengths (tokens).

    Args:
        lengths: tokens per document.
        max_text_tokens: the most text tokens the classifier keeps (its ``max_length`` less the EOS it appends).
        context: the LM's context length (``max_position_embeddings``).

    Returns:
        ``docs``, ``tokens`` (sum), ``mean_tokens``, ``p50_tokens``, ``p95_tokens``, ``max_tokens`` (0 for no
        document), ``truncated_at_max_length`` and ``truncated_at_context`` (fractions of documents longer than
        each limit; 0 for no document).
    """
    n = int(lengths.size)
    if n == 0:
        return {
            "docs": 0,
            "tokens": 0,
            "mean_tokens": 0.0,
            "p50_tokens": 0.0,
            "p95_tokens": 0.0,
            "max_tokens": 0,
            "truncated_at_max_length": 0.0,
            "truncated_at_context": 0.0,
        }
    return {
        "docs": n,
        "tokens": int(lengths.sum()),
        "mean_tokens": float(lengths.mean()),
        "p50_tokens": float(np.percentile(lengths, 50)),
        "p95_tokens": float(np.percentile(lengths, 95)),
        "max_tokens": int(lengths.max()),
        "truncated_at_max_length": float((lengths > max_text_tokens).mean()),
        "truncated_at_context": float((lengths > context).mean()),
    }


def token_stats(
    tokenizer,
    texts: Mapping[str, Mapping[str, Sequence[str]]],
    *,
    max_length: int,
    context: int,
    appends_eos: bool = True,
) -> dict[str, Any]:
    """Token statistics of texts: :func:`document_lengths` of each ``texts[domain][split]``, then
    :func:`lengths_stats` (see there for the arguments and the result)."""
    lengths = {
        domain: {
            split: document_lengths(tokenizer, docs, desc=f"token stats {domain}/{split}")
            for split, docs in by_split.items()
        }
        for domain, by_split in texts.items()
    }
    return lengths_stats(lengths, max_length=max_length, context=context, appends_eos=appends_eos)


def lengths_stats(
    lengths: Mapping[str, Mapping[str, np.ndarray]],
    *,
    max_length: int,
    context: int,
    appends_eos: bool = True,
) -> dict[str, Any]:
    """Token statistics for every domain and split, and for all domains together.

    Args:
        lengths: ``{domain: {split: tokens per document}}`` (int arrays; e.g. the ``n_tokens`` of
            :class:`domainlm.classify.window_cache.WindowCache`, or :func:`document_lengths`).
        max_length: the classifier's input length in tokens (EOS included when ``appends_eos``).
        context: the LM's context length in tokens.
        appends_eos: whether the classifier appends EOS (:func:`domainlm.classify.model.appends_eos`), which
            leaves ``max_length − 1`` tokens for the text.

    Returns:
        ``{"settings": {"classifier_max_length", "classifier_max_text_tokens", "lm_context"},
        "domains": {domain: {split: summary}}, "all": {split: summary}}`` with :func:`length_summary` summaries.
    """
    max_text = int(max_length) - int(appends_eos)
    per: dict[str, dict[str, Any]] = {}
    pooled: dict[str, list[np.ndarray]] = {}
    for domain, by_split in lengths.items():
        per[domain] = {}
        for split, n_tokens in by_split.items():
            n_tokens = np.asarray(n_tokens, dtype=np.int64)
            per[domain][split] = length_summary(n_tokens, max_text_tokens=max_text, context=context)
            pooled.setdefault(split, []).append(n_tokens)
    return {
        "settings": {
            "classifier_max_length": int(max_length),
            "classifier_max_text_tokens": max_text,
            "lm_context": int(context),
        },
        "domains": per,
        "all": {
            s: length_summary(np.concatenate(parts), max_text_tokens=max_text, context=context)
            for s, parts in pooled.items()
        },
    }
