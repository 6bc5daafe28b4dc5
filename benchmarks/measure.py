"""What the benchmarks share: the set-up of an alternating run on the built pipeline, train_classifier's gate
attempts outside the stage, the steal time of a virtual machine during a measurement (CPU time its host gave to
other guests), and writing a result table with a ``.meta.json`` sidecar that records the hardware, commit and date.

Imported by the benchmark scripts, which run as ``python benchmarks/<name>.py`` (this folder is then on
``sys.path``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def proc_status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``: current RSS; ``VmHWM``: peak RSS since the process began
    or since ``/proc/self/clear_refs`` was written ``5``), MiB; NaN when the line is missing."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mb() -> float:
    """This process's peak RSS (``VmHWM``), MiB."""
    return proc_status_mb("VmHWM")


def vm_rss_mb() -> float:
    """This process's current RSS (``VmRSS``), MiB."""
    return proc_status_mb("VmRSS")


def alternating_run(doc: str) -> tuple[argparse.Namespace, dict[str, Any], Any]:
    """Set up a benchmark that alternates settings over ``--rounds`` rounds on this checkout's built pipeline:
    parse ``--rounds`` (default 2; ``doc``'s first line is the help text), work from the repository root with
    WARNING logging, load ``params.yaml`` and apply its compute policy to this process.

    Returns:
        ``(args, params, compute)``: the parsed arguments, the params dict and the applied
        :class:`domainlm.common.compute.ComputePolicy`.
    """
    from domainlm.common import params as P
    from domainlm.common.compute import resolve

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.chdir(ROOT)
    logging.basicConfig(level=logging.WARNING)
    prm = P.load_params()
    compute = resolve(prm.get("compute"))
    compute.apply()
    return args, prm, compute


def deep_update(d: dict, overrides: Mapping[str, Any]) -> dict:
    """Merge ``overrides`` into ``d`` in place, nested dicts key by key; returns ``d``."""
    for k, v in overrides.items():
        if isinstance(v, Mapping):
            deep_update(d.setdefault(k, {}), v)
        else:
            d[k] = v
    return d


def gate_attempts(
    cfg: Mapping[str, Any], splits: Mapping[str, Any], classes: Sequence[str], compute, work: str | Path, retries: int
) -> Iterator[dict[str, Any]]:
    """train_classifier's gate attempts with every retry spent, outside the stage (no MLflow, no registry): attempt 0
    from ``models/merged``, then ``retries`` retries each continuing the previous attempt's saved adapter, with the
    stage's own ``attempt_settings``, ``train_attempt``, ``predict_proba`` on the test split (source labels),
    ``score`` and ``save_classifier`` (into ``work``).

    Yields one dict per attempt: ``attempt``, ``info`` (``train_attempt``'s), ``test_macro_f1``, ``train_s`` (wall
    seconds of ``train_attempt``: steps, validation, any compile), ``predict_save_s`` (test prediction + save).
    """
    import time

    from domainlm.classify.gate import attempt_settings
    from domainlm.classify.metrics import score
    from domainlm.classify.model import ADAPTER_SUBDIR, predict_proba, save_classifier
    from domainlm.classify.training import train_attempt, windows_params

    _, n_predict = windows_params(cfg)
    test, previous = splits["test"], None
    for attempt in range(int(retries) + 1):
        t0 = time.perf_counter()
        model, tok, info = train_attempt(
            "models/merged",
            splits["train"],
            splits["val"],
            classes,
            cfg,
            attempt_settings(cfg["train"], cfg["gate"], attempt),
            seed=int(cfg.get("seed", 0)) + attempt,
            init_adapter=Path(previous) / ADAPTER_SUBDIR if previous else None,
            compute=compute,
        )
        t1 = time.perf_counter()
        proba = predict_proba(
            model,
            tok,
            test.texts,
            max_length=int(cfg["max_length"]),
            batch_size=int(cfg["train"]["eval_batch_size"]),
            max_windows=n_predict,
            compute=compute,
        )
        previous = save_classifier(model, tok, Path(work) / f"attempt_{attempt}")
        yield {
            "attempt": attempt,
            "info": info,
            "test_macro_f1": score(test.labels, proba, classes)["macro_f1"],
            "train_s": t1 - t0,
            "predict_save_s": time.perf_counter() - t1,
        }


def steal_s(stat: str | Path = "/proc/stat") -> float:
    """Steal time since boot in CPU seconds, summed over cores: time a virtual machine's CPUs were ready to run but
    the host ran something else (the ``steal`` column of ``/proc/stat``'s ``cpu`` line, in USER_HZ = 100 ticks per
    second); 0 where the kernel does not report it. A difference over a timed run tells whether the machine was
    really idle."""
    fields = Path(stat).read_text().splitlines()[0].split()
    return int(fields[8]) / 100.0 if len(fields) > 8 else 0.0


META_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")


def _git(*args: str) -> str:
    """``git <args>`` in the repository root, stripped; ``""`` when git fails or is missing."""
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_meta(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The machine a benchmark runs on: ``cpu_model`` (``model name`` of ``cpuinfo``; None where it has none),
    ``cores`` (``os.cpu_count()``), ``flags`` (``{flag: bool}`` for :data:`META_FLAGS`) and ``hardware``, the
    same in one line (``"Intel(R) Xeon(R) Platinum 8480+, 2 cores, AVX-512, AVX512-BF16, AMX-BF16"``)."""
    model, flags = None, set()
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip() or None
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    have = {f: f in flags for f in META_FLAGS}
    names = {"avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
    cores = os.cpu_count()
    parts = [model or "CPU model not recorded", f"{cores} cores"] + [names[f] for f in META_FLAGS if have[f]]
    if not flags:
        parts.append("CPU flags not recorded")
    elif not have["avx512_bf16"] and not have["amx_bf16"]:
        parts.append("no bf16 instructions")
    return {"hardware": ", ".join(parts), "cpu_model": model, "cores": cores, "flags": have}


def write_meta(result_path: str | Path, **extra: Any) -> Path:
    """Write ``<result_path>.meta.json`` beside a benchmark result: the hardware (:func:`machine_meta`), ``commit``
    (``git rev-parse --short HEAD``), ``dirty`` (tracked files outside ``benchmarks/results/`` differ from that
    commit), ``date`` (UTC, ISO 8601, seconds), ``python`` and ``torch`` versions (torch None when not installed),
    then ``extra``. The docs' benchmark page reads it (``docs/scripts/tables.py``). Returns the sidecar's path."""
    import platform
    from datetime import UTC, datetime
    from importlib import metadata

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    meta = {
        **machine_meta(),
        "commit": _git("rev-parse", "--short", "HEAD") or None,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch_version,
        **extra,
    }
    path = Path(result_path)
    meta_path = path.with_name(path.name + ".meta.json")
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return meta_path


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], **meta: Any) -> Path:
    """Write ``rows`` (dicts with the same keys, the first row's order) as a CSV with a header, and its
    ``.meta.json`` sidecar (:func:`write_meta`, with ``meta`` added); returns the CSV's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_meta(path, **meta)
    return path
