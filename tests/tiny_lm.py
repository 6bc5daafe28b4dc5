"""Tiny real fixtures for the model-stage tests: a byte-level BPE tokenizer, a Qwen2 causal LM
and peft LoRA adapters with non-zero B matrices, all saved as ordinary HF folders.

Nothing is mocked and nothing comes from a hub: the tokenizer is trained with the ``tokenizers``
library on a few Korean sentences, the model is randomly initialised from a seed.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from lm_fixtures import doc_table

KOREAN_SENTENCES = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "법률안은 국회의원과 정부가 제출할 수 있다. 국회에서 의결된 법률안은 정부에 이송되어 공포된다.",
    "셀에 수식을 입력하려면 등호를 먼저 입력하십시오. 계산 결과가 셀에 표시됩니다.",
    "문서의 글꼴과 문단 서식을 바꾸려면 서식 메뉴를 선택하십시오. 스타일을 적용할 수 있습니다.",
    "데비안은 자유 소프트웨어로 이루어진 운영 체제입니다. 패키지 관리자로 프로그램을 설치합니다.",
    "자주 묻는 질문에 대한 답을 여기에서 찾을 수 있습니다. 설치 방법과 업그레이드 방법을 설명합니다.",
    "The quick brown fox jumps over the lazy dog. 숫자 12345와 영어 단어도 섞여 있습니다.",
]

DOMAIN_TEXTS = {
    "law": KOREAN_SENTENCES[0:2],
    "office_help": KOREAN_SENTENCES[2:4],
    "faq": KOREAN_SENTENCES[4:6],
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a test module's tiny models on one intra-op thread, then restore the setting.

    For hidden sizes of 32, thread hand-off costs more than it saves: on the shared 2-core CI
    machine a forward pass measured ~10x faster on 1 thread than on 2. Test modules import this
    fixture to activate it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_tokenizer(out_dir: Path, vocab_size: int = 300):
    """Train a byte-level BPE tokenizer on :data:`KOREAN_SENTENCES`; save and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(KOREAN_SENTENCES * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.save_pretrained(out_dir)
    return hf


def build_base(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    context: int = 64,
    tie_word_embeddings: bool = False,
):
    """Save a random tiny Qwen2ForCausalLM plus tokenizer to ``out_dir``; return (model, tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    return model, tok


def build_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Path:
    """Save a peft LoRA adapter on ``base_dir`` with random (non-zero) A and B matrices."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def write_split(root: Path, domain: str, texts: list[str], repeat: int = 3) -> Path:
    """Write ``<root>/<domain>/test.parquet`` in the split schema, each text ``repeat`` times."""
    rows = [t for t in texts for _ in range(repeat)]
    path = Path(root) / domain / "test.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(doc_table(domain, [f"{domain}-{i}" for i in range(len(rows))], rows), path)
    return path


def train_lora(
    base_dir: Path, out_dir: Path, texts: list[str], *, steps: int = 30, seed: int = 0, r: int = 4, lr: float = 1e-2
) -> Path:
    """Fit a LoRA (B starts at 0, peft default) on ``texts`` for a few AdamW steps and save it:
    a real expert whose perplexity on its own texts drops below the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    torch.manual_seed(seed)
    model = get_peft_model(
        base,
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    context = base.config.max_position_embeddings
    blocks = torch.tensor(ids[: len(ids) // context * context] or ids[:context]).reshape(-1, min(context, len(ids)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=blocks, labels=blocks).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    return Path(out_dir)
