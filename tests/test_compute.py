"""The compute policy: hardware detection, what `auto` picks, threads, and that bf16 autocast really runs bf16 matmuls
while the weights stay fp32."""

from __future__ import annotations

import pytest
import torch

from domainlm.common import compute


def test_auto_picks_bf16_only_where_the_cpu_computes_it_fast():
    for flags in ({"avx512f", "amx_bf16"}, {"avx512_bf16"}):
        policy = compute.resolve({"dtype": "auto", "threads": 1}, device="cpu", flags=flags)
        assert policy.dtype == "bf16" and policy.bf16 and "auto" in policy.reason
    plain = compute.resolve({"dtype": "auto"}, device="cpu", flags={"avx2", "avx512f"})
    assert plain.dtype == "fp32" and "emulated" in plain.reason
    assert compute.resolve(None, device="cpu", flags=set()).dtype == "fp32"


def test_explicit_dtypes_and_threads_are_honoured_and_bad_values_refused():
    forced = compute.resolve({"dtype": "bf16", "threads": 3}, device="cpu", flags=set())
    assert forced.dtype == "bf16" and forced.threads == 3 and "set in params" in forced.reason
    assert compute.resolve({"dtype": "fp32"}, device="cpu", flags={"amx_bf16"}).dtype == "fp32"
    assert compute.resolve({"threads": None}, device="cpu", flags=set()).threads == compute.available_cores()
    with pytest.raises(ValueError, match="compute.dtype"):
        compute.resolve({"dtype": "fp16"}, device="cpu")
    with pytest.raises(ValueError, match="compute.threads"):
        compute.resolve({"threads": 0}, device="cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert compute.cpu_flags(info) == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert compute.cpu_flags(tmp_path / "missing") == set()


def test_bf16_autocast_runs_matmuls_in_bf16_and_leaves_weights_and_gradients_fp32():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    bf16 = compute.resolve({"dtype": "bf16", "threads": 1}, device="cpu", flags={"amx_bf16"})
    with bf16.autocast():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    with compute.resolve({"dtype": "fp32"}, device="cpu").autocast():
        assert layer(x).dtype == torch.float32
    with compute.autocast(None):
        assert layer(x).dtype == torch.float32


def test_applied_sets_and_restores_the_thread_pools_and_metrics_name_the_policy():
    before = torch.get_num_threads()
    policy = compute.ComputePolicy(dtype="fp32", threads=1, device="cpu", reason="test")
    with policy.applied():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert policy.metrics() == {"dtype": "fp32", "bf16": 0, "threads": 1, "device": "cpu"}
    assert compute.ComputePolicy("bf16", 2, "cpu").trainer_kwargs() == {"bf16": True, "use_cpu": True}
