"""Shared fixtures for the model-stage tests: synthetic Korean documents per domain, tiny base-model params,
and split parquet files with the pipeline's columns. Deterministic; nothing comes from a hub.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from domainlm.common.paths import SPLITS, split_path
from domainlm.documents.labels import LABELS_SCHEMA, write_label_table
from domainlm.documents.schema import DOC_SCHEMA

WORDS = {
    "law": ["대한민국", "국민", "헌법", "법률", "권리", "의무", "국회", "대통령", "조약", "재판"],
    "office_help": ["셀", "수식", "서식", "문서", "메뉴", "도구", "표", "차트", "슬라이드", "스타일"],
    "faq": ["데비안", "패키지", "설치", "커널", "저장소", "업그레이드", "명령", "시스템", "사용자", "파일"],
}
ENDINGS = ["을 선택합니다.", "은 보장된다.", "에 관한 질문입니다.", "를 확인하십시오.", "이 필요합니다."]


def korean_docs(domain: str, n_docs: int, seed: int = 0, sentences: int = 6) -> list[str]:
    """Deterministic synthetic Korean documents whose vocabulary differs by domain."""
    rng = random.Random(f"{domain}-{seed}")
    words = WORDS[domain]
    return [
        " ".join(
            f"제{rng.randint(1, 9)}조 {rng.choice(words)} {rng.choice(words)}{rng.choice(ENDINGS)}"
            for _ in range(sentences)
        )
        for _ in range(n_docs)
    ]


TINY = {
    "source": "build",
    "path": None,
    "seed": 7,
    "tokenizer": {"vocab_size": 300, "min_frequency": 2},
    "model": {
        "context_length": 32,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": True,
    },
    "train": {
        "steps": 40,
        "batch_size": 8,
        "lr": 1.0e-2,
        "betas": [0.9, 0.95],
        "weight_decay": 0.1,
        "warmup_steps": 3,
        "grad_clip": 1.0,
        "log_every": 5,
        "eval_batch_size": 16,
    },
}
TRAIN_TEXTS = {d: korean_docs(d, 12) for d in WORDS}  # pretraining texts of the tiny base


def doc_table(domain: str, ids: list[str], texts: list[str], labels: list[str | None] | None = None) -> pa.Table:
    """Documents in the pipeline's schema (:data:`domainlm.documents.schema.DOC_SCHEMA`); label = domain unless
    given."""
    return pa.table(
        {
            "id": ids,
            "text": texts,
            "domain": pa.array([domain] * len(texts), pa.string()).dictionary_encode(),
            "label": labels if labels is not None else [domain] * len(texts),
            "n_chars": pa.array([len(t) for t in texts], pa.int32()),
            "source": ["fixture"] * len(texts),
        }
    ).cast(DOC_SCHEMA)


def write_split_fixture(root, texts_by_domain: dict[str, list[str]]) -> None:
    """data/split/<domain>/{train,val,test}.parquet with the pipeline's columns (8/2/2 docs)."""
    for domain, texts in texts_by_domain.items():
        parts = {"train": texts[:-4], "val": texts[-4:-2], "test": texts[-2:]}
        for split, part in parts.items():
            path = split_path(root, domain, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(doc_table(domain, [f"{domain}-{split}-{i}" for i in range(len(part))], part), path)


def write_label_table_fixture(split_root, path, overrides: dict[str, str] | None = None) -> None:
    """The split stage's label table (:data:`domainlm.documents.labels.LABELS_SCHEMA`) for the document files
    under ``split_root``: each document's own label, replaced by ``overrides[id]`` where given."""
    overrides = overrides or {}
    rows = []
    for domain_dir in sorted(p for p in Path(split_root).iterdir() if p.is_dir()):
        for split in SPLITS:
            t = pq.read_table(domain_dir / f"{split}.parquet", columns=["id", "label"])
            for i, lab in zip(t["id"].to_pylist(), t["label"].to_pylist()):
                rows.append(
                    {
                        "id": i,
                        "domain": domain_dir.name,
                        "split": split,
                        "source_label": lab,
                        "label": overrides.get(i, lab),
                    }
                )
    write_label_table(path, pa.Table.from_pylist(rows, schema=LABELS_SCHEMA))
