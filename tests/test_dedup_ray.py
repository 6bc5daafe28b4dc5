"""The Ray engine of dedup (domainlm.dedup.engines.RayEngine) with real Ray on 127.0.0.1: a local Ray started by
the stage, and a two-node ``ray.cluster_utils.Cluster`` (two raylets on this machine). Both must produce the
local engine's outputs byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Loopback only: Ray reads this when it is first imported, so it is set before any test imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from test_dedup import OUTPUTS, PARAMS, corpus, run_stage, write_inputs  # noqa: F401  (corpus is a fixture)

from domainlm.dedup import workflow

ROOT = Path(__file__).resolve().parents[1]


def same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_local_ray_is_byte_identical_resumes_local_work_and_raises_task_errors(tmp_path, corpus, monkeypatch):
    import ray

    write_inputs(tmp_path, corpus)
    inputs = dict(input_dir=tmp_path / "validated")
    local = run_stage(PARAMS, ["law", "faq"], output_dir=tmp_path / "local", **inputs)
    # a local run that dies in `verify` leaves its completed steps; the Ray run resumes from them
    with monkeypatch.context() as m:
        m.setattr(workflow.Workflow, "_verify", lambda self: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            run_stage(PARAMS, ["law", "faq"], output_dir=tmp_path / "ray", work_dir=tmp_path / "work", **inputs)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    metrics = run_stage(
        PARAMS,
        ["law", "faq"],
        output_dir=tmp_path / "ray",
        work_dir=tmp_path / "work",
        engine="ray",
        ray={"address": None, "object_store_mb": 128},
        **inputs,
    )
    assert not ray.is_initialized()  # the Ray it started is shut down
    assert metrics["ray_engine"] == 1 and metrics["ray_nodes"] == 1 and metrics["resumed_steps"] == 6
    assert metrics["verified_pairs"] == local["verified_pairs"] > 0
    same_outputs(tmp_path / "local", tmp_path / "ray")

    # a bad record inside a Ray task surfaces as the stage's own error, naming file and line
    (tmp_path / "validated" / "faq.jsonl").write_text('{"id": "q", "text": "가나다 라마", "domain": "law"}\n')
    with pytest.raises(ValueError, match=r"faq.jsonl:1: record domain 'law' != file domain 'faq'"):
        run_stage(
            PARAMS,
            ["law", "faq"],
            output_dir=tmp_path / "bad",
            engine="ray",
            ray={"address": None, "object_store_mb": 128},
            **inputs,
        )
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_two_node_cluster_runs_tasks_on_both_nodes_with_identical_outputs(tmp_path, corpus, monkeypatch):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every raylet on 127.0.0.1 ...
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # ... even if ray was imported before
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the nodes share this checkout: no code shipping
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_inputs(tmp_path, corpus)
    inputs = dict(input_dir=tmp_path / "validated")
    run_stage(PARAMS, ["law", "faq"], output_dir=tmp_path / "local", **inputs)
    node_args = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    try:
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        assert cluster.address.startswith("127.0.0.1:")
        metrics = run_stage(
            PARAMS,
            ["law", "faq"],
            output_dir=tmp_path / "ray",
            engine="ray",
            ray={"address": cluster.address, "ship_code": False},
            **inputs,
        )
    finally:
        cluster.shutdown()
    assert metrics["ray_engine"] == 1 and metrics["ray_nodes"] == 2  # tasks ran on both raylets
    same_outputs(tmp_path / "local", tmp_path / "ray")
    assert json.loads((tmp_path / "ray" / "candidates.json").read_text())["pairs"]
