"""Fixtures for the classifier tests: labelled split files in the pipeline's layout (office_help split into two help
modules, as the real corpus is), the label table, a tiny real LM and tiny ``classifier`` params. Deterministic;
nothing comes from a hub.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pyarrow.parquet as pq
from lm_fixtures import TINY, TRAIN_TEXTS, doc_table, write_label_table_fixture

from domainlm.common.paths import split_path

#: Each label's vocabulary; calc and writer are office_help's help modules.
VOCAB = {
    "law": ["대한민국", "국민", "헌법", "법률", "권리", "의무", "국회", "대통령"],
    "faq": ["데비안", "패키지", "설치", "커널", "저장소", "업그레이드", "명령", "시스템"],
    "calc": ["셀", "수식", "차트", "함수", "행", "열", "합계", "시트"],
    "writer": ["문서", "서식", "스타일", "문단", "글꼴", "페이지", "머리글", "목차"],
}
DOMAIN_OF = {"law": "law", "faq": "faq", "calc": "office_help", "writer": "office_help"}
DOMAINS = ["law", "office_help", "faq"]
CLASSES = sorted(VOCAB)
ENDINGS = ["을 선택합니다.", "은 보장된다.", "에 관한 질문입니다.", "를 확인하십시오.", "이 필요합니다."]
COUNTS = {"train": 16, "val": 4, "test": 4}  # documents per label and split

#: ``classifier`` params for the tiny model: seconds per attempt on one thread.
CLASSIFIER_TINY = {
    "seed": 0,
    "max_length": 24,
    "compile": False,  # unit tests train eagerly; test_pipeline_classifier and test_train_classifier compile
    "windows": {"train": 2, "predict": 3},
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "train": {
        "epochs": 6,
        "batch_size": 8,
        "eval_batch_size": 32,
        "lr": 2.0e-2,
        "weight_decay": 0.0,
        "warmup_steps": 0.1,
        "grad_clip": 1.0,
        "logging_steps": 4,
        "early_stopping_patience": 3,
    },
    "gate": {"min_f1": 0.0, "max_retries": 2, "retry_epochs": 3, "retry_lr": 1.0e-2},
    "baseline": {
        "ngram_range": [1, 3],
        "min_df": 1,
        "max_features": None,
        "C": 10.0,
        "max_iter": 1000,
        "max_chars": None,
    },
    "registry": {"model_name": "domain-lm-classifier"},
    "serving": {"max_batch_rows": 8, "batch_size": 8, "torch_threads": 1},
    "alert": {"webhook_url": None, "timeout_s": 2},
}


def classifier_params(**updates) -> dict:
    """A deep copy of :data:`CLASSIFIER_TINY` with top-level ``updates`` merged one level deep."""
    cfg = copy.deepcopy(CLASSIFIER_TINY)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def labelled_docs(label: str, n: int, seed: str) -> list[str]:
    """``n`` short Korean documents drawn from ``label``'s vocabulary (deterministic per label and seed)."""
    rng = random.Random(f"{label}-{seed}")
    words = VOCAB[label]
    return [
        " ".join(f"{rng.choice(words)} {rng.choice(words)}{rng.choice(ENDINGS)}" for _ in range(rng.randint(2, 5)))
        for _ in range(n)
    ]


def write_labelled_splits(
    root, *, counts: dict[str, int] = COUNTS, overrides: dict[str, str] | None = None, labels_path=None
) -> tuple[Path, Path]:
    """``<root>/split/<domain>/{train,val,test}.parquet`` (ids ``<label>-<split>-<i>``) and the label table
    (``<root>/labels.parquet`` unless ``labels_path``) with ``overrides`` applied. Returns ``(split_dir,
    labels_path)``."""
    root = Path(root)
    split_dir = root / "split"
    for domain in DOMAINS:
        for split, n in counts.items():
            ids, texts, labels = [], [], []
            for label in (lab for lab, d in DOMAIN_OF.items() if d == domain):
                ids += [f"{label}-{split}-{i}" for i in range(n)]
                texts += labelled_docs(label, n, split)
                labels += [label] * n
            path = split_path(split_dir, domain, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(doc_table(domain, ids, texts, labels), path)
    labels_path = Path(labels_path) if labels_path else root / "labels.parquet"
    write_label_table_fixture(split_dir, labels_path, overrides)
    return split_dir, labels_path


def build_tiny_lm(out_dir) -> Path:
    """A tiny Qwen2 causal LM pretrained for a few steps by the pipeline's own recipe, saved with its tokenizer."""
    from domainlm.lm import pretrain

    model, tok, _ = pretrain.build(TRAIN_TEXTS, TINY)
    return pretrain.save_hf_folder(model, tok, out_dir)
