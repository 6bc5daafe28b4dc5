"""The base causal LM: train a byte-level BPE tokenizer and pretrain a small Qwen2 from scratch, or copy a
local checkpoint.

Pretraining is a nanoGPT-style loop (Karpathy 2022) in :func:`pretrain`: packed blocks, AdamW, linear warmup
+ cosine decay (``transformers.get_cosine_schedule_with_warmup``), gradient clipping; the model is
``transformers.Qwen2ForCausalLM``. :func:`build` runs the whole recipe (tokenizer, blocks, model, loop).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from domainlm.common.atomic import atomic_path
from domainlm.common.compute import autocast
from domainlm.lm import data as lm_data

log = logging.getLogger(__name__)


def qwen2_config(tokenizer, model_params: Mapping[str, Any]):
    """Build a ``transformers.Qwen2Config`` from the ``base_model.model`` params and a tokenizer.

    ``vocab_size`` is ``len(tokenizer)``; ``context_length`` becomes ``max_position_embeddings``;
    bos/eos/pad ids come from the tokenizer. Input and output embeddings are tied unless
    ``tie_word_embeddings: false``.
    """
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=int(model_params["hidden_size"]),
        intermediate_size=int(model_params["intermediate_size"]),
        num_hidden_layers=int(model_params["num_hidden_layers"]),
        num_attention_heads=int(model_params["num_attention_heads"]),
        num_key_value_heads=int(model_params["num_key_value_heads"]),
        max_position_embeddings=int(model_params["context_length"]),
        tie_word_embeddings=bool(model_params.get("tie_word_embeddings", True)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def qwen2_param_count(vocab_size: int, model_params: Mapping[str, Any]) -> int:
    """Closed-form parameter count of a Qwen2ForCausalLM with these sizes (what the params configure).

    Per layer: q/k/v projections with bias, o projection without, SwiGLU MLP (gate, up, down),
    two RMSNorm weights; plus the token embedding, the final RMSNorm and, if untied, the LM head.
    """
    h = int(model_params["hidden_size"])
    inter = int(model_params["intermediate_size"])
    n_heads = int(model_params["num_attention_heads"])
    kv = int(model_params["num_key_value_heads"]) * (h // n_heads)
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h
    layer = attn + 3 * h * inter + 2 * h
    head = 0 if model_params.get("tie_word_embeddings", True) else vocab_size * h
    return vocab_size * h + int(model_params["num_hidden_layers"]) * layer + h + head


def batches(n_blocks: int, batch_size: int, seed: int):
    """Endless stream of block-index batches (int64 [batch_size]): a fresh seeded permutation each epoch.

    The incomplete tail of each epoch's permutation is carried into the next, so every batch is full.
    """
    gen = torch.Generator().manual_seed(seed)
    carry = torch.empty(0, dtype=torch.long)
    while True:
        order = torch.cat([carry, torch.randperm(n_blocks, generator=gen)])
        full = (len(order) // batch_size) * batch_size
        for start in range(0, full, batch_size):
            yield order[start : start + batch_size]
        carry = order[full:]


def pretrain(
    model, blocks: Mapping[str, torch.Tensor], train_params: Mapping[str, Any], *, seed: int, on_log=None, compute=None
) -> dict[str, float]:
    """Pretrain ``model`` in place on packed blocks for ``train_params['steps']`` optimizer steps.

    AdamW (weight decay on matrices only, as in nanoGPT), ``get_cosine_schedule_with_warmup``
    (linear warmup for ``warmup_steps``, cosine decay to 0 at ``steps``), global-norm clipping at
    ``grad_clip``. ``on_log(step, {"loss", "lr"})`` is called every ``log_every`` steps.

    Args:
        blocks: :func:`domainlm.lm.data.pack_blocks` output (int64 [n_blocks, block_size] tensors).
        train_params: steps, batch_size, lr, weight_decay, warmup_steps, grad_clip, betas, log_every.
        compute: a :class:`domainlm.common.compute.ComputePolicy`: the forward pass runs under its autocast
            (bf16 matmuls; weights, gradients and AdamW states stay fp32); None = fp32.

    Returns:
        ``{"final_loss"`` (mean train loss over the last ``log_every`` steps, nats/token),
        ``"tokens_seen"``, ``"tokens_per_s"``, ``"train_s"}``.

    Raises:
        ValueError: steps or batch_size below 1, or fewer blocks than one batch.
    """
    from transformers import get_cosine_schedule_with_warmup

    steps, bs = int(train_params["steps"]), int(train_params["batch_size"])
    if steps < 1 or bs < 1:
        raise ValueError(f"base_model.train.steps and batch_size must be >= 1, got {steps} and {bs}")
    if int(blocks["input_ids"].shape[0]) < bs:
        raise ValueError(f"only {blocks['input_ids'].shape[0]} training blocks for batch_size {bs}")
    log_every = int(train_params.get("log_every", 10))
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": float(train_params["weight_decay"])},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=float(train_params["lr"]),
        betas=tuple(train_params.get("betas", (0.9, 0.95))),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(train_params["warmup_steps"]), steps)
    stream = batches(int(blocks["input_ids"].shape[0]), bs, seed)

    model.train()
    tokens_seen, recent = 0, []
    t0 = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="pretrain", unit="step")
    for step in bar:
        idx = next(stream)
        batch = {k: v[idx] for k, v in blocks.items()}
        with autocast(compute):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(train_params["grad_clip"]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += lm_data.n_target_tokens(batch)
        recent.append(loss.item())
        if step % log_every == 0 or step == steps:
            mean_loss = sum(recent) / len(recent)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if on_log is not None:
                on_log(step, {"loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
            final_loss, recent = mean_loss, []
    train_s = time.perf_counter() - t0
    model.eval()
    return {
        "final_loss": final_loss,
        "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / train_s,
        "train_s": train_s,
    }


def val_perplexities(
    model, tokenizer, val_texts: Mapping[str, Sequence[str]], block_size: int, batch_size: int, *, compute=None
) -> dict[str, float]:
    """Perplexity ``exp(token-weighted mean NLL)`` of ``model`` on each domain's texts, packed into blocks
    (forward passes under ``compute``'s autocast; the NLL itself is summed in fp32)."""
    out = {}
    for domain, texts in val_texts.items():
        blocks = lm_data.pack_blocks(tokenizer, texts, block_size, desc=f"tokenize {domain}")
        with autocast(compute):
            nll, _ = lm_data.mean_nll(model, blocks, batch_size=batch_size, desc=f"val {domain}")
        out[domain] = math.exp(nll)
    return out


def build(train_texts: Mapping[str, Sequence[str]], params: Mapping[str, Any], *, on_log=None, compute=None):
    """Train the tokenizer and pretrain a Qwen2ForCausalLM from scratch on the pooled train texts.

    Args:
        train_texts: ``{domain: [text, ...]}``; all domains are pooled (blocks never straddle domains).
        params: the ``base_model`` params section (seed, tokenizer, model, train).
        compute: the compute policy of :func:`pretrain` (None = fp32).

    Returns:
        ``(model, tokenizer, stats)``; ``stats`` is :func:`pretrain`'s dict plus ``n_blocks``.
    """
    from transformers import Qwen2ForCausalLM, set_seed

    seed = int(params["seed"])
    block_size = int(params["model"]["context_length"])
    tok_params = params["tokenizer"]
    pooled = [t for texts in train_texts.values() for t in texts]
    log.info("training byte-level BPE (vocab %s) on %d documents", tok_params["vocab_size"], len(pooled))
    tokenizer = lm_data.train_bpe_tokenizer(
        pooled,
        vocab_size=int(tok_params["vocab_size"]),
        min_frequency=int(tok_params.get("min_frequency", 2)),
        model_max_length=block_size,
    )
    blocks = lm_data.concat_blocks(
        [lm_data.pack_blocks(tokenizer, texts, block_size, desc=f"tokenize {d}") for d, texts in train_texts.items()]
    )
    set_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer, params["model"]))
    stats = pretrain(model, blocks, params["train"], seed=seed, on_log=on_log, compute=compute)
    stats["n_blocks"] = int(blocks["input_ids"].shape[0])
    return model, tokenizer, stats


def save_hf_folder(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write a standard HF folder (config.json, model.safetensors, tokenizer files) to ``out_dir`` atomically."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def check_causal_lm_folder(path: str | os.PathLike) -> None:
    """Check that ``path`` is a local HF causal-LM checkpoint with a tokenizer.

    Raises:
        FileNotFoundError: the folder, its config.json or its tokenizer files are missing.
        ValueError: the config's model type has no causal-LM class in transformers, or its
            ``architectures`` name no causal-LM class (e.g. a sequence classifier).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"base_model.path {str(path)!r} is not a folder")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"base_model.path {str(path)!r} has no config.json: not an HF checkpoint")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"base_model.path {str(path)!r} has no tokenizer files")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    causal_classes = {
        c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)
    }
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        config.architectures and not set(config.architectures) & causal_classes
    ):
        raise ValueError(
            f"base_model.path {str(path)!r} holds a {config.model_type!r} model with architectures "
            f"{config.architectures}, which is not a causal LM"
        )


def copy_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a local causal-LM checkpoint folder to ``out_dir`` atomically, after :func:`check_causal_lm_folder`."""
    check_causal_lm_folder(src)
    with atomic_path(out_dir, is_dir=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(out_dir)
