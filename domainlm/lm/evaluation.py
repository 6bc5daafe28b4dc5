"""Language-model evaluation: strided sliding-window perplexity (the Hugging Face "Perplexity of
fixed-length models" recipe), greedy continuations, and BLEU / chrF (sacrebleu) and ROUGE-L
(rouge-score) with a tokenizer that keeps Hangul; plus what the ``evaluate`` stage measures with
them: the test texts, the experts (base + one task vector), the perplexity probe, continuation
scores, retained gains, the training-loss curves and the base-vs-merged comparison page.

rouge-score's default tokenizer lowercases and then replaces every character outside ``[a-z0-9]``
with a space, so Korean text tokenizes to nothing and scores 0; :class:`UnicodeWordTokenizer`
fixes that for every script.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer as RougeTokenizer
from tqdm import tqdm

from domainlm.common import paths
from domainlm.common.threads import limit_threads
from domainlm.lm.data import read_texts
from domainlm.lm.merging import linear

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
def sliding_window_nll(
    model, input_ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 8, desc: str | None = None
) -> tuple[float, int]:
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
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
        x = torch.stack([input_ids[b:e] for b, e, _ in batch]).to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (batch, length-1)
        length = x.shape[1]
        for row, (_, _, n_targets) in enumerate(batch):
            first = max(length - n_targets, 1)  # token index of the first target in the window
            nll_sum += float(nll[row, first - 1 :].sum())
            n_scored += length - first
    return nll_sum, n_scored


def perplexity(
    model, input_ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 8, desc: str | None = None
) -> dict[str, float]:
    """Token-weighted perplexity ``exp(Σ NLL / N)`` of a token stream (see :func:`sliding_window_nll`).

    Returns ``{"perplexity", "nll_per_token" (nats), "tokens"}``.
    """
    nll_sum, n = sliding_window_nll(model, input_ids, max_length, stride, batch_size, desc)
    return {"perplexity": math.exp(nll_sum / n), "nll_per_token": nll_sum / n, "tokens": n}


def continuation_pairs(
    tokenizer, texts: Iterable[str], n_docs: int, prompt_tokens: int, reference_tokens: int
) -> tuple[list[list[int]], list[list[int]], int]:
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


@torch.inference_mode()
def greedy_continuations(
    model, prompts: Sequence[Sequence[int]], new_tokens: int, batch_size: int = 16, pad_token_id: int | None = None
) -> list[list[int]]:
    """Greedy-decode exactly ``new_tokens`` tokens after each prompt (transformers ``generate``,
    ``do_sample=False``, ``min_new_tokens = max_new_tokens`` so every continuation has the
    reference's length). Prompts of equal length are batched without padding.

    Decoding runs on one intra-op thread: a one-token step of a ~5M-parameter model is too small
    to split, and on the shared 2-core machine 2 threads decoded ~40x slower than 1 (measured).

    Returns:
        One list of ``new_tokens`` generated token ids per prompt, in order.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=model.config.eos_token_id,
    )
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int] | None] = [None] * len(prompts)
    with limit_threads(1, blas=False):
        for length, idx in by_length.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                x = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
                generated = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
                for row, i in enumerate(chunk):
                    out[i] = generated[row, length:].tolist()
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------ the evaluate stage's inputs
def read_test_split(split_dir: str | Path, domain: str, seed: int | None = None) -> list[str]:
    """The ``text`` column of ``<split_dir>/<domain>/test.parquet`` (:func:`domainlm.lm.data.read_texts`),
    in file order, or shuffled with ``random.Random(f"{seed}-{domain}")`` when ``seed`` is given, so
    that token caps take a representative, reproducible sample rather than the file's first rows.

    Raises:
        FileNotFoundError: the file is missing. ValueError: no ``text`` column, a null text, no rows.
    """
    path = paths.split_path(split_dir, domain, "test")
    texts = read_texts(path)
    if not texts:
        raise ValueError(f"test split {path} has no rows")
    if seed is not None:
        random.Random(f"{seed}-{domain}").shuffle(texts)
    return texts


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """Loss curve of one ``logs/train_<domain>.log`` (JSON lines): rows ``{step, loss, eval_loss}``
    merged by step in step order, ``None`` where a step logged only one of them. Lines holding
    neither ``loss`` nor ``eval_loss`` (e.g. the end-of-training summary) are not curve points.

    Raises:
        FileNotFoundError: the log is missing.
        ValueError: a line is not a JSON object, or a loss line has no ``step`` (file:line named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {path} is missing: run train_lora")
    by_step: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        if "loss" not in rec and "eval_loss" not in rec:
            continue
        if "step" not in rec:
            raise ValueError(f"{path}:{lineno}: loss record without 'step'")
        row = by_step.setdefault(int(rec["step"]), {"step": int(rec["step"]), "loss": None, "eval_loss": None})
        for key in ("loss", "eval_loss"):
            if key in rec:
                row[key] = float(rec[key])
    return [by_step[s] for s in sorted(by_step)]


# -------------------------------------------------------------------- experts, probe and the scores
def expert_states(base_state: Mapping, task_vectors: Mapping[str, Mapping]) -> Iterator[tuple[str, dict]]:
    """Yield ``(domain, state dict)`` of each expert: base + its Δ (linear, weight 1, λ = 1), which
    equals peft's ``merge_and_unload`` of that LoRA to float tolerance (tests/test_merge.py)."""
    for domain, tv in task_vectors.items():
        yield domain, linear(base_state, {domain: tv}, {domain: 1.0}, lam=1.0)


def retained_gains(ppl: Mapping[str, Mapping[str, float]], domains: list[str]) -> dict[str, float]:
    """(ppl_base − ppl_merged) / (ppl_base − ppl_expert_d) on each domain d.

    1 = the merge keeps all of the expert's gain over the base, 0 = none, < 0 = worse than the
    base. When the expert is not better than the base (denominator ≤ 0) there is no gain to
    retain and the value is 0.0; :func:`domainlm.lm.gate.check_gate` reports such a domain separately.
    """
    out = {}
    for d in domains:
        gain = ppl["base"][d] - ppl[f"expert_{d}"][d]
        out[d] = (ppl["base"][d] - ppl["merged"][d]) / gain if gain > 0 else 0.0
    return out


@dataclass
class PerplexityProbe:
    """Fixed test token streams and window settings, so every model is measured on the same tokens."""

    streams: dict[str, torch.Tensor]  # domain -> int64 (n,) token stream
    max_length: int
    stride: int
    batch_size: int

    @classmethod
    def from_params(
        cls, cfg: Mapping[str, Any], tokenizer, texts: Mapping[str, list[str]], context: int
    ) -> PerplexityProbe:
        """Streams of at most ``max_tokens_per_domain`` tokens; ``max_length`` defaults to ``context``
        (the model's ``max_position_embeddings``), ``stride`` to half of it."""
        max_length = int(cfg.get("max_length") or context)
        return cls(
            streams={d: token_stream(tokenizer, t, cfg.get("max_tokens_per_domain")) for d, t in texts.items()},
            max_length=max_length,
            stride=int(cfg.get("stride") or max_length // 2),
            batch_size=int(cfg.get("batch_size", 8)),
        )

    def run(self, model, name: str) -> dict[str, float]:
        """``{domain: perplexity}`` of ``model`` on every stream."""
        return {
            d: perplexity(model, ids, self.max_length, self.stride, self.batch_size, desc=f"ppl {name}/{d}")[
                "perplexity"
            ]
            for d, ids in self.streams.items()
        }

    def fingerprint(self) -> dict[str, Any]:
        """What a perplexity depends on besides the model: ``max_length``, ``stride`` and, per domain, the stream's
        token count and the SHA-256 of its int64 token ids. Two probes with equal fingerprints score the same
        tokens the same way (:func:`check_reference`)."""
        return {
            "max_length": self.max_length,
            "stride": self.stride,
            "streams": {
                d: {
                    "tokens": int(ids.numel()),
                    "sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
                }
                for d, ids in sorted(self.streams.items())
            },
        }


def reference_record(probe: PerplexityProbe, ppl: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The ``evaluate_experts`` output: the reference perplexities (``{"base" | "expert_<d>": {domain: ppl}}``)
    with the probe's :meth:`~PerplexityProbe.fingerprint` they were measured under."""
    return {"probe": probe.fingerprint(), "perplexity": {m: dict(per) for m, per in ppl.items()}}


def check_reference(
    reference: Mapping[str, Any], probe: PerplexityProbe, domains: Sequence[str]
) -> dict[str, dict[str, float]]:
    """The reference perplexities of ``reference`` (:func:`reference_record`) after checking they were measured on
    ``probe``'s token streams and windows, with the base and an expert for every domain.

    Returns:
        ``{"base" | "expert_<d>": {domain: perplexity}}``.

    Raises:
        ValueError: the probe settings or streams differ (the reference is stale: re-run ``evaluate_experts``), or
            a domain's base or expert perplexity is missing.
    """
    mine, theirs = probe.fingerprint(), reference.get("probe") or {}
    if mine != theirs:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(
            f"the reference perplexities were measured on other token streams or windows ({differ} "
            "differ): re-run evaluate_experts (dvc repro evaluate_experts)"
        )
    ppl = reference.get("perplexity") or {}
    missing = [m for m in ["base", *(f"expert_{d}" for d in domains)] if set(ppl.get(m) or {}) != set(domains)]
    if missing:
        raise ValueError(f"the reference perplexities lack {missing} on domains {list(domains)}")
    return {m: dict(per) for m, per in ppl.items()}


def continuation_scores(
    tokenizer,
    texts: Mapping[str, list[str]],
    models: Mapping[str, Any],
    cont: Mapping[str, Any],
    bleu_tokenize: str = "char",
) -> dict[str, Any]:
    """Greedy continuations of every model on each domain's first ``n_docs`` long-enough test
    documents, scored against the documents' own next tokens.

    Returns:
        ``{"scores": {metric: {model: {domain: value}}}, "samples": {domain: [row]}, "pairs":
        {domain: n}, "too_short": {domain: n}}``; a sample row holds prompt, reference and one
        continuation per model.

    Raises:
        ValueError: a domain has no document with ``prompt_tokens + new_tokens`` tokens.
    """
    k, m = int(cont.get("prompt_tokens", 32)), int(cont.get("new_tokens", 32))
    out: dict[str, Any] = {
        "scores": {"bleu": {}, "chrf": {}, "rougeL": {}},
        "samples": {},
        "pairs": {},
        "too_short": {},
    }
    for d, doc_texts in texts.items():
        prompts, refs, out["too_short"][d] = continuation_pairs(tokenizer, doc_texts, int(cont.get("n_docs", 8)), k, m)
        out["pairs"][d] = len(prompts)
        if not prompts:
            raise ValueError(
                f"no {d} test document has {k + m} tokens: lower evaluate.continuation prompt_tokens/new_tokens"
            )
        ref_text = [tokenizer.decode(r, skip_special_tokens=True) for r in refs]
        rows = [
            {"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r} for p, r in zip(prompts, ref_text)
        ]
        for name, model in models.items():
            gen = greedy_continuations(model, prompts, m, int(cont.get("batch_size", 16)), tokenizer.pad_token_id)
            hyps = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
            for row, hyp in zip(rows, hyps):
                row[name] = hyp
            for metric, value in text_scores(hyps, ref_text, bleu_tokenize).items():
                out["scores"][metric].setdefault(name, {})[d] = value
        out["samples"][d] = rows[: int(cont.get("show_per_domain", 3))]
    return out


# ----------------------------------------------------------------------------------------- outputs
def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ⏎ ")


def comparison_markdown(samples: Mapping[str, list[dict[str, str]]], settings: Mapping[str, Any]) -> str:
    """Markdown: per domain a table of prompt, reference, base and merged continuation."""
    lines = [
        "# Base vs merged: greedy continuations",
        "",
        f"Prompt = a test document's first {settings['prompt_tokens']} tokens; reference = its next "
        f"{settings['new_tokens']} tokens; both models decode {settings['new_tokens']} tokens greedily.",
        "",
    ]
    for domain, rows in samples.items():
        lines += [f"## {domain}", "", "| prompt | reference | base | merged |", "|---|---|---|---|"]
        lines += [
            f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['base'])} | {_cell(r['merged'])} |"
            for r in rows
        ]
        lines.append("")
    return "\n".join(lines)
