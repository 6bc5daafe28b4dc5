"""Days of the production loop on the bundled corpus: what a day's new documents cost, against a round that rebuilds
the LM, measured in the same run.

The repository is a copy of this one's pipeline in a temporary git + DVC repository (local DVC remote, its own MLflow
store), with office_help read as a declared ``type: jsonl`` source: a seeded 90% of its pages land on day 1, and the
rest in equal drops on the following days (``--drops``; default two, 5% each). Every other setting is
``params.yaml``'s, the classifier gate included.

- **day 1**: the first round: it cuts LM release 1, builds the LM from it, trains the classifier and promotes it
  when it passes the gate.
- **day 2, day 3, ...**: a drop of office_help pages arrives; one round each. No LM stage may run; the deployed
  classifier, once there is one, is scored first and kept (or continued when it fails the gate); with nothing
  deployed (day 1's gate failed) the day trains a classifier afresh.
- **release day**: ``release-lm`` then one round: the LM is rebuilt from the new release and a classifier trained on
  it enters as the challenger. This is the same-run baseline: it is the work a round did every day when new documents
  rebuilt the LM.

Per day (``benchmarks/results/round_days.csv``): ``wall_s`` (the round, plus ``release-lm`` on the release day),
``stages_run``, ``lm_stages_run``, ``start_case``, ``attempts``, ``retries``, ``decision``, ``base_changed`` and
``merged_changed`` (``models/base`` and ``models/merged`` differ from the day before), ``new_test_docs`` and the
deployed model's macro-F1 on them, ``test_macro_f1`` of the kept model, and ``peak_rss_mb`` (the largest process of
the day: ``ru_maxrss`` of the waited-for children). ``round_days.json`` adds the bars: day 2 at most 180 s plus 60 s
per retry spent, with no LM stage, and the deployed model scored first, checked on the first day of new documents
that has a deployed model.

Usage, from the repository root: ``python benchmarks/round_days.py [--work DIR] [--keep] [--day1-fraction 0.9]
[--drops 2] [--resume]``. About 45 minutes on 2 idle cores (day 1 and the release day each build the LM and a
classifier). The model server is not started (``round --no-deploy``). Each finished day's row is saved in
``<work>/rows.json``; ``--resume`` with the same ``--work`` skips those days (the repository must be at the last
finished day's commit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import measure  # noqa: E402

from domainlm.classify.deployed import tree_sha256  # noqa: E402
from domainlm.documents.corpus import builtin_documents  # noqa: E402
from domainlm.documents.jsonl import dumps  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PIPELINE_FILES = (
    "stages",
    "domainlm",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    "reports/summary.ipynb",
    "benchmarks/results/io_speed.csv",
)
LM_STAGES = ("base_model", "train_lora", "diff", "merge", "evaluate_experts", "evaluate")
DOMAIN = "office_help"
DAY2_BAR_S, RETRY_ALLOWANCE_S = 180.0, 60.0


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def domain_records(seed: int) -> tuple[list[dict[str, str]], list[int]]:
    """``DOMAIN``'s documents from its package source in ``params.yaml`` as JSONL records (``id``, ``text``,
    ``label``), and their indices in an order shuffled by ``seed`` (which pages arrive when)."""
    spec = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["corpus"]["sources"][DOMAIN]
    docs, _ = builtin_documents(DOMAIN, spec, ROOT / ".cache" / "corpus")
    records = [{"id": d.id, "text": d.text, "label": d.label} for d in docs]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return records, order


def round_env(mlflow_db: Path) -> dict[str, str]:
    """The environment a benchmark round runs in: this interpreter's ``bin`` first on ``PATH``, the MLflow store at
    ``mlflow_db``, offline Hugging Face, no DVC analytics."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
    }


def read_domain_from(repo: Path, incoming: Path) -> None:
    """Make ``repo``'s pipeline read ``DOMAIN`` from the JSONL files in ``incoming`` (a dep of the corpus stage), with
    the corpus cache of this repository; nothing is committed."""
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["corpus"]["cache_dir"] = str(ROOT / ".cache" / "corpus")
    params["corpus"]["sources"][DOMAIN] = {"type": "jsonl", "uri": str(incoming / "*.jsonl")}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))
    dvc_yaml["stages"]["corpus"]["deps"].append(str(incoming))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, allow_unicode=True, sort_keys=False), encoding="utf-8")


def make_repo(work: Path, incoming: Path) -> Path:
    """A git + DVC repository at ``work/repo`` holding this pipeline, with ``DOMAIN`` read from ``incoming``."""
    from domainlm.documents.labels import write_empty_overrides
    from domainlm.documents.release import write_bootstrap as write_release
    from domainlm.rounds.promotion import write_bootstrap as write_deployed

    repo = work / "repo"
    repo.mkdir(parents=True)
    for name in PIPELINE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    read_domain_from(repo, incoming)
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "bench@example.com"],
        ["git", "config", "user.name", "bench"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.autostage", "true"],
        ["dvc", "remote", "add", "-d", "local", str(work / "dvcstore")],
    ):
        sh(cmd, repo)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    write_empty_overrides(repo / "data" / "labels" / "overrides.parquet")
    write_deployed(repo / "models" / "deployed")
    write_release(repo / "data" / "release")
    for target in ("data/labels/overrides.parquet", "models/deployed", "data/release"):
        sh(["dvc", "add", "-q", target], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "pipeline"], repo)
    return repo


#: Runs a command in a fresh wrapper process and prints the largest ``ru_maxrss`` (KiB) of its descendants last, so
#: each day's peak is its own (``RUSAGE_CHILDREN`` of this process only ever grows).
WRAPPER = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
    "sys.stderr.write(f'\\nRU_MAXRSS_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n'); "
    "sys.exit(p.returncode)"
)


def measured(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``cmd`` under :data:`WRAPPER`; return the finished process and the peak RSS (KiB) of its largest process."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, capture_output=True, text=True, env=env)
    kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("RU_MAXRSS_KB ")]
    return proc, (kb[-1] if kb else 0)


def run_day(repo: Path, env: dict[str, str], *, release: bool) -> dict[str, Any]:
    """One day: ``release-lm`` first when ``release``, then a round; returns the row."""
    base = tree_sha256(repo / "models" / "base") if (repo / "models" / "base").exists() else None
    merged = tree_sha256(repo / "models" / "merged") if (repo / "models" / "merged").exists() else None
    t0 = time.perf_counter()
    peak_kb = 0
    if release:
        cut, kb = measured([sys.executable, "-m", "domainlm.rounds", "release-lm"], repo, env)
        if cut.returncode != 0:
            raise RuntimeError(f"release-lm exited {cut.returncode}:\n{(cut.stdout + cut.stderr)[-4000:]}")
        peak_kb = kb
    proc, kb = measured([sys.executable, "-m", "domainlm.rounds", "round", "--no-deploy"], repo, env)
    peak_kb = max(peak_kb, kb)
    wall = time.perf_counter() - t0
    (repo.parent / "logs").mkdir(exist_ok=True)
    log = repo.parent / "logs" / f"round-{len(list((repo.parent / 'logs').iterdir())) + 1}.log"
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in (0, 2) or not lines or not lines[-1].startswith('{"decision"'):
        raise RuntimeError(f"round exited {proc.returncode}; see {log}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary = json.loads(lines[-1])
    metrics = json.loads((repo / "metrics" / "classifier.json").read_text(encoding="utf-8"))
    new = metrics.get("new_data") or {}
    ran = summary["ran"]
    return {
        "wall_s": round(wall, 1),
        "exit_code": proc.returncode,
        "stages_run": len(ran),
        "lm_stages_run": sum(1 for s in ran if s.split("@")[0] in LM_STAGES),
        "stages": " ".join(ran),
        "lm_release": (summary.get("lm_release") or {}).get("number"),
        "start_case": metrics["start"]["case"],
        "attempts": metrics["gate"]["attempts"],
        "retries": metrics["gate"]["retries"],
        "decision": summary["decision"]["action"],
        "base_changed": int(base is not None and tree_sha256(repo / "models" / "base") != base),
        "merged_changed": int(merged is not None and tree_sha256(repo / "models" / "merged") != merged),
        "test_docs": metrics["docs"]["test"],
        "new_test_docs": new.get("test_docs", 0),
        "deployed_new_test_macro_f1": ((new.get("deployed") or {}).get("macro_f1")),
        "deployed_test_macro_f1": metrics["start"].get("deployed_test_macro_f1"),
        "test_macro_f1": metrics["lora"]["macro_f1"],
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "train_classifier_s": metrics.get("stage", {}).get("wall_s"),
    }


def write_part(incoming: Path, k: int, records: list[dict], part: list[int]) -> None:
    """Day ``k + 1``'s drop: ``part-<k>.jsonl`` with the records at ``part``."""
    (incoming / f"part-{k:03d}.jsonl").write_text("".join(dumps(records[i]) + "\n" for i in part), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--day1-fraction", type=float, default=0.9)
    parser.add_argument("--drops", type=int, default=2, help="days that each bring an equal share of the rest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="skip the days <work>/rows.json already holds")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="round_days-"))
    work.mkdir(parents=True, exist_ok=True)
    incoming = work / "incoming" / DOMAIN
    incoming.mkdir(parents=True, exist_ok=True)
    records, order = domain_records(args.seed)
    n_day1 = round(args.day1_fraction * len(records))
    rest = order[n_day1:]
    bounds = [round(k * len(rest) / args.drops) for k in range(args.drops + 1)]
    parts = [sorted(order[:n_day1])] + [sorted(rest[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    env = round_env(work / "repo" / "mlflow.db")
    saved = work / "rows.json"
    rows = json.loads(saved.read_text(encoding="utf-8")) if args.resume and saved.exists() else []
    done = {r["day"] for r in rows}
    plan = [(f"day{k + 1}", part) for k, part in enumerate(parts)] + [("release", [])]
    try:
        if not done:
            write_part(incoming, 0, records, parts[0])
            make_repo(work, incoming)
        repo = work / "repo"
        for k, (day, part) in enumerate(plan):
            if day in done:
                continue
            if part and k > 0:
                write_part(incoming, k, records, part)
            print(
                f"{day}: {len(part)} {DOMAIN} pages arrive" if part else f"{day}: release-lm, then a round", flush=True
            )
            rows.append({"day": day, "new_docs": len(part), **run_day(repo, env, release=day == "release")})
            saved.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
            print(json.dumps(rows[-1]), flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "domainlm.rounds", "stop"], cwd=work / "repo", capture_output=True)
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    release = rows[-1]
    daily = [r for r in rows if r["day"] not in ("day1", "release")]
    measured = next((r for r in daily if r["start_case"] in ("deployed_kept", "deployed_retrained")), None)
    allowance = None if measured is None else DAY2_BAR_S + RETRY_ALLOWANCE_S * measured["retries"]
    bars = {
        "daily_lm_stages_run": sum(r["lm_stages_run"] for r in daily),
        "first_day_with_a_deployed_model": None if measured is None else measured["day"],
        "its_wall_s": None if measured is None else measured["wall_s"],
        "its_allowance_s": allowance,
        "within_allowance": None if measured is None else measured["wall_s"] <= allowance,
        "daily_to_release_day_wall": {r["day"]: round(r["wall_s"] / release["wall_s"], 3) for r in daily},
    }
    settings = {
        "domain": DOMAIN,
        "day1_fraction": args.day1_fraction,
        "drops": args.drops,
        "seed": args.seed,
        "pages": len(records),
    }
    measure.write_csv(RESULTS / "round_days.csv", rows, settings=settings)
    out = RESULTS / "round_days.json"
    out.write_text(json.dumps({"rows": rows, "bars": bars, "settings": settings}, indent=2) + "\n", encoding="utf-8")
    measure.write_meta(out, settings=settings)
    print(json.dumps(bars, indent=2))
    return 0 if bars["within_allowance"] and not bars["daily_lm_stages_run"] else 1


if __name__ == "__main__":
    sys.exit(main())
