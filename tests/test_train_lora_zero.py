"""DeepSpeed ZeRO-2 through train_lora on DeepSpeed's CPU accelerator (domainlm.common.zero): the enabled switch, the
CPU adaptation of the shipped config, the accelerate/transformers pitfalls, and a real two-rank run over gloo on
127.0.0.1 launched as ``torchrun --nproc_per_node 2 -m stages.train_lora faq`` against a plain single-process run."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, free_port
from lm_fixtures import TINY, TRAIN_TEXTS, korean_docs, write_split_fixture
from safetensors.torch import load_file

from domainlm.common import paths, zero
from domainlm.lm import data as lm_data
from domainlm.lm import lora, pretrain

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks DeepSpeed on its CPU accelerator")
# The first steps' training losses of 2 ZeRO-2 ranks x 4 blocks must equal a single process's on 8 blocks within this
# relative tolerance. Both runs are fp32 on the same global batches (accelerate shards one seeded permutation), so
# they differ only by summation order (loss mean over ranks, gradient all-reduce) and DeepSpeedCPUAdam vs torch AdamW:
# measured ~1e-7 on step 1 and 0 after it.
LOSS_RTOL = 1e-5
STEPS = 4


def shipped() -> dict:
    with open(ROOT / "params.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)["train_lora"]["deepspeed"]


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------------- config, switch
def test_cpu_config_changes_only_the_named_keys_and_passes_every_other_through():
    config = shipped()["config"]
    before = copy.deepcopy(config)
    adapted, changes = zero.cpu_config(config)
    assert config == before  # the shipped config is not modified
    changed = {c.key: c for c in changes}
    assert set(changed) == {"bf16.enabled"}  # the documented list (domainlm/common/zero.py, docs)
    flat_shipped, flat_adapted = flatten(config), flatten(adapted)
    for key, value in flat_shipped.items():
        if key in changed:
            assert changed[key].shipped == value
            assert flat_adapted.get(key, "<removed>") == changed[key].used
            assert len(changed[key].reason) > 40
        else:
            assert flat_adapted[key] == value, key
    assert set(flat_adapted) <= set(flat_shipped)
    assert flat_adapted["zero_optimization.stage"] == 2 and flat_adapted["optimizer.type"] == "AdamW"
    # a key already at its CPU value is not reported as a change
    assert zero.cpu_config(adapted) == (adapted, [])


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (None, "auto"), (True, True), (False, False)])
def test_enabled_accepts_auto_true_false(value, expected):
    assert zero.parse_enabled(value) == expected


@pytest.mark.parametrize("value", ["true", "yes", 1, 0, "on"])
def test_enabled_rejects_anything_else(value):
    with pytest.raises(ValueError, match="auto, true or false"):
        lora.deepspeed_config({"enabled": value, "config": shipped()["config"]})


def test_enabled_false_and_empty_config(caplog):
    assert lora.deepspeed_config({"enabled": False, "config": shipped()["config"]}) is None
    with pytest.raises(ValueError, match="config is empty"):
        lora.deepspeed_config({"enabled": True, "config": {}})
    with caplog.at_level(logging.WARNING, logger="domainlm.lm.lora"):
        assert lora.deepspeed_config({"enabled": "auto", "config": {}}) is None
    assert "config is empty" in caplog.text


@no_cuda
def test_enabled_true_without_cuda_adapts_the_config_and_says_why(monkeypatch, caplog):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with caplog.at_level(logging.WARNING, logger="domainlm.lm.lora"):
        config = lora.deepspeed_config(shipped() | {"enabled": True})
    assert config == zero.cpu_config(shipped()["config"])[0]
    assert "bf16.enabled True -> False" in caplog.text and "bypasses DeepSpeed" in caplog.text


@no_cuda
def test_transformers_refuses_bf16_without_cuda_unless_use_cpu(tmp_path):
    """Why ZeRO on CPU sets ``bf16.enabled`` to False: use_cpu=False (which DeepSpeed needs) and bf16=True cannot go
    together without CUDA."""
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="bf16"):
        TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=False, report_to="none")


def test_launch_env_makes_a_world_of_one_on_loopback(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    env = zero.launch_env()
    assert env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    assert zero.launch_env() == {}  # a launcher's (or a previous call's) variables are kept
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        zero.launch_env()


# ------------------------------------------------------------------------------------------------- two CPU ranks
def torchrun(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port <free> <args>`` with the venv first on
    PATH."""
    full = dict(os.environ)
    full.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{full.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        },
        **(env or {}),
    )
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(k, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.mark.slow
@no_cuda
def test_accelerate_pitfalls_on_two_cpu_ranks(tmp_path):
    """What init_cpu_process_group works around, seen on 2 real ranks: left alone, accelerate brings DeepSpeed's
    process group up but counts one process on each rank; use_cpu=True gives plain multi-CPU, not DeepSpeed."""
    config = zero.cpu_config(shipped()["config"])[0]
    torchrun([str(ROOT / "tests" / "zero_pitfalls.py"), str(tmp_path), json.dumps(config)], tmp_path)
    ranks = [json.loads((tmp_path / f"pitfalls_rank{r}.json").read_text()) for r in (0, 1)]
    for r, rec in enumerate(ranks):
        assert rec["default"] == {
            "distributed_type": "DistributedType.DEEPSPEED",
            "num_processes": 1,
            "process_index": 0,
            "world_size": 1,
        }
        assert rec["use_cpu"]["distributed_type"] == "DistributedType.MULTI_CPU"
        assert rec["configured"] == {
            "distributed_type": "DistributedType.DEEPSPEED",
            "num_processes": 2,
            "process_index": r,
            "world_size": 2,
        }


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """``torchrun --nproc_per_node 2 -m stages.train_lora faq`` with ``deepspeed.enabled: true`` in a fresh folder.

    Returns ``(root, params, probe records by rank)``; the probe folder is ``$DOMAINLM_ZERO_PROBE_DIR``.
    """
    if torch.cuda.is_available():
        pytest.skip("checks DeepSpeed on its CPU accelerator")
    root = tmp_path_factory.mktemp("zero")
    model, tok, _ = pretrain.build(TRAIN_TEXTS, TINY)
    pretrain.save_hf_folder(model, tok, root / "models" / "base")
    write_split_fixture(root / "data" / "lm", {d: korean_docs(d, 20) for d in TRAIN_TEXTS})
    params = {
        "seed": 3,
        "lora": {
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        "train": {
            "context_length": None,
            "max_steps": STEPS,
            "max_epochs": 100,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "lr": 1.0e-2,
            "weight_decay": 0.0,
            "warmup_steps": 0,
            "grad_clip": 1.0,
            "eval_steps": 2,
            "logging_steps": 1,
            "eval_batch_size": 8,
            "eval_max_blocks": None,
        },
        "deepspeed": shipped() | {"enabled": True},  # the shipped config, as in params.yaml
    }
    # fp32 and one thread per rank: ZeRO on CPU trains in fp32 (zero.cpu_config), and the single-process reference
    # below runs without a compute policy, i.e. in fp32 too
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {"domains": list(TRAIN_TEXTS), "train_lora": params, "compute": {"dtype": "fp32", "threads": 1}}
        ),
        encoding="utf-8",
    )
    torchrun(
        ["-m", "stages.train_lora", "faq"],
        root,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", zero.PROBE_ENV: str(root / "probe")},
    )
    probes = [json.loads((root / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root, params, probes


@pytest.mark.slow
def test_zero2_engine_on_two_gloo_ranks_with_the_shipped_optimizer(zero_run):
    _, _, probes = zero_run
    for r, p in enumerate(probes):
        assert p["rank"] == r and p["trainer_process_index"] == r
        assert p["engine_class"] == "deepspeed.runtime.engine.DeepSpeedEngine"
        assert p["zero_stage"] == 2
        assert p["engine_world_size"] == p["dp_world_size"] == p["dist_world_size"] == p["trainer_world_size"] == 2
        assert p["dist_backend"] == "gloo" and p["accelerator"] == "cpu"
        # offload_optimizer: cpu -> ZeRO-2's partitioned optimizer around DeepSpeed's CPU Adam (a JIT-built op)
        assert p["optimizer_class"] == "DeepSpeedZeroOptimizer" and p["basic_optimizer_class"] == "DeepSpeedCPUAdam"
        assert p["bf16"] is False


@pytest.mark.slow
def test_base_weights_stay_frozen(zero_run):
    _, _, probes = zero_run
    for p in probes:
        assert p["base_digest_before"] == p["base_digest_after"]
        assert p["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in p["trainable"])


@pytest.mark.slow
def test_first_losses_match_a_single_process_on_the_same_global_batch(zero_run, tmp_path):
    root, params, probes = zero_run
    single = copy.deepcopy(params)
    single["deepspeed"]["enabled"] = False
    single["train"]["batch_size"] = 2 * params["train"]["batch_size"]  # one process, the global batch of 2 ranks
    split = root / "data" / "lm"
    lora.train_adapter(
        root / "models" / "base",
        lm_data.read_texts(paths.split_path(split, "faq", "train")),
        lm_data.read_texts(paths.split_path(split, "faq", "val")),
        single,
        tmp_path / "adapter",
        tmp_path / "single.log",
    )
    plain = {
        r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "single.log").read_text().splitlines()) if "loss" in r
    }
    zero2 = {
        r["step"]: r["loss"]
        for r in map(json.loads, (root / "logs" / "train_faq.log").read_text().splitlines())
        if "loss" in r
    }
    assert sorted(plain) == sorted(zero2) == list(range(1, STEPS + 1))
    for step in plain:
        assert zero2[step] == pytest.approx(plain[step], rel=LOSS_RTOL), step
    # rank 1 logged the same (all-reduced) losses as rank 0's log file holds
    assert {h["step"]: h["loss"] for h in probes[1]["log_history"] if "loss" in h} == zero2


@pytest.mark.slow
def test_rank0_alone_writes_and_its_adapter_loads_back_in_one_cpu_process(zero_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, probes = zero_run
    assert [p["saved_adapter"] for p in probes] == [True, False]
    assert [p.name for p in (root / "models" / "lora").iterdir()] == ["faq"]  # no temp sibling left
    runs = (root / "logs" / "pipeline_run.log").read_text().splitlines()
    assert len(runs) == 1 and runs[0].startswith("train_lora@faq\t") and "\tok\t" in runs[0]  # one stage_run: rank 0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("domain-lm").experiment_id])) == 1
    metrics = json.loads((root / "metrics" / "train_lora" / "faq.json").read_text())
    assert metrics["deepspeed"] == 1 and metrics["steps"] == 4
    assert metrics["tokens_seen"] == STEPS * 8 * TINY["model"]["context_length"]  # 2 ranks x 4 blocks per step

    base = root / "models" / "base"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, local_files_only=True), root / "models" / "lora" / "faq"
    )
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    val = lm_data.pack_blocks(
        tok,
        lm_data.read_texts(paths.split_path(root / "data" / "lm", "faq", "val")),
        TINY["model"]["context_length"],
    )
    nll, _ = lm_data.mean_nll(model, val)
    assert nll == pytest.approx(metrics["val_loss"], abs=1e-5)
    assert metrics["val_loss"] < metrics["base_val_loss"]  # the adapter learned something


@pytest.mark.slow
def test_both_ranks_end_with_identical_lora_weights(zero_run):
    root, _, _ = zero_run
    r0, r1 = (load_file(root / "probe" / f"rank{r}_lora.safetensors") for r in (0, 1))
    saved = load_file(root / "models" / "lora" / "faq" / "adapter_model.safetensors")
    assert r0.keys() == r1.keys() == saved.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], saved[k].float()), k
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in r0.items())  # trained: B moved off zero
