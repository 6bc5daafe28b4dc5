"""The memory floor of a local Ray, as the dedup engine starts it: what Ray's own processes hold before
any document is read, per setting, so the Ray engine's peak RSS in ``dedup_scale.csv`` can be split into Ray's
floor and the work.

Each setting runs in a fresh process: ``ray.init`` (as :class:`domainlm.dedup.engines.RayEngine` does: local,
``num_cpus``, ``object_store_memory``, no dashboard, 127.0.0.1), then a trivial Ray Data ``map_batches`` over 2,000
rows so the worker processes and Ray Data's executor exist, then a pause. The parent samples the process tree
(the driver and every descendant: raylet, GCS, agents, workers) with psutil and records, at the sample with the
largest sum: the sum of RSS (what ``dedup_scale.py`` reports; it counts a shared page once per process that maps
it, e.g. the object store's shared memory and the shared libraries), the sum of PSS (each shared page split among
the processes that map it: the tree's real share of memory) and the three largest processes by RSS. Writes
``benchmarks/results/ray_floor.csv`` and its ``.meta.json`` sidecar (hardware, commit, date).

    python benchmarks/ray_floor.py
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from measure import write_meta

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ray_floor.csv"
#: (name, num_cpus, object_store_mb, _system_config)
SETTINGS = [
    ("engine default, 2 CPUs", 2, 512, {}),
    ("1 CPU", 1, 512, {}),
    ("1 CPU, object store 128 MB", 1, 128, {}),
    (
        "1 CPU, object store 128 MB, no prestarted workers, no metrics export",
        1,
        128,
        {"enable_worker_prestart": False, "metrics_report_interval_ms": 0},
    ),
]
CHILD = r"""
import json, logging, sys, time
import ray
num_cpus, store_mb, system_config = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
kwargs = {"_system_config": system_config} if system_config else {}
ray.init(num_cpus=num_cpus, object_store_memory=store_mb << 20, include_dashboard=False, log_to_driver=False,
         logging_level=logging.WARNING, **kwargs)
ray.data.range(2000).map_batches(lambda b: b, batch_size=100).materialize()
print("ready", flush=True)
time.sleep(float(sys.argv[4]))
ray.shutdown()
"""


def sample(pid: int) -> tuple[float, float, list[tuple[str, float]]]:
    """(sum RSS MB, sum PSS MB, [(name, rss MB)] largest first) over ``pid`` and its descendants."""
    procs = []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    rss = pss = 0.0
    top = []
    for p in procs:
        try:
            info = p.memory_full_info()
            name = " ".join(p.cmdline()[:1]).rsplit("/", 1)[-1] or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss / 2**20
        pss += getattr(info, "pss", info.rss) / 2**20
        top.append((name if name != "python" else p.name(), info.rss / 2**20))
    return rss, pss, sorted(top, key=lambda t: -t[1])


def measure(num_cpus: int, store_mb: int, system_config: dict, hold_s: float = 6.0) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(num_cpus), str(store_mb), json.dumps(system_config), str(hold_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "ready", "ray did not start"
    best = (0.0, 0.0, [])
    deadline = time.monotonic() + hold_s - 1
    n_procs = 0
    while time.monotonic() < deadline:
        rss, pss, top = sample(proc.pid)
        if rss > best[0]:
            best, n_procs = (rss, pss, top), len(top)
        time.sleep(0.2)
    proc.wait(timeout=120)
    rss, pss, top = best
    return {
        "tree_rss_mb": round(rss, 1),
        "tree_pss_mb": round(pss, 1),
        "processes": n_procs,
        "largest_rss_mb": "; ".join(f"{n} {m:.0f}" for n, m in top[:3]),
    }


def main() -> None:
    rows = []
    for name, num_cpus, store_mb, system_config in SETTINGS:
        row = {
            "setting": name,
            "num_cpus": num_cpus,
            "object_store_mb": store_mb,
            "system_config": json.dumps(system_config),
            **measure(num_cpus, store_mb, system_config),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    tmp = OUT.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, OUT)
    write_meta(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
