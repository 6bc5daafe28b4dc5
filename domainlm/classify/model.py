"""The LoRA sequence classifier on the merged LM: ``AutoModelForSequenceClassification`` (Qwen2: the hidden state
of the last non-pad token → a linear ``score`` head) with a peft LoRA adapter (Hu et al. 2021) of task type
``SEQ_CLS``; the score head is trained in full through ``modules_to_save``.

Inputs are the document's tokens, cut to ``max_length − 1``, then EOS (:func:`encode`): the pooled last token
is the same end-of-document token for every input, truncated or not.

``models/classifier`` (:func:`save_classifier`) holds ``adapter/`` (the peft adapter, which loads back onto
``models/merged``) and ``model/`` (the adapter merged into the weights, with the tokenizer and ``id2label``
in ``config.json``): the folder :mod:`domainlm.classify.serving` serves, with no peft needed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

ADAPTER_SUBDIR = "adapter"
MODEL_SUBDIR = "model"


def appends_eos(tokenizer) -> bool:
    """Whether :func:`encode` appends EOS: the tokenizer has an EOS distinct from its pad token (a pad-equal
    EOS would be skipped by the last-non-pad-token pooling)."""
    return tokenizer.eos_token_id is not None and tokenizer.eos_token_id != tokenizer.pad_token_id


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
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True,
                    max_length=max_length - int(eos), verbose=False)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids] if eos else [list(x) for x in ids]


def load_sequence_classifier(lm_dir: str | os.PathLike, classes: Sequence[str], *, dtype=torch.float32):
    """``AutoModelForSequenceClassification`` on the causal LM in ``lm_dir`` with a fresh ``score`` head.

    ``config.id2label``/``label2id`` hold ``classes`` (index = class id) and ``config.pad_token_id`` the
    tokenizer's pad id, so the model finds each row's last non-pad token.

    Raises:
        OSError: (from transformers) ``lm_dir`` is not a loadable HF folder.
        ValueError: the tokenizer has no pad token.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{lm_dir}: the tokenizer has no pad token; the sequence classifier needs one")
    model = AutoModelForSequenceClassification.from_pretrained(
        lm_dir, local_files_only=True, dtype=dtype, num_labels=len(classes),
        id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
        pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def attach_lora(model, lora_params: Mapping[str, Any], *, seed: int):
    """Wrap ``model`` in a peft LoRA adapter of task type ``SEQ_CLS``; the ``score`` head is fully trainable
    (``modules_to_save``), everything else but the LoRA matrices is frozen.

    Args:
        lora_params: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` (the ``classifier.lora`` params).
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
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=int(lora_params["r"]), lora_alpha=float(lora_params["lora_alpha"]),
                        lora_dropout=float(lora_params["lora_dropout"]),
                        target_modules=list(lora_params["target_modules"]), modules_to_save=["score"], bias="none")
    return get_peft_model(model, config)


@torch.no_grad()
def predict_proba(model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (softmax of the logits) of each text.

    Texts are encoded with :func:`encode`, sorted by length and batched with right padding, so batches
    hold similar lengths; rows come back in input order.

    Returns:
        float64 array ``[len(texts), num_labels]``, rows summing to 1 (empty ``[0, num_labels]`` for no texts).
    """
    n_classes = int(model.config.num_labels)
    if not texts:
        return np.zeros((0, n_classes))
    ids = encode(tokenizer, texts, max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), n_classes))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt", padding_side="right")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out[rows] = torch.softmax(logits.double(), dim=-1).numpy()
    model.train(was_training)
    return out


def save_classifier(peft_model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``<out_dir>/adapter`` (peft ``save_pretrained``: LoRA matrices + the score head) and
    ``<out_dir>/model`` (the adapter merged into a copy of the weights, ``save_pretrained`` + tokenizer).

    ``peft_model`` is left as it was (the merge runs on a deep copy). Not atomic on its own: the stage
    writes into :func:`domainlm.common.atomic.atomic_path`.
    """
    import copy

    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir / ADAPTER_SUBDIR)
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
