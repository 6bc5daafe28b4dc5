"""base_model stage (domainlm.lm.pretrain) and the shared LM data module (domainlm.lm.data): tokenizer, packing,
pretraining, HF folder, copy."""

from __future__ import annotations

import copy
import json
import math
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from lm_fixtures import TINY, TRAIN_TEXTS, WORDS, korean_docs, write_split_fixture

from domainlm.lm import data as lm_data
from domainlm.lm import pretrain
from stages import base_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def built():
    """One tiny pretraining run shared by the tests: (model, tokenizer, stats)."""
    return pretrain.build(TRAIN_TEXTS, TINY)


def test_tokenizer_round_trips_korean_and_other_scripts():
    tok = lm_data.train_bpe_tokenizer([t for v in TRAIN_TEXTS.values() for t in v], vocab_size=300)
    assert len(tok) == 300
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    samples = [
        "대한민국은 민주공화국이다. 모든 국민은 법 앞에 평등하다.",
        "셀 A1에 =SUM(B1:B9)를 입력하십시오.\n\t들여쓰기와 줄바꿈도 그대로.",
        "日本語とEnglish, Ελληνικά, emoji 🎉, 한자 憲法, 옛한글 ᄒᆞᆫ글",
    ]
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    # Jamo-aware: decomposed (NFD) Hangul encodes exactly like the precomposed syllables.
    nfc = "국민의 권리와 의무"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    assert tok(nfd)["input_ids"] == tok(nfc)["input_ids"]
    # BPE learned Hangul merges: fewer tokens than UTF-8 bytes on in-domain text.
    text = TRAIN_TEXTS["law"][0]
    assert len(tok(text)["input_ids"]) < 0.6 * len(text.encode("utf-8"))


def test_tokenizer_rejects_vocab_below_byte_alphabet():
    with pytest.raises(ValueError, match="vocab_size=100"):
        lm_data.train_bpe_tokenizer(["가나다"], vocab_size=100)


def test_pack_blocks_keeps_every_token_and_masks_padding(built):
    _, tok, _ = built
    texts = TRAIN_TEXTS["faq"][:3]
    blocks = lm_data.pack_blocks(tok, texts, 16)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_blocks = math.ceil(len(stream) / 16)
    assert blocks["input_ids"].shape == (n_blocks, 16) and blocks["input_ids"].dtype == torch.long
    kept = blocks["input_ids"][blocks["attention_mask"].bool()].tolist()
    assert kept == stream
    pad = blocks["attention_mask"] == 0
    assert pad.sum() == n_blocks * 16 - len(stream)
    assert (blocks["labels"][pad] == lm_data.IGNORE_INDEX).all()
    assert (blocks["labels"][~pad] == blocks["input_ids"][~pad]).all()
    assert lm_data.n_target_tokens(blocks) == int((blocks["labels"][:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="no texts"):
        lm_data.pack_blocks(tok, [], 16)


def test_evenly_spaced_blocks_subsample_covers_the_split():
    ids = torch.arange(10).view(10, 1).repeat(1, 4)
    blocks = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    sub = lm_data.evenly_spaced_blocks(blocks, 4)
    assert sub["input_ids"][:, 0].tolist() == [0, 3, 6, 9]
    assert all(v.shape == (4, 4) for v in sub.values())
    assert lm_data.evenly_spaced_blocks(blocks, None) is blocks
    assert lm_data.evenly_spaced_blocks(blocks, 50) is blocks


def test_mean_nll_is_token_weighted_whatever_the_batching(built):
    model, tok, _ = built
    blocks = lm_data.pack_blocks(tok, TRAIN_TEXTS["law"][:5], 32)  # last block padded: uneven token counts
    assert (blocks["attention_mask"][-1] == 0).any()
    one, n1 = lm_data.mean_nll(model, blocks, batch_size=1)
    many, n2 = lm_data.mean_nll(model, blocks, batch_size=3)
    assert n1 == n2 == lm_data.n_target_tokens(blocks)
    assert one == pytest.approx(many, rel=1e-5)


def test_build_learns_and_saves_a_loadable_hf_folder(built, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, stats = built
    assert stats["final_loss"] < 0.6 * math.log(len(tok))  # well below the uniform-guess loss
    assert stats["tokens_seen"] > 0 and stats["tokens_per_s"] > 0

    out = pretrain.save_hf_folder(model, tok, tmp_path / "models" / "base")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["base"]  # no temp sibling left behind
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    loaded_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert loaded.config.model_type == "qwen2"
    assert loaded.config.max_position_embeddings == TINY["model"]["context_length"]
    assert loaded_tok.eos_token_id == loaded.config.eos_token_id == tok.eos_token_id
    text = TRAIN_TEXTS["law"][1]
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"][:32]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_the_configured_sizes(built, tied):
    from transformers import Qwen2ForCausalLM

    _, tok, _ = built
    sizes = {**TINY["model"], "tie_word_embeddings": tied}
    model = Qwen2ForCausalLM(pretrain.qwen2_config(tok, sizes))
    assert model.num_parameters() == pretrain.qwen2_param_count(len(tok), sizes)


def test_default_params_configure_about_five_million_parameters():
    with open("params.yaml", encoding="utf-8") as fh:
        params = yaml.safe_load(fh)["base_model"]
    n = pretrain.qwen2_param_count(params["tokenizer"]["vocab_size"], params["model"])
    assert 4_000_000 <= n <= 6_000_000


def test_build_is_deterministic(built):
    model, _, stats = built
    again, _, stats2 = pretrain.build(TRAIN_TEXTS, TINY)
    assert stats2["final_loss"] == stats["final_loss"]
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_batches_cover_every_block_each_epoch():
    stream = pretrain.batches(10, 4, seed=0)
    first = torch.cat([next(stream) for _ in range(5)]).tolist()  # 20 indices = 2 epochs
    assert sorted(first) == sorted(list(range(10)) * 2)


def test_source_path_copies_a_checkpoint(built, tmp_path):
    model, tok, _ = built
    src = pretrain.save_hf_folder(model, tok, tmp_path / "ckpt")
    out = pretrain.copy_checkpoint(src, tmp_path / "models" / "base")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_source_path_missing_or_not_a_causal_lm_gives_a_clear_error(tmp_path):
    from transformers import BertConfig, ViTConfig

    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        pretrain.copy_checkpoint(missing, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrain.copy_checkpoint(tmp_path / "empty", tmp_path / "out")
    for name, config in {
        "vit": ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8),
        "bert_classifier": BertConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=8,
            architectures=["BertForSequenceClassification"],
        ),
    }.items():
        config.save_pretrained(tmp_path / name)
        (tmp_path / name / "tokenizer.json").write_text("{}", encoding="utf-8")
        with pytest.raises(ValueError, match="not a causal LM"):
            pretrain.copy_checkpoint(tmp_path / name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_texts_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.parquet"):
        lm_data.read_texts(lm_data.split_path(tmp_path, "law", "train"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["가"]}), bad)
    with pytest.raises(ValueError, match="no 'text' column"):
        lm_data.read_texts(bad)


@pytest.mark.slow
def test_main_writes_model_metrics_and_mlflow_run(tmp_path, monkeypatch):
    import mlflow

    doms = list(WORDS)
    write_split_fixture(tmp_path / "data" / "lm", {d: korean_docs(d, 12) for d in doms})
    params = {"domains": doms, "base_model": copy.deepcopy(TINY)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)

    base_model.main()

    metrics = json.loads((tmp_path / "metrics" / "base_model.json").read_text(encoding="utf-8"))
    assert set(metrics["val_perplexity"]) == set(doms)
    vocab = TINY["tokenizer"]["vocab_size"]
    assert all(1.0 < p < vocab for p in metrics["val_perplexity"].values())  # better than a uniform guess
    for key in ("train_loss", "tokens_seen", "tokens_per_s", "n_params", "wall_s"):
        assert metrics[key] > 0, key
    assert (tmp_path / "models" / "base" / "model.safetensors").exists()
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("domain-lm").experiment_id])
    assert [r.data.tags["dvc.stage"] for r in runs] == ["base_model"]
    assert runs[0].data.metrics["n_params"] == metrics["n_params"]
    assert runs[0].data.params["model.hidden_size"] == "32"
