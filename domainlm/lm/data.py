"""Language-model data shared by base_model and train_lora: split parquet → byte-level BPE → packed blocks.

Byte-level BPE (Radford et al. 2019, GPT-2) trained with the HF ``tokenizers`` library; packing
concatenates documents separated by EOS and cuts fixed-length blocks (HF ``run_clm`` ``group_texts``),
except that the last partial block is right-padded and masked instead of dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from domainlm.common.paths import split_path

IGNORE_INDEX = -100  # label value HF causal LMs leave out of the loss


def read_texts(path: str | os.PathLike) -> list[str]:
    """Return the ``text`` column of a split parquet file, in file order.

    Raises:
        FileNotFoundError: when ``path`` does not exist (run the ``split`` stage first).
        ValueError: when the file has no ``text`` column or a text is null.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"split file {path} not found (run `dvc repro split` first)")
    names = pq.read_schema(path).names
    if "text" not in names:
        raise ValueError(f"{path}: no 'text' column (columns: {names})")
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    for i, text in enumerate(texts):
        if text is None:
            raise ValueError(f"{path}: row {i} has a null text")
    return texts


def read_domain_texts(root: str | os.PathLike, domains: Sequence[str], split: str) -> dict[str, list[str]]:
    """``{domain: texts}`` of one split for each domain, in the given domain order (see :func:`read_texts`)."""
    return {d: read_texts(split_path(root, d, split)) for d in domains}


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    model_max_length: int = 1024,
):
    """Train a byte-level BPE tokenizer and wrap it for transformers.

    The normalizer is Unicode NFC, so decomposed Hangul jamo sequences (NFD, e.g. from macOS file
    names) encode to the same tokens as precomposed syllables; the byte-level alphabet covers every
    UTF-8 byte, so any language round-trips (``decode(encode(t)) == NFC(t)``) and ``unk`` never occurs.
    Library: HF ``tokenizers`` (``models.BPE`` + ``pre_tokenizers.ByteLevel`` + ``trainers.BpeTrainer``).

    Args:
        texts: training documents (str).
        vocab_size: final vocabulary size including the 256 byte symbols and the 4 special tokens.
        min_frequency: a pair must occur this often to be merged.
        model_max_length: the context length recorded in the tokenizer config.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad/unk set; ids 0..3 are
        pad, bos, eos, unk.

    Raises:
        ValueError: when ``vocab_size`` cannot hold the byte alphabet plus the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [pad_token, bos_token, eos_token, unk_token]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"tokenizer vocab_size={vocab_size} is below the byte alphabet "
            f"({len(alphabet)}) plus {len(specials)} special tokens"
        )
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        model_max_length=model_max_length,
    )


def pack_blocks(
    tokenizer, texts: Sequence[str], block_size: int, *, batch_docs: int = 256, desc: str = "tokenize"
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` and pack them into fixed-length causal-LM blocks.

    Each document's ids are followed by ``eos``; the stream is cut every ``block_size`` tokens
    (documents may straddle blocks, as in HF ``run_clm``). The last partial block is kept,
    right-padded with ``pad`` and masked, so no text is dropped.

    Args:
        tokenizer: a transformers tokenizer with ``eos_token_id`` and ``pad_token_id``.
        texts: documents (str).
        block_size: tokens per block (the model's context length).

    Returns:
        dict with ``input_ids`` (int64 [n_blocks, block_size]), ``attention_mask`` (int64, 0 on
        padding) and ``labels`` (int64, ``input_ids`` with -100 on padding). ``n_blocks`` is
        ``ceil(n_tokens / block_size)``.

    Raises:
        ValueError: when ``texts`` is empty, ``block_size`` < 2, or the tokenizer lacks eos/pad.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if not texts:
        raise ValueError("pack_blocks got no texts")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("tokenizer needs both an eos and a pad token")
    stream: list[int] = []
    for start in tqdm(range(0, len(texts), batch_docs), desc=desc, unit="batch", leave=False):
        for ids in tokenizer(list(texts[start : start + batch_docs]), add_special_tokens=False, verbose=False)[
            "input_ids"
        ]:
            stream.extend(ids)
            stream.append(eos)
    n_blocks = math.ceil(len(stream) / block_size)
    n_pad = n_blocks * block_size - len(stream)
    ids = torch.tensor(stream + [pad] * n_pad, dtype=torch.long).view(n_blocks, block_size)
    mask = torch.ones_like(ids)
    if n_pad:
        mask[-1, block_size - n_pad :] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def concat_blocks(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate several :func:`pack_blocks` results along the block axis."""
    if not parts:
        raise ValueError("concat_blocks got no parts")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def evenly_spaced_blocks(blocks: dict[str, torch.Tensor], max_blocks: int | None) -> dict[str, torch.Tensor]:
    """At most ``max_blocks`` blocks taken at evenly spaced positions (first and last included); all when ``None``.

    A deterministic subsample that still covers documents from the whole split, used to keep
    periodic validation cheap on the large domains.

    Raises:
        ValueError: when ``max_blocks`` < 1.
    """
    n = int(blocks["input_ids"].shape[0])
    if max_blocks is None or n <= max_blocks:
        return blocks
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or null, got {max_blocks}")
    idx = torch.linspace(0, n - 1, steps=max_blocks).round().long()
    return {k: v[idx] for k, v in blocks.items()}


def n_target_tokens(blocks: dict[str, torch.Tensor]) -> int:
    """Number of tokens a causal LM predicts in ``blocks`` (labels != -100 after the one-token shift)."""
    return int((blocks["labels"][:, 1:] != IGNORE_INDEX).sum())


class BlockDataset(torch.utils.data.Dataset):
    """Map-style dataset over packed blocks; item ``i`` is ``{input_ids, attention_mask, labels}`` (int64 [block_size]).

    Works with ``transformers.default_data_collator`` and the HF Trainer.
    """

    def __init__(self, blocks: dict[str, torch.Tensor]):
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.blocks.items()}


@torch.no_grad()
def mean_nll(model, blocks: dict[str, torch.Tensor], *, batch_size: int = 16, desc: str = "eval") -> tuple[float, int]:
    """Token-weighted mean negative log-likelihood (nats/token) of a causal LM on packed blocks.

    Each block is scored on its own (no context carried across blocks); perplexity = ``exp(nll)``.
    The model is put in eval mode and left there.

    Returns:
        ``(mean_nll, n_tokens)`` where ``n_tokens`` is :func:`n_target_tokens`.

    Raises:
        ValueError: when ``blocks`` holds no target token.
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n = blocks["input_ids"].shape[0]
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        batch = {k: v[start : start + batch_size].to(device) for k, v in blocks.items()}
        k = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if k == 0:
            continue
        loss = model(**batch).loss  # mean over the batch's k target tokens
        total += float(loss) * k
        count += k
    if count == 0:
        raise ValueError("mean_nll: blocks hold no target token")
    return total / count, count
