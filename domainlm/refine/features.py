"""Features of the label-refinement ensemble's members, computed once per run (texts never change during
refinement, only labels do), and the out-of-memory back-off their batched passes share.

Word n-gram and jamo n-gram counts (scikit-learn ``CountVectorizer``; jamo from the Unicode decomposition of
Hangul syllables) for the naive Bayes member, character n-gram TF-IDF (``TfidfVectorizer``) for the logistic
regression member, a compact token-id matrix for the LSTM and BiLSTM members, and mean-pooled last hidden states
of the frozen merged LM (Hugging Face transformers) for its head. :func:`run_in_batches` halves the batch size
when a batch runs out of memory.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from tqdm.auto import tqdm

from domainlm.korean.hangul import decompose

log = logging.getLogger(__name__)

#: Hangul jamo blocks: conjoining (U+1100–U+11FF) and compatibility (U+3130–U+318F).
_JAMO_RUN = re.compile("[\u1100-\u11ff\u3130-\u318f]+")
#: Word tokens: runs of Unicode word characters, single characters kept (Korean has many
#: one-syllable words; scikit-learn's default pattern drops them).
WORD_PATTERN = r"(?u)\b\w+\b"


# ------------------------------------------------------------------ memory: OOM back-off


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator failure: ``torch.OutOfMemoryError`` (CUDA) or a ``RuntimeError``
    whose message says ``out of memory`` / ``can't allocate memory`` (PyTorch's CPU allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def free_memory() -> None:
    """Release what the previous member held: Python garbage, then the CUDA caching allocator's
    unused blocks (``torch.cuda.empty_cache()``) where CUDA exists."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_batches(step: Callable[[int, int], None], n: int, batch_size: int, *, desc: str | None = None) -> int:
    """Call ``step(start, stop)`` over ``range(n)`` in consecutive batches, halving on OOM.

    When a batch runs out of memory (:func:`is_out_of_memory`) the memory is freed, the batch
    size halved and the SAME batch retried from ``start``, so every index is processed exactly
    once by a call that succeeded. ``step`` must not keep partial effects of a failed call (a
    training step zeroes its gradients first).

    Args:
        step: callback on the half-open index range ``[start, stop)``.
        n: number of items.
        batch_size: first batch size, >= 1.
        desc: tqdm label; ``None`` hides the progress bar.

    Returns:
        The batch size in force at the end (callers keep it for their next pass).

    Raises:
        ValueError: when ``batch_size < 1``.
        torch.OutOfMemoryError / RuntimeError: re-raised when even a batch of one does not fit,
            and any non-OOM error unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = 0
    with tqdm(total=n, desc=desc, disable=desc is None, leave=False) as bar:
        while start < n:
            stop = min(start + batch_size, n)
            try:
                step(start, stop)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not is_out_of_memory(exc) or batch_size == 1:
                    raise
                free_memory()
                batch_size //= 2
                log.warning("out of memory on a batch of %d; retrying with batch size %d", stop - start, batch_size)
                continue
            bar.update(stop - start)
            start = stop
    return batch_size


# ------------------------------------------------------------------ features


def lexical_counts(
    texts: Sequence[str],
    *,
    word_ngrams: tuple[int, int] = (1, 2),
    jamo_ngrams: tuple[int, int] = (2, 4),
    min_df: int = 2,
    jamo_weight: float = 0.1,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Word n-gram and jamo n-gram counts of ``texts`` (scikit-learn ``CountVectorizer``).

    Words are :data:`WORD_PATTERN` tokens, lower-cased. Jamo n-grams are character n-grams
    inside each run of Hangul jamo after :func:`domainlm.korean.hangul.decompose` (syllables split into
    conjoining jamo, Unicode 3.12), so they see stems and particles of Korean words; text in
    other scripts gives no jamo n-grams and is covered by the word n-grams. Jamo counts are
    scaled by ``jamo_weight`` (multinomial naive Bayes accepts fractional counts): there are
    several jamo n-grams per syllable, and unscaled they would outvote the words.
    The vocabulary depends on the texts only, never on labels, so it is built once for all folds.

    Returns:
        ``(X, names)``: CSR float64 matrix of shape ``(len(texts), n_features)`` and the
        feature names (``"w:<word n-gram>"`` then ``"j:<jamo n-gram>"``), shape ``(n_features,)``.

    Raises:
        ValueError: when ``texts`` is empty or no word feature survives ``min_df``.
    """
    if len(texts) == 0:
        raise ValueError("lexical_counts needs at least one text")
    min_df = min(min_df, len(texts))
    words = CountVectorizer(token_pattern=WORD_PATTERN, ngram_range=tuple(word_ngrams), min_df=min_df)
    xw = words.fit_transform(texts)
    jamo_text = [" ".join(_JAMO_RUN.findall(decompose(t))) for t in texts]
    jamo = CountVectorizer(analyzer="char_wb", ngram_range=tuple(jamo_ngrams), min_df=min_df, lowercase=False)
    try:
        xj = jamo.fit_transform(jamo_text).astype(np.float64) * jamo_weight
        jnames = [f"j:{f}" for f in jamo.get_feature_names_out()]
    except ValueError:  # no Hangul anywhere (e.g. an all-English corpus): words only
        xj = sp.csr_matrix((len(texts), 0), dtype=np.float64)
        jnames = []
    x = sp.hstack([xw.astype(np.float64), xj], format="csr")
    names = np.array([f"w:{f}" for f in words.get_feature_names_out()] + jnames, dtype=object)
    return x, names


def char_tfidf(
    texts: Sequence[str],
    *,
    analyzer: str = "char_wb",
    ngrams: tuple[int, int] = (1, 3),
    min_df: int = 2,
    sublinear_tf: bool = True,
) -> sp.csr_matrix:
    """Character n-gram TF-IDF of ``texts`` (scikit-learn ``TfidfVectorizer``, l2-normalised rows).

    The same features as the classifier's baseline (:mod:`domainlm.classify.baseline`): character n-grams need
    no Korean tokenizer and see inside eojeol (the particles and endings glued to a word). ``char_wb`` takes
    n-grams inside word boundaries only, ``char`` across them. Like :func:`lexical_counts` the vocabulary and
    the IDF depend on the texts only, never on labels, so the matrix is built once for all folds and rounds.

    Args:
        analyzer: ``"char_wb"`` or ``"char"``; ngrams: inclusive ``(min_n, max_n)`` in characters;
        min_df: documents a n-gram must occur in (capped at ``len(texts)``); sublinear_tf: ``1 + log(tf)``.

    Returns:
        CSR float64 matrix of shape ``(len(texts), n_features)``.

    Raises:
        ValueError: when ``texts`` is empty, ``analyzer`` is not a character analyzer, or no n-gram survives
            ``min_df`` (scikit-learn).
    """
    if len(texts) == 0:
        raise ValueError("char_tfidf needs at least one text")
    if analyzer not in ("char", "char_wb"):
        raise ValueError(f"refine.tfidf.analyzer must be 'char' or 'char_wb', got {analyzer!r}")
    vec = TfidfVectorizer(
        analyzer=analyzer,
        ngram_range=tuple(ngrams),
        min_df=min(min_df, len(texts)),
        sublinear_tf=sublinear_tf,
        dtype=np.float64,
    )
    return vec.fit_transform(list(texts)).tocsr()


def token_matrix(
    token_ids: Sequence[Sequence[int]], *, min_count: int = 2, max_len: int = 128
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pack tokenised documents into a padded matrix over a compact vocabulary.

    The tokenizer's ids (e.g. a 150k-entry BPE vocabulary) are remapped to ``2..V+1`` for ids seen
    at least ``min_count`` times in the corpus; rarer ids share ``1`` (unknown) and ``0`` pads.
    A small vocabulary keeps the LSTM embedding table small.

    Returns:
        ``(ids, lengths, vocab_size)``: int64 ``(n, max_len)``, int64 ``(n,)`` with every length
        >= 1 (an empty document becomes one unknown token), and the embedding-table size.
    """
    truncated = [list(t)[:max_len] for t in token_ids]
    flat = np.fromiter((i for t in truncated for i in t), dtype=np.int64)
    uniq, counts = np.unique(flat, return_counts=True)
    keep = uniq[counts >= min_count]
    lut = {int(tok): j + 2 for j, tok in enumerate(keep)}
    ids = np.zeros((len(truncated), max_len), dtype=np.int64)
    lengths = np.ones(len(truncated), dtype=np.int64)
    for r, toks in enumerate(truncated):
        if toks:
            ids[r, : len(toks)] = [lut.get(int(t), 1) for t in toks]
            lengths[r] = len(toks)
        else:
            ids[r, 0] = 1
    return ids, lengths, len(keep) + 2


@torch.no_grad()
def embed_mean_pooled(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 16,
    desc: str | None = "embed",
) -> tuple[np.ndarray, int]:
    """Mean-pooled last hidden states of a frozen causal LM (Hugging Face transformers).

    Texts are tokenised with truncation to ``max_tokens``, processed longest first (so the
    first batch shows whether memory suffices) and right-padded per batch; padding positions are
    excluded from the mean. ``model`` is any ``*ForCausalLM`` (its ``base_model`` gives the hidden
    states) or a bare decoder. A batch that runs out of memory is retried at half the size.

    Returns:
        ``(embeddings, final_batch_size)``: float32 array ``(len(texts), hidden_size)`` in the order
        of ``texts``, and the batch size in force at the end.
    """
    model.eval()
    body = getattr(model, "base_model", model)
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens, add_special_tokens=False)["input_ids"]
    enc = [e if e else [tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0] for e in enc]
    order = np.argsort([-len(e) for e in enc], kind="stable")
    device = next(model.parameters()).device
    out: np.ndarray | None = None

    def step(start: int, stop: int) -> None:
        nonlocal out
        rows = order[start:stop]
        width = max(len(enc[r]) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(enc[r])] = torch.tensor(enc[r])
            mask[j, : len(enc[r])] = 1
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        m = mask.to(device).unsqueeze(-1).float()
        pooled = ((hidden * m).sum(1) / m.sum(1)).cpu().numpy()
        if out is None:
            out = np.empty((len(enc), pooled.shape[1]), dtype=np.float32)
        out[rows] = pooled

    final = run_in_batches(step, len(enc), batch_size, desc=desc)
    assert out is not None or len(enc) == 0
    return (out if out is not None else np.empty((0, 0), np.float32)), final
