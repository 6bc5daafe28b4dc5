"""The members of the label-refinement ensemble and their params: lexicon (naive Bayes) + char TF-IDF
(logistic regression) + LSTM + BiLSTM + frozen-LM head (logistic regression on mean-pooled hidden states).

Members mirror the lexicon/LSTM/BiLSTM/BERT ensembles of Korean text classification; the naive Bayes member
normalises document lengths as Rennie et al. (ICML 2003) do. Their features come from
:mod:`domainlm.refine.features`; :mod:`domainlm.refine.ensemble` cross-fits and combines them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from domainlm.common.compute import autocast
from domainlm.refine.features import char_tfidf, embed_mean_pooled, lexical_counts, run_in_batches, token_matrix

# ------------------------------------------------------------------ members


class Member(Protocol):
    """One ensemble member. Its features are fixed at construction (texts never change during
    refinement); only the labels do, so ``fit`` takes the label vector each time."""

    name: str

    def fit(self, train_idx: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> Any:
        """Fit on rows ``train_idx`` (int64, shape ``(m,)``) with labels ``y[train_idx]``
        (class indices in ``[0, n_classes)``); return the fitted model."""

    def predict_proba(self, model: Any, idx: np.ndarray, n_classes: int) -> np.ndarray:
        """Class probabilities of rows ``idx``: float64, shape ``(len(idx), n_classes)``, rows sum to 1."""


def full_proba(proba: np.ndarray, seen: np.ndarray, n_classes: int) -> np.ndarray:
    """Spread a model's ``proba`` (float ``(n, len(seen))``, columns in the order of ``seen``, the int class indices
    its training fold held, e.g. scikit-learn's ``classes_``) into float64 ``(n, n_classes)``: a class absent from
    the training fold gets probability 0."""
    out = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    out[:, seen] = proba
    return out


class LexicalNB:
    """Lexical member: multinomial naive Bayes on word + jamo n-gram counts (scikit-learn).

    Naive Bayes multiplies one likelihood per token, so on long documents its posteriors are
    all 0 or 1 and long documents dominate the class-conditional counts. Each document's counts
    are rescaled to ``doc_tokens`` tokens before fitting and scoring (the document length
    normalisation of Rennie et al., ICML 2003); on this corpus 20 tokens with Lidstone
    ``alpha = 0.03`` gave the best out-of-fold accuracy under 20% label noise (0.82 against
    truth, vs 0.80 for 30 tokens and alpha 0.01). A document without features scores the prior.
    """

    name = "lexical"

    def __init__(
        self, counts: sp.csr_matrix, feature_names: np.ndarray, *, alpha: float = 0.03, doc_tokens: float = 20.0
    ):
        """Args: ``counts`` from :func:`lexical_counts` (rows = documents), its ``feature_names``,
        the Lidstone smoothing ``alpha`` and the normalised document length ``doc_tokens``."""
        if counts.shape[1] != len(feature_names):
            raise ValueError(f"{counts.shape[1]} feature columns but {len(feature_names)} feature names")
        totals = np.asarray(counts.sum(axis=1)).ravel()
        scale = np.divide(doc_tokens, totals, out=np.zeros_like(totals), where=totals > 0)
        self.x = sp.diags(scale) @ counts
        self.x = self.x.tocsr()
        self.feature_names = feature_names
        self.alpha = alpha

    def fit(self, train_idx, y, n_classes, seed):
        return MultinomialNB(alpha=self.alpha).fit(self.x[train_idx], y[train_idx])

    def predict_proba(self, model, idx, n_classes):
        return full_proba(model.predict_proba(self.x[idx]), model.classes_, n_classes)

    def top_features(self, y: np.ndarray, n_classes: int, k: int) -> dict[int, frozenset[str]]:
        """The ``k`` most class-indicative features of each class, naive Bayes fitted on all rows.

        Score of feature f for class c: ``log P(f | c) - log P(f | not c)`` with both estimated
        from the smoothed class-conditional counts (the log-likelihood ratio naive Bayes adds per
        occurrence). Classes without rows are left out.

        Returns:
            class index -> frozenset of ``k`` feature names.
        """
        nb = MultinomialNB(alpha=self.alpha).fit(self.x, y)
        counts = nb.feature_count_ + self.alpha
        total = counts.sum(axis=0)
        out: dict[int, frozenset[str]] = {}
        for row, c in enumerate(nb.classes_):
            rest = total - counts[row]
            score = np.log(counts[row] / counts[row].sum()) - np.log(rest / rest.sum())
            top = np.argpartition(-score, min(k, len(score)) - 1)[:k]
            out[int(c)] = frozenset(self.feature_names[top])
        return out


class CharTfidfLR:
    """Character TF-IDF member: multinomial logistic regression (scikit-learn, L2, lbfgs) on
    :func:`char_tfidf` features.

    The strongest single member on the bundled corpus: with 10/20/30% injected label noise its out-of-fold
    accuracy against the truth is 0.818/0.816/0.798 (naive Bayes 0.811/0.804/0.793, the LSTMs and the frozen-LM
    head 0.56-0.71; ``benchmarks/results/label_noise.csv``). ``C`` = 3 measured best at 20% noise (C=1 0.78,
    10 0.81, 30 0.80): a weaker penalty fits the noisy labels.
    """

    name = "tfidf"

    def __init__(self, x: sp.csr_matrix, *, C: float = 3.0, max_iter: int = 1000, tol: float = 1e-3):
        """Args: ``x`` from :func:`char_tfidf` (rows = documents), the inverse L2 strength ``C``, lbfgs
        ``max_iter`` and stopping tolerance ``tol`` (1e-3 halves the fit time of scikit-learn's 1e-4 default at
        the same out-of-fold accuracy on this corpus)."""
        self.x = sp.csr_matrix(x)
        self.C, self.max_iter, self.tol = C, max_iter, tol

    def fit(self, train_idx, y, n_classes, seed):
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=seed)
        return clf.fit(self.x[train_idx], y[train_idx])

    def predict_proba(self, model, idx, n_classes):
        return full_proba(model.predict_proba(self.x[idx]), model.classes_, n_classes)


class RecurrentClassifier(torch.nn.Module):
    """Embedding → (Bi)LSTM → masked mean pooling over time → linear layer (class logits)."""

    def __init__(self, vocab_size: int, n_classes: int, *, embed_dim: int, hidden: int, bidirectional: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = torch.nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.out = torch.nn.Linear(hidden * (2 if bidirectional else 1), n_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``ids`` int64 ``(B, T)`` right-padded with 0, ``lengths`` int64 ``(B,)`` → logits float32
        ``(B, n_classes)``.

        The LSTM runs over the padded batch (on CPU, ``pack_padded_sequence`` measured 3x slower
        for these sizes); padding positions embed to zeros and are left out of the mean.
        """
        out, _ = self.lstm(self.embed(ids))
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        pooled = (out * mask).sum(1) / lengths[:, None].clamp(min=1)
        return self.out(pooled)


class LSTMMember:
    """LSTM (``bidirectional=False``) or BiLSTM classifier over token ids, trained with Adam
    (PyTorch). A batch that runs out of memory is retried at half the batch size
    (:func:`run_in_batches`); the smaller size is kept for the rest of the run."""

    def __init__(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        vocab_size: int,
        *,
        bidirectional: bool,
        embed_dim: int = 32,
        hidden: int = 32,
        epochs: int = 8,
        batch_size: int = 64,
        lr: float = 1e-2,
        device: str | None = None,
    ):
        self.name = "bilstm" if bidirectional else "lstm"
        self.ids, self.lengths, self.vocab_size = ids, lengths, vocab_size
        self.bidirectional = bidirectional
        self.embed_dim, self.hidden, self.epochs, self.lr = embed_dim, hidden, epochs, lr
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def build_model(self, n_classes: int) -> RecurrentClassifier:
        """A freshly initialised network on this member's device."""
        return RecurrentClassifier(
            self.vocab_size, n_classes, embed_dim=self.embed_dim, hidden=self.hidden, bidirectional=self.bidirectional
        ).to(self.device)

    def _batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(self.lengths[rows].max())
        return (
            torch.from_numpy(self.ids[rows, :width]).to(self.device),
            torch.from_numpy(self.lengths[rows]).to(self.device),
        )

    def fit(self, train_idx, y, n_classes, seed):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = self.build_model(n_classes).train()
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        targets = torch.from_numpy(np.asarray(y, dtype=np.int64))
        for _ in range(self.epochs):
            order = train_idx[rng.permutation(len(train_idx))]

            def step(start: int, stop: int, order=order) -> None:
                opt.zero_grad(set_to_none=True)
                rows = order[start:stop]
                ids, lengths = self._batch(rows)
                loss = torch.nn.functional.cross_entropy(model(ids, lengths), targets[rows].to(self.device))
                loss.backward()
                opt.step()

            self.batch_size = run_in_batches(step, len(order), self.batch_size)
        return model.eval()

    @torch.no_grad()
    def predict_proba(self, model, idx, n_classes):
        out = np.empty((len(idx), n_classes), dtype=np.float64)

        def step(start: int, stop: int) -> None:
            ids, lengths = self._batch(idx[start:stop])
            out[start:stop] = torch.softmax(model(ids, lengths).float(), dim=-1).cpu().numpy()

        self.batch_size = run_in_batches(step, len(idx), self.batch_size)
        return out


class EmbeddingHead:
    """Transformer member: logistic regression (scikit-learn, L2, lbfgs) on standardised
    mean-pooled hidden states of the frozen merged LM (:func:`embed_mean_pooled`, computed once)."""

    name = "transformer"

    def __init__(self, embeddings: np.ndarray, *, C: float = 0.1, max_iter: int = 300):
        self.x = np.asarray(embeddings, dtype=np.float32)
        self.C, self.max_iter = C, max_iter

    def fit(self, train_idx, y, n_classes, seed):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=seed))
        return clf.fit(self.x[train_idx], y[train_idx])

    def predict_proba(self, model, idx, n_classes):
        return full_proba(model.predict_proba(self.x[idx]), model.classes_, n_classes)


# ------------------------------------------------------------------ the members, built from params


class MemberParams:
    """Base of the members' config dataclasses: :meth:`from_params` reads one ``refine.<member>`` section."""

    @classmethod
    def from_params(cls, p: dict[str, Any]):
        """An instance from a params sub-section: each field present in ``p`` is cast to its default's
        type (a list becomes a tuple); missing fields keep their default, other keys are ignored.

        Raises:
            ValueError, TypeError: a value that cannot be cast to its field's type.
        """
        kw = {}
        for f in fields(cls):
            if f.name in p:
                kw[f.name] = tuple(p[f.name]) if isinstance(f.default, tuple) else type(f.default)(p[f.name])
        return cls(**kw)


@dataclass(frozen=True)
class LexicalConfig(MemberParams):
    """The lexical member (``refine.lexical``): :func:`lexical_counts` n-gram ranges (inclusive
    ``(min_n, max_n)``), ``min_df`` (documents), ``jamo_weight``; :class:`LexicalNB` Lidstone
    ``alpha`` and ``doc_tokens`` (tokens per document after length normalisation)."""

    word_ngrams: tuple[int, int] = (1, 2)
    jamo_ngrams: tuple[int, int] = (2, 4)
    min_df: int = 2
    jamo_weight: float = 0.1
    alpha: float = 0.03
    doc_tokens: float = 20.0


@dataclass(frozen=True)
class TfidfConfig(MemberParams):
    """The character TF-IDF member (``refine.tfidf``): :func:`char_tfidf` ``analyzer`` (``char_wb`` or
    ``char``), ``ngrams`` (inclusive ``(min_n, max_n)`` characters), ``min_df`` (documents) and
    ``sublinear_tf``; :class:`CharTfidfLR` inverse L2 strength ``C``, lbfgs ``max_iter`` and ``tol``."""

    analyzer: str = "char_wb"
    ngrams: tuple[int, int] = (1, 3)
    min_df: int = 2
    sublinear_tf: bool = True
    C: float = 3.0
    max_iter: int = 1000
    tol: float = 1e-3


@dataclass(frozen=True)
class LSTMConfig(MemberParams):
    """The LSTM and BiLSTM members (``refine.lstm``, shared by both): tokens per document
    (``max_tokens``), tokenizer ids seen fewer than ``min_token_count`` times map to unknown
    (:func:`token_matrix`), and :class:`LSTMMember`'s network and Adam settings."""

    max_tokens: int = 128
    min_token_count: int = 2
    embed_dim: int = 32
    hidden: int = 32
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-2


@dataclass(frozen=True)
class TransformerConfig(MemberParams):
    """The frozen-LM member (``refine.transformer``): tokens per document and batch size of
    :func:`embed_mean_pooled`, inverse L2 strength ``C`` and lbfgs ``max_iter`` of
    :class:`EmbeddingHead`."""

    max_tokens: int = 256
    batch_size: int = 16
    C: float = 0.1
    max_iter: int = 300


def build_members(
    texts: Sequence[str],
    tokenizer: Any,
    lm: Any,
    *,
    lexical: LexicalConfig = LexicalConfig(),
    tfidf: TfidfConfig = TfidfConfig(),
    lstm: LSTMConfig = LSTMConfig(),
    transformer: TransformerConfig = TransformerConfig(),
    compute=None,
) -> tuple[list[Member], LexicalNB, dict[str, float]]:
    """Compute every member's features once (texts never change during refinement) and build
    the five members: lexical NB, char TF-IDF logistic regression, LSTM, BiLSTM, and the frozen-LM head.

    The transformer member is the frozen LM's head, not a fine-tuned LoRA classifier: a cross-fitted LoRA
    member (one LoRA fine-tune per fold and round) was tried and measured far too slow on the 2-core box and
    reached only 0.67-0.70 accuracy, so it is not adopted.

    Args:
        texts: documents in load order, already cut to ``refine.max_chars``.
        tokenizer, lm: the merged model's tokenizer and causal LM (frozen; :func:`load_lm`).
        lexical, tfidf, lstm, transformer: the members' settings.
        compute: the compute policy (:mod:`domainlm.common.compute`) of the frozen LM's embedding pass (its bf16
            autocast and its threads, for that pass only); None = fp32 on the threads in force.

    Returns:
        ``(members, lexical_member, seconds)``: the members in the order lexical, tfidf, lstm, bilstm,
        transformer; the lexical member again (for the feature change rate); feature-building
        wall times in seconds (``lexical_features_s``, ``tfidf_features_s``, ``tokenize_s``, ``embed_s``).

    Raises:
        ValueError: from :func:`lexical_counts` / :func:`char_tfidf` (no texts, no feature left).
    """
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    counts, names = lexical_counts(
        texts,
        word_ngrams=lexical.word_ngrams,
        jamo_ngrams=lexical.jamo_ngrams,
        min_df=lexical.min_df,
        jamo_weight=lexical.jamo_weight,
    )
    lexical_member = LexicalNB(counts, names, alpha=lexical.alpha, doc_tokens=lexical.doc_tokens)
    secs["lexical_features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tfidf_member = CharTfidfLR(
        char_tfidf(
            texts, analyzer=tfidf.analyzer, ngrams=tfidf.ngrams, min_df=tfidf.min_df, sublinear_tf=tfidf.sublinear_tf
        ),
        C=tfidf.C,
        max_iter=tfidf.max_iter,
        tol=tfidf.tol,
    )
    secs["tfidf_features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    enc = tokenizer(list(texts), truncation=True, max_length=lstm.max_tokens, add_special_tokens=False)["input_ids"]
    ids, lengths, vocab = token_matrix(enc, min_count=lstm.min_token_count, max_len=lstm.max_tokens)
    secs["tokenize_s"] = time.perf_counter() - t0
    lstm_kw = dict(
        embed_dim=lstm.embed_dim, hidden=lstm.hidden, epochs=lstm.epochs, batch_size=lstm.batch_size, lr=lstm.lr
    )

    t0 = time.perf_counter()
    with autocast(compute), compute.applied() if compute is not None else contextlib.nullcontext():
        emb, _ = embed_mean_pooled(
            lm, tokenizer, texts, max_tokens=transformer.max_tokens, batch_size=transformer.batch_size
        )
    secs["embed_s"] = time.perf_counter() - t0
    members: list[Member] = [
        lexical_member,
        tfidf_member,
        LSTMMember(ids, lengths, vocab, bidirectional=False, **lstm_kw),
        LSTMMember(ids, lengths, vocab, bidirectional=True, **lstm_kw),
        EmbeddingHead(emb, C=transformer.C, max_iter=transformer.max_iter),
    ]
    return members, lexical_member, secs


def load_lm(model_dir: str | Path) -> tuple[Any, Any]:
    """Load the merged causal LM (eval mode, gradients off) and its tokenizer from a local folder
    (Hugging Face transformers, ``local_files_only``): the frozen LM of :func:`embed_mean_pooled`.

    Returns:
        ``(tokenizer, model)``.

    Raises:
        FileNotFoundError: when ``model_dir`` has no ``config.json`` (run the merge stage first).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} holds no Hugging Face model (config.json): run the merge stage first")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    for prm in lm.parameters():
        prm.requires_grad_(False)
    return tok, lm
