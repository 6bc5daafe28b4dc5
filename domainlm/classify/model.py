"""The LoRA sequence classifier on the merged LM: ``AutoModelForSequenceClassification`` (Qwen2: the hidden state
of the last non-pad token → a linear ``score`` head) with a peft LoRA adapter (Hu et al. 2021) of task type
``SEQ_CLS``; the score head is trained in full through ``modules_to_save``.

Inputs are token windows of the document, each ``max_length − 1`` tokens then EOS (:func:`encode_windows`): the
pooled last token is the same end-of-window token for every input. A document longer than one window is read
as up to ``max_windows`` evenly spaced windows (the first starts at the document's first token, the last ends
at its last); its logits are the mean of its windows' logits (:func:`predict_proba`), in training (validation),
in the stage's predictions and in the served model alike. ``max_windows: 1`` is the document's first window only.

``models/classifier`` (:func:`save_classifier`) holds ``adapter/`` (the peft adapter), ``backbone/`` (the LM the
adapter was trained on, weights and tokenizer: ``adapter/`` loads back onto it whatever the current LM is) and
``model/`` (the adapter merged into the weights, with the tokenizer and ``id2label`` in ``config.json``): the folder
:mod:`domainlm.classify.serving` serves, with no peft needed.

A label the saved head lacks widens it (:func:`widen_adapter`): the known classes' rows are kept, a row is drawn
for each new class, and training continues from there (the warm start of Net2Net-style function-preserving growth,
Chen et al. 2016: the known classes' logits are unchanged until training moves them).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ADAPTER_SUBDIR = "adapter"
MODEL_SUBDIR = "model"
BACKBONE_SUBDIR = "backbone"
#: The adapter file peft writes (``save_pretrained`` with safetensors) and the head ``modules_to_save`` trains.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_MODULE = "score"


def appends_eos(tokenizer) -> bool:
    """Whether :func:`encode` appends EOS: the tokenizer has an EOS distinct from its pad token (a pad-equal
    EOS would be skipped by the last-non-pad-token pooling)."""
    return tokenizer.eos_token_id is not None and tokenizer.eos_token_id != tokenizer.pad_token_id


def window_spans(n_tokens: int, width: int, max_windows: int) -> list[tuple[int, int]]:
    """Token spans ``[start, stop)`` of up to ``max_windows`` evenly spaced windows of ``width`` tokens over a
    document of ``n_tokens`` tokens: one span ``(0, n_tokens)`` when it fits; else
    ``k = min(max_windows, ceil(n_tokens / width))`` windows whose starts are spaced evenly from 0 to
    ``n_tokens − width`` (rounded), so with enough windows they cover every token.

    Raises:
        ValueError: ``width`` or ``max_windows`` below 1.
    """
    if width < 1 or max_windows < 1:
        raise ValueError(f"width and max_windows must be >= 1, got {width} and {max_windows}")
    if n_tokens <= width:
        return [(0, n_tokens)]
    k = min(int(max_windows), math.ceil(n_tokens / width))
    if k == 1:
        return [(0, width)]
    last = n_tokens - width
    return [(s, s + width) for s in (round(i * last / (k - 1)) for i in range(k))]


def encode_windows(
    tokenizer, texts: Sequence[str], max_length: int, max_windows: int = 1, *, return_lengths: bool = False
) -> list[list[list[int]]] | tuple[list[list[list[int]]], list[int]]:
    """Token-id windows of each text for the classifier (:func:`window_spans`), each at most ``max_length`` ids with
    EOS last.

    Args:
        tokenizer: a transformers tokenizer with a pad token.
        texts: documents (str).
        max_length: window length in tokens, EOS included (≥ 2).
        max_windows: at most this many windows per document (≥ 1).
        return_lengths: also return each text's length in tokens before windowing (no special tokens).

    Returns:
        ``windows[i]``: text ``i``'s windows, each a list of int ids (no padding); an empty text gives one window
        holding EOS alone (or nothing, for a tokenizer without a distinct EOS). With ``return_lengths``:
        ``(windows, lengths)``.

    Raises:
        ValueError: ``max_length`` < 2, ``max_windows`` < 1, or the tokenizer has no pad token (the classifier
            pools the last non-pad token, so padding must be recognisable).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if int(max_windows) < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; the sequence classifier needs one")
    eos = appends_eos(tokenizer)
    width = max_length - int(eos)
    if int(max_windows) == 1 and not return_lengths:  # the first window only: let the tokenizer truncate
        ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=width, verbose=False)[
            "input_ids"
        ]
    else:
        ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    tail = [tokenizer.eos_token_id] if eos else []
    windows = [[list(x[a:b]) + tail for a, b in window_spans(len(x), width, int(max_windows))] for x in ids]
    return (windows, [len(x) for x in ids]) if return_lengths else windows


def encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text for the classifier: at most ``max_length`` ids, the last one EOS.

    Args:
        tokenizer: a transformers tokenizer with a pad token.
        texts: documents (str).
        max_length: input length in tokens, EOS included (≥ 2).

    Returns:
        One list of int ids per text (no padding).

    Raises:
        ValueError: ``max_length`` < 2, or the tokenizer has no pad token (the classifier pools the last
            non-pad token, so padding must be recognisable).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; the sequence classifier needs one")
    eos = appends_eos(tokenizer)
    ids = tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=max_length - int(eos), verbose=False
    )["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids] if eos else [list(x) for x in ids]


ATTENTION_CHOICES = ("sdpa", "eager")


def attention_implementation(setting: str | None) -> str:
    """The transformers ``attn_implementation`` the classifier trains with (``classifier.attn_implementation``;
    None = ``sdpa``, transformers' default).

    ``sdpa`` is PyTorch's fused ``scaled_dot_product_attention``; ``eager`` computes the same function as two
    batched matmuls and a softmax, so only rounding differs. On a CPU eager trains faster for windows this short:
    the backward pass of the CPU flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu_backward``)
    took ~11 ms per layer of a 16×128-token step, four times its forward, and stays one opaque kernel under
    :func:`compiled_layers`, where eager attention's softmax is fused. Training steps of train_classifier's Trainer
    on the 2-core AVX512-BF16 box (bf16, 2 threads, 16×128 tokens, median): sdpa 181 ms, eager 126 ms, compiled
    sdpa 164 ms, compiled eager 105 ms. ``params.yaml`` sets eager; the function's default stays transformers'.

    Raises:
        ValueError: ``setting`` is not one of :data:`ATTENTION_CHOICES`.
    """
    setting = "sdpa" if setting is None else str(setting)
    if setting not in ATTENTION_CHOICES:
        raise ValueError(f"classifier.attn_implementation must be one of {ATTENTION_CHOICES}, got {setting!r}")
    return setting


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers model (peft-wrapped or not): the modules whose class the model
    names in ``_no_split_modules`` (``Qwen2DecoderLayer`` for Qwen2), in model order.

    Raises:
        ValueError: the model names no such class, or none of its modules is one.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(inner).__name__}: no decoder layers found (_no_split_modules {sorted(names)})")
    return layers


@contextlib.contextmanager
def compiled_layers(model, enabled: bool = True) -> Iterator[int]:
    """Compile each decoder layer of ``model`` for the block (regional compilation: ``nn.Module.compile`` of every
    repeated block, PyTorch's recipe "Reducing torch.compile cold start compilation time with regional
    compilation"; TorchInductor, ``dynamic=True`` since batches differ in length). The layers share one forward,
    so one compile serves all of them, and a later model of the same shape (the gate's next attempt) reuses it.
    Inductor fuses what eager mode runs op by op (autocast's dtype casts, RMSNorm, rotary embeddings, LoRA
    scaling, eager attention's softmax); the matmuls stay oneDNN's. After the block the layers run eagerly again
    (``save_classifier`` deep-copies the model: a copy must not carry the original's compiled call).

    Yields the number of layers compiled (0 when ``enabled`` is false).

    Raises:
        RuntimeError: a model on the CPU and no C++ compiler (``$CXX``, default ``g++``, as Inductor's ``cpp.cxx``)
            on ``PATH``: Inductor builds its CPU kernels with one (``apt-get install g++``), or set
            ``classifier.compile: false``.
    """
    if not enabled:
        yield 0
        return
    import shutil

    cxx = os.environ.get("CXX", "g++")
    on_cpu = next(model.parameters()).device.type == "cpu"  # on CUDA, Inductor generates Triton kernels instead
    if on_cpu and shutil.which(cxx) is None:
        raise RuntimeError(
            f"classifier.compile: TorchInductor builds CPU kernels with a C++ compiler and {cxx!r} is "
            "not on PATH: apt-get install g++, or set classifier.compile: false"
        )
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


def load_adapter(
    lm_dir: str | os.PathLike,
    classes: Sequence[str],
    adapter_dir: str | os.PathLike,
    *,
    trainable: bool = True,
    attn_implementation: str | None = None,
):
    """A saved classifier's adapter (``<dir>/adapter``: LoRA matrices and the score head) back on the merged LM in
    ``lm_dir``, ready to be fine-tuned further (``trainable``) or scored: ``(peft_model, tokenizer)``.
    ``attn_implementation``: as :func:`load_sequence_classifier`.

    Raises:
        OSError / ValueError: (from transformers / peft) a folder is not loadable, or the adapter's head does not
            fit ``len(classes)`` classes.
    """
    from peft import PeftModel

    base, tokenizer = load_sequence_classifier(lm_dir, classes, attn_implementation=attn_implementation)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    return model, tokenizer


def load_sequence_classifier(
    lm_dir: str | os.PathLike, classes: Sequence[str], *, dtype=torch.float32, attn_implementation: str | None = None
):
    """``AutoModelForSequenceClassification`` on the causal LM in ``lm_dir`` with a fresh ``score`` head.

    ``config.id2label``/``label2id`` hold ``classes`` (index = class id) and ``config.pad_token_id`` the
    tokenizer's pad id, so the model finds each row's last non-pad token. ``attn_implementation``: ``eager`` |
    ``sdpa`` (:func:`attention_implementation`); None = transformers' default.

    Raises:
        OSError: (from transformers) ``lm_dir`` is not a loadable HF folder.
        ValueError: the tokenizer has no pad token.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{lm_dir}: the tokenizer has no pad token; the sequence classifier needs one")
    model = AutoModelForSequenceClassification.from_pretrained(
        lm_dir,
        local_files_only=True,
        dtype=dtype,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
        pad_token_id=tokenizer.pad_token_id,
        **({"attn_implementation": attn_implementation} if attn_implementation is not None else {}),
    )
    return model, tokenizer


def attach_lora(model, lora_params: Mapping[str, Any], *, seed: int):
    """Wrap ``model`` in a peft LoRA adapter of task type ``SEQ_CLS``; the ``score`` head is fully trainable
    (``modules_to_save``), everything else but the LoRA matrices is frozen.

    Args:
        lora_params: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``top_layers`` (optional; the
            ``classifier.lora`` params; :func:`adapted_layers`).
        seed: ``transformers.set_seed`` before the score head (normal, std ``initializer_range``) and the LoRA A
            matrices are drawn (B starts at zero).

    Raises:
        ValueError: (from peft) a target module name matches no layer.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed

    set_seed(seed)
    # the head from_pretrained drew before the seed was set: redraw it as transformers initialises Linear layers
    torch.nn.init.normal_(model.score.weight, std=float(getattr(model.config, "initializer_range", 0.02)))
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=int(lora_params["r"]),
        lora_alpha=float(lora_params["lora_alpha"]),
        lora_dropout=float(lora_params["lora_dropout"]),
        target_modules=list(lora_params["target_modules"]),
        modules_to_save=["score"],
        bias="none",
        layers_to_transform=adapted_layers(int(model.config.num_hidden_layers), lora_params.get("top_layers")),
    )
    return get_peft_model(model, config)


def adapted_layers(num_layers: int, top_layers: int | None) -> list[int] | None:
    """The decoder layers that get LoRA matrices: the top ``top_layers`` of ``num_layers`` (None = every layer).

    The layers below stay frozen and carry no adapter, so autograd records nothing there: the forward pass through
    them keeps no activations and the backward pass stops at the lowest adapted layer (the cost of a step falls
    roughly with the share of layers adapted).

    Raises:
        ValueError: ``top_layers`` < 1.
    """
    if top_layers is None or int(top_layers) >= num_layers:
        return None
    if int(top_layers) < 1:
        raise ValueError(f"classifier.lora.top_layers must be >= 1 or null, got {top_layers}")
    return list(range(num_layers - int(top_layers), num_layers))


def pool_window_logits(window_logits: np.ndarray, doc_of_window: Sequence[int], n_docs: int) -> np.ndarray:
    """Mean of each document's window logits.

    Args:
        window_logits: float array ``[n_windows, n_classes]``.
        doc_of_window: the document index (in ``[0, n_docs)``) of each window.

    Returns:
        float64 array ``[n_docs, n_classes]``.

    Raises:
        ValueError: a document has no window, or the lengths disagree.
    """
    window_logits = np.asarray(window_logits, dtype=np.float64)
    doc = np.asarray(doc_of_window, dtype=np.int64)
    if len(doc) != len(window_logits):
        raise ValueError(f"{len(window_logits)} window logits but {len(doc)} document indices")
    counts = np.bincount(doc, minlength=n_docs)
    if (counts[:n_docs] == 0).any():
        raise ValueError(f"document {int(np.argmin(counts[:n_docs]))} has no window")
    sums = np.zeros((n_docs, window_logits.shape[1]))
    np.add.at(sums, doc, window_logits)
    return sums / counts[:n_docs, None]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits ``[n, k]`` (float64, rows summing to 1)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predict_proba(
    model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int = 32, max_windows: int = 1, compute=None
) -> np.ndarray:
    """Class probabilities of each text: the softmax of the mean of its windows' logits (:func:`encode_windows`,
    then :func:`predict_windows`).

    Returns:
        float64 array ``[len(texts), num_labels]``, rows summing to 1 (empty ``[0, num_labels]`` for no texts).
    """
    from domainlm.classify.window_cache import InMemoryWindows

    if not texts:
        return np.zeros((0, int(model.config.num_labels)))
    windows = InMemoryWindows(encode_windows(tokenizer, texts, max_length, max_windows))
    return predict_windows(model, tokenizer, windows, batch_size=batch_size, compute=compute)


@torch.no_grad()
def predict_windows(
    model,
    tokenizer,
    windows,
    docs: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
    max_windows: int | None = None,
    compute=None,
    chunk_docs: int = 8192,
) -> np.ndarray:
    """Class probabilities of documents given as token windows: the softmax of the mean of each document's window
    logits.

    Documents are scored ``chunk_docs`` at a time (memory follows the chunk, not the split); in a chunk, windows
    are sorted by length and batched with right padding, so batches hold similar lengths; rows come back in
    ``docs`` order. Each batch goes to the model's device (a GPU after training there). The forward passes run
    under ``compute``'s autocast (:mod:`domainlm.common.compute`; None = fp32); logits are pooled in float64.

    Args:
        windows: a :class:`domainlm.classify.window_cache.WindowSource`: a memory-mapped ``WindowCache`` or
            ``InMemoryWindows``.
        docs: which of its documents, in order (None = all).
        max_windows: pool at most the first this many windows of each document (None = all it has).

    Returns:
        float64 array ``[len(docs), num_labels]``, rows summing to 1 (empty ``[0, num_labels]`` for no document).
    """
    from domainlm.common.compute import autocast

    n_classes = int(model.config.num_labels)
    docs = np.arange(len(windows)) if docs is None else np.asarray(docs, dtype=np.int64)
    out = np.zeros((len(docs), n_classes))
    if not len(docs):
        return out
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with autocast(compute):
        for c0 in range(0, len(docs), int(chunk_docs)):
            chunk = docs[c0 : c0 + int(chunk_docs)]
            counts = windows.n_windows[chunk]
            if max_windows is not None:
                counts = np.minimum(counts, int(max_windows))
            ids = [windows.window(int(d), k) for d, n in zip(chunk, counts) for k in range(int(n))]
            doc_of = np.repeat(np.arange(len(chunk)), counts)
            order = np.argsort([len(x) for x in ids], kind="stable")
            logits_out = np.zeros((len(ids), n_classes))
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt", padding_side="right")
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                logits_out[rows] = logits.double().cpu().numpy()
            out[c0 : c0 + len(chunk)] = softmax(pool_window_logits(logits_out, doc_of, len(chunk)))
    model.train(was_training)
    return out


def save_classifier(peft_model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``<out_dir>/adapter`` (peft ``save_pretrained``: LoRA matrices + the score head) and
    ``<out_dir>/model`` (the adapter merged into a copy of the weights, ``save_pretrained`` + tokenizer).

    ``peft_model`` is left as it was (the merge runs on a deep copy). ``adapter_config.json`` is written with its
    set-valued lists sorted (:func:`domainlm.common.peft_files.sort_adapter_config`): peft writes them in set order,
    which follows the per-process hash seed, so the same classifier got a different file hash on every run. Not
    atomic on its own: the stage writes into :func:`domainlm.common.atomic.atomic_path`.
    """
    import copy

    from domainlm.common.peft_files import sort_adapter_config

    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir / ADAPTER_SUBDIR)
    sort_adapter_config(out_dir / ADAPTER_SUBDIR / "adapter_config.json")
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(out_dir / MODEL_SUBDIR)
    tokenizer.save_pretrained(out_dir / MODEL_SUBDIR)
    return out_dir


def load_classifier(model_dir: str | os.PathLike):
    """Load a saved classifier ``model/`` folder (:func:`save_classifier`) for inference: ``(model, tokenizer)``,
    the model in eval mode; ``model.config.id2label`` gives the classes.

    Raises:
        OSError: (from transformers) ``model_dir`` is not a loadable HF folder.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    return model, tokenizer


def classes_of(model) -> list[str]:
    """The model's classes in class-id order (``config.id2label``)."""
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def widen_adapter(
    adapter_dir: str | os.PathLike,
    old_classes: Sequence[str],
    new_classes: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    seed: int,
    std: float = 0.02,
) -> dict[str, Any]:
    """Write a copy of a saved classifier adapter whose score head has a row per class of ``new_classes``.

    Each class of ``old_classes`` keeps its row (moved to its index in ``new_classes``: class ids follow the sorted
    class list, so a new label can shift them); each new class gets a row drawn from N(0, ``std``²) with a generator
    seeded by ``seed``, as transformers initialises a ``Linear`` layer. The LoRA matrices and
    ``adapter_config.json`` are copied unchanged, so on the same backbone the known classes' logits are exactly the
    saved model's. The result loads with :func:`load_adapter` for ``new_classes``.

    Args:
        adapter_dir: a saved ``adapter/`` folder (:func:`save_classifier`; peft's ``adapter_model.safetensors``,
            float tensors, head ``base_model.model.score.weight`` of shape ``[len(old_classes), hidden]``).
        old_classes: the saved head's classes, in head order.
        new_classes: the widened head's classes, in head order; must contain every class of ``old_classes``.
        out_dir: the folder to write (created; not atomic on its own).
        seed: seeds the new rows.
        std: the new rows' standard deviation (the backbone's ``initializer_range``).

    Returns:
        ``{"kept": [...], "added": [...]}``: the classes whose rows were kept and the ones added, in head order.

    Raises:
        ValueError: ``new_classes`` lacks a class of ``old_classes`` or repeats one, or the adapter holds no head
            tensor whose first dimension is ``len(old_classes)``.
        FileNotFoundError: ``adapter_dir`` lacks its weights file.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    old, new = list(old_classes), list(new_classes)
    missing = [c for c in old if c not in new]
    if missing:
        raise ValueError(f"cannot widen the head: the new class list lacks {missing}")
    if len(set(new)) != len(new):
        raise ValueError(f"the new class list repeats a class: {new}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing: not a saved classifier adapter")
    state = load_file(str(weights_path))
    heads = [
        k
        for k, v in state.items()
        if k.rsplit(".", 2)[-2:-1] == [HEAD_MODULE] and v.ndim >= 1 and v.shape[0] == len(old)
    ]
    if not heads:
        raise ValueError(f"{weights_path}: no {HEAD_MODULE!r} head tensor with {len(old)} rows (one per class)")
    gen = torch.Generator().manual_seed(int(seed))
    index = [new.index(c) for c in old]
    for key in heads:
        saved = state[key]
        widened = torch.zeros((len(new), *saved.shape[1:]), dtype=saved.dtype)
        if key.endswith(".weight"):
            widened.normal_(0.0, float(std), generator=gen)
        widened[index] = saved
        state[key] = widened.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in adapter_dir.iterdir():
        if path.is_file() and path.name != ADAPTER_WEIGHTS:
            shutil.copy2(path, out_dir / path.name)
    save_file(state, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return {"kept": [c for c in new if c in old], "added": [c for c in new if c not in old]}
