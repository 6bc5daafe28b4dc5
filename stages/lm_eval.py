"""Language-model evaluation: strided sliding-window perplexity (the Hugging Face "Perplexity of
fixed-length models" recipe), greedy continuations, and BLEU / chrF (sacrebleu) and ROUGE-L
(rouge-score) with a tokenizer that keeps Hangul.

rouge-score's default tokenizer lowercases and then replaces every character outside ``[a-z0-9]``
with a space, so Korean text tokenizes to nothing and scores 0; :class:`UnicodeWordTokenizer`
fixes that for every script.
"""
from __future__ import annotations

import contextlib
import math
import re
import unicodedata
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer as RougeTokenizer
from tqdm import tqdm

# Scripts written without spaces between words: scored one character per token (as sacrebleu's
# "zh"/"intl" tokenizers do), Hiragana, Katakana, CJK ideographs.
_CHAR_SCRIPTS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CHAR_SCRIPTS}]|[^\W_{_CHAR_SCRIPTS}]+")


class UnicodeWordTokenizer(RougeTokenizer):
    """ROUGE tokenizer for any script: NFC, case-folded, Unicode word runs (Korean eojeol, i.e.
    space-delimited words without punctuation), CJK ideographs and kana one per token.

    ``tokenize("대한민국의 헌법, 제1조!")`` → ``["대한민국의", "헌법", "제1조"]``.
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFC", text).casefold())


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], tokenizer: RougeTokenizer | None = None) -> float:
    """Mean ROUGE-L F-measure in [0, 1] over hypothesis/reference pairs (rouge-score, Lin 2004).

    ``tokenizer`` defaults to :class:`UnicodeWordTokenizer`.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer or UnicodeWordTokenizer())
    return sum(scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)) / len(references)


def text_scores(hypotheses: Sequence[str], references: Sequence[str], bleu_tokenize: str = "char") -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0–100 scale) and mean ROUGE-L F1 (0–1) of continuations.

    Args:
        bleu_tokenize: sacrebleu BLEU tokenizer. ``"char"`` by default: Korean is agglutinative,
            so eojeol-level BLEU of short continuations is almost always 0, and the Korean
            morphological tokenizer (``ko-mecab``) needs MeCab-ko, which is not installed.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    import sacrebleu

    _check_pairs(hypotheses, references)
    refs = [list(references)]
    return {
        "bleu": sacrebleu.corpus_bleu(list(hypotheses), refs, tokenize=bleu_tokenize).score,
        "chrf": sacrebleu.corpus_chrf(list(hypotheses), refs).score,
        "rougeL": rouge_l(hypotheses, references),
    }


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("no hypothesis/reference pairs to score")


def token_stream(tokenizer, texts: Iterable[str], max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate documents into one token-id stream, each document followed by EOS.

    Documents are tokenized without added special tokens; the EOS separator marks document
    boundaries as in causal-LM pretraining. Tokenizing stops once ``max_tokens`` are collected
    and the stream is cut to exactly ``max_tokens`` (deterministic: documents in given order).

    Returns:
        int64 tensor of shape ``(n_tokens,)``.

    Raises:
        ValueError: the tokenizer has no EOS token, or the stream is shorter than 2 tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: cannot separate documents")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"token stream has {len(ids)} token(s); perplexity needs at least 2")
    return torch.tensor(ids, dtype=torch.long)


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, n_targets)`` of the strided sliding-window perplexity recipe.

    Window i covers tokens ``[i·stride, min(i·stride + max_length, n))``; its last ``n_targets``
    tokens (those no earlier window scored) are targets, the rest serve as context only. With
    stride < max_length every token but the first is scored exactly once; with stride ==
    max_length (disjoint windows) each window's first token has no context and goes unscored.

    Raises:
        ValueError: ``stride`` not in [1, max_length] (a larger stride would leave tokens unscored).
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def sliding_window_nll(model, input_ids: torch.Tensor, max_length: int, stride: int,
                       batch_size: int = 8, desc: str | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of scored tokens of a token stream.

    Follows the Hugging Face perplexity recipe (transformers docs, "Perplexity of fixed-length
    models"): windows of ``max_length`` tokens advance by ``stride``; each token is scored once,
    with up to ``max_length − stride`` tokens of context. Full-length windows are batched.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, length, vocab).
        input_ids: int64 tensor of shape ``(n,)``, n ≥ 2.
        max_length: window length in tokens (the model's context).
        stride: tokens the window advances by, 1 ≤ stride ≤ max_length.
        batch_size: windows per forward pass.

    Returns:
        ``(nll_sum, n_scored)``; ``n_scored == n − 1`` when stride < max_length.
    """
    windows = sliding_windows(int(input_ids.numel()), max_length, stride)
    device = next(model.parameters()).device
    nll_sum = 0.0
    n_scored = 0
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    batches = [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
        x = torch.stack([input_ids[b:e] for b, e, _ in batch]).to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (batch, length-1)
        length = x.shape[1]
        for row, (_, _, n_targets) in enumerate(batch):
            first = max(length - n_targets, 1)  # token index of the first target in the window
            nll_sum += float(nll[row, first - 1:].sum())
            n_scored += length - first
    return nll_sum, n_scored


def perplexity(model, input_ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 8,
               desc: str | None = None) -> dict[str, float]:
    """Token-weighted perplexity ``exp(Σ NLL / N)`` of a token stream (see :func:`sliding_window_nll`).

    Returns ``{"perplexity", "nll_per_token" (nats), "tokens"}``.
    """
    nll_sum, n = sliding_window_nll(model, input_ids, max_length, stride, batch_size, desc)
    return {"perplexity": math.exp(nll_sum / n), "nll_per_token": nll_sum / n, "tokens": n}


def continuation_pairs(tokenizer, texts: Iterable[str], n_docs: int, prompt_tokens: int,
                       reference_tokens: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Prompt/reference token pairs from the first ``n_docs`` documents long enough for both.

    prompt = a document's first ``prompt_tokens`` tokens, reference = the next ``reference_tokens``.

    Returns:
        ``(prompts, references, n_too_short)``: lists of token-id lists, and how many documents
        were passed over for having fewer than ``prompt_tokens + reference_tokens`` tokens.
    """
    prompts: list[list[int]] = []
    references: list[list[int]] = []
    too_short = 0
    need = prompt_tokens + reference_tokens
    for text in texts:
        if len(prompts) >= n_docs:
            break
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < need:
            too_short += 1
            continue
        prompts.append(ids[:prompt_tokens])
        references.append(ids[prompt_tokens:need])
    return prompts, references, too_short


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave as is), then restore."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], new_tokens: int, batch_size: int = 16,
                         pad_token_id: int | None = None) -> list[list[int]]:
    """Greedy-decode exactly ``new_tokens`` tokens after each prompt (transformers ``generate``,
    ``do_sample=False``, ``min_new_tokens = max_new_tokens`` so every continuation has the
    reference's length). Prompts of equal length are batched without padding.

    Decoding runs on one intra-op thread: a one-token step of a ~5M-parameter model is too small
    to split, and on the shared 2-core machine 2 threads decoded ~40x slower than 1 (measured).

    Returns:
        One list of ``new_tokens`` generated token ids per prompt, in order.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=pad_token_id, eos_token_id=model.config.eos_token_id)
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int] | None] = [None] * len(prompts)
    with torch_threads(1):
        for length, idx in by_length.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                x = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
                generated = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
                for row, i in enumerate(chunk):
                    out[i] = generated[row, length:].tolist()
    return out  # type: ignore[return-value]
