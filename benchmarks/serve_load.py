"""Load on the served classifier: ``mlflow models serve`` on 127.0.0.1, N requests at concurrency c, mixing valid
batches with invalid bodies (numbers, null, blank text, a DataFrame-form body, malformed JSON, a batch over the row
limit, a binary body). Writes ``benchmarks/results/serve_load.csv``, one row per ``--workers`` value, and its
``.meta.json`` sidecar (hardware, commit, date).

Figures per row: requests/s over the whole run, p50/p99 latency (ms) of the valid requests, counts by HTTP status,
the 5xx count, requests that got no answer at all (connection errors, timeouts), whether the server still answered
``/ping`` afterwards, and the resident memory (RSS, MB) of the server's whole process tree (the CLI, uvicorn and its
workers) before the load and after it.

The model served is ``--model-uri`` (e.g. ``models:/domain-lm-classifier@champion`` with ``MLFLOW_TRACKING_URI``
set) or, by default, a stand-in built here: a Qwen2 sequence classifier of the pipeline's sizes (``base_model.model``
params: hidden 256, 4 layers; ``classifier.max_length``), with a BPE tokenizer trained on synthetic Korean text and
untrained weights, registered through the project's own :func:`domainlm.classify.registry.log_and_register` in a
temporary SQLite store. Latency depends on the shapes, not on the weights' values.

Bounded: every request has a client timeout, the run sends exactly N requests, the server listens on 127.0.0.1 only
and is stopped at the end. Run it alone on the machine: other CPU work moves the latencies.

    python benchmarks/serve_load.py --requests 2000 --concurrency 16 --workers 1 2 --timeouts 60 1
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from measure import write_meta  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve_load.csv"
MODEL_NAME = "domain-lm-classifier"
CLASSES = ["law", "bill", "faq", "calc", "writer", "impress"]
VOCAB = [
    "대한민국",
    "국민",
    "헌법",
    "법률",
    "권리",
    "의무",
    "국회",
    "데비안",
    "패키지",
    "설치",
    "커널",
    "셀",
    "수식",
    "차트",
    "문서",
    "서식",
    "스타일",
    "슬라이드",
    "의안",
    "위원회",
    "심사",
    "개정",
    "조항",
    "시행",
]
ENDINGS = ["을 선택합니다.", "은 보장된다.", "에 관한 질문입니다.", "를 확인하십시오.", "이 필요합니다."]
#: invalid bodies sent in the mix, by name (each must get a 4xx)
INVALID_BODIES = {
    "number": b'{"inputs": [12345]}',
    "null": b'{"inputs": ["\xed\x97\x8c\xeb\xb2\x95", null]}',
    "blank": b'{"inputs": ["   "]}',
    "dataframe_records": b'{"dataframe_records": [{"text": "\xed\x97\x8c\xeb\xb2\x95"}]}',
    "malformed_json": b'{"inputs": ["',
    "binary": bytes(range(256)) * 8,
}


def korean_text(rng: random.Random, sentences: int) -> str:
    return " ".join(f"{rng.choice(VOCAB)} {rng.choice(VOCAB)}{rng.choice(ENDINGS)}" for _ in range(sentences))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_stand_in(work: Path, params: dict) -> str:
    """Register a stand-in classifier of the pipeline's sizes in ``work/mlflow.db``; return its tracking URI."""
    import mlflow

    from domainlm.classify import registry
    from domainlm.classify.model import load_sequence_classifier
    from domainlm.lm import pretrain

    rng = random.Random(0)
    base = {**params["base_model"], "train": {**params["base_model"]["train"], "steps": 1, "warmup_steps": 0}}
    texts = {"all": [korean_text(rng, 20) for _ in range(400)]}
    lm, tokenizer, _ = pretrain.build(texts, base)
    lm_dir = pretrain.save_hf_folder(lm, tokenizer, work / "lm")
    model, tok = load_sequence_classifier(lm_dir, CLASSES)
    model_dir = work / "classifier"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serve_load")
    serving = {"max_length": int(params["classifier"]["max_length"]), **(params["classifier"].get("serving") or {})}
    with mlflow.start_run():
        registry.log_and_register(
            mlflow,
            model_dir,
            model_name=MODEL_NAME,
            alias=registry.CHAMPION,
            tags={"stand_in": "untrained, pipeline sizes"},
            serving_config=serving,
        )
    return uri


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, MB."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def request(port: int, body: bytes, timeout: float) -> tuple[int, float]:
    """POST ``body`` to /invocations; return (status, seconds). Status 0: no answer (connection error, timeout)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0
    except OSError:
        return 0, time.perf_counter() - t0
    finally:
        conn.close()


def ping(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/ping")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def run_load(
    model_uri: str,
    env: dict,
    *,
    workers: int,
    timeout_s: int,
    n_requests: int,
    concurrency: int,
    invalid_fraction: float,
    batch_rows: int,
    seed: int,
    log_path: Path,
) -> dict:
    port = free_port()
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                "mlflow",
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "--workers",
                str(workers),
                "--timeout",
                str(timeout_s),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not ping(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        rng = random.Random(seed)
        warm = json.dumps({"inputs": [korean_text(rng, 8) for _ in range(batch_rows)]}, ensure_ascii=False).encode()
        for _ in range(4 * workers):  # every worker loads its model on start; warm each one
            request(port, warm, 60)
        rss_before = tree_rss_mb(server.pid)
        bodies = []
        for _ in range(n_requests):
            if rng.random() < invalid_fraction:
                name = rng.choice(sorted(INVALID_BODIES) + ["rows_over_limit"])
                body = (
                    json.dumps({"inputs": ["헌법"] * 1000}).encode()
                    if name == "rows_over_limit"
                    else INVALID_BODIES[name]
                )
                bodies.append((False, body))
            else:
                texts = [korean_text(rng, rng.randint(3, 30)) for _ in range(batch_rows)]
                bodies.append((True, json.dumps({"inputs": texts}, ensure_ascii=False).encode()))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda vb: (vb[0], *request(port, vb[1], timeout_s + 30)), bodies))
        wall = time.perf_counter() - t0
        alive = ping(port) and server.poll() is None
        rss_after = tree_rss_mb(server.pid) if server.poll() is None else float("nan")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    statuses = [s for _, s, _ in results]
    valid_ms = np.array([dt * 1000 for ok, s, dt in results if ok and s == 200])
    return {
        "workers": workers,
        "timeout_s": timeout_s,
        "requests": n_requests,
        "concurrency": concurrency,
        "batch_rows": batch_rows,
        "invalid_fraction": invalid_fraction,
        "valid_sent": sum(ok for ok, _, _ in results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(n_requests / wall, 1),
        "valid_p50_ms": round(float(np.percentile(valid_ms, 50)), 1) if len(valid_ms) else None,
        "valid_p99_ms": round(float(np.percentile(valid_ms, 99)), 1) if len(valid_ms) else None,
        "status_200": statuses.count(200),
        "status_400": statuses.count(400),
        "status_other_4xx": sum(400 < s < 500 for s in statuses),
        "status_5xx": sum(s >= 500 for s in statuses),
        "no_answer": statuses.count(0),
        "valid_not_200": sum(ok and s != 200 for ok, s, _ in results),
        "invalid_not_4xx": sum((not ok) and not 400 <= s < 500 for ok, s, _ in results),
        "server_alive_after": int(alive),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--timeouts",
        type=int,
        nargs="+",
        default=[60],
        help="mlflow models serve --timeout values (s); every (workers, timeout) pair gets a row",
    )
    ap.add_argument("--invalid-fraction", type=float, default=0.3)
    ap.add_argument("--batch-rows", type=int, default=4, help="texts per valid request")
    ap.add_argument(
        "--model-uri",
        default=None,
        help="serve this model (MLFLOW_TRACKING_URI from the environment) instead of the stand-in",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        work = Path(tmp)
        model_uri = args.model_uri
        if model_uri is None:
            env["MLFLOW_TRACKING_URI"] = build_stand_in(work, params)
            model_uri = f"models:/{MODEL_NAME}@champion"
        for workers, timeout_s in [(w, t) for t in args.timeouts for w in args.workers]:
            row = run_load(
                model_uri,
                env,
                workers=workers,
                timeout_s=timeout_s,
                n_requests=args.requests,
                concurrency=args.concurrency,
                invalid_fraction=args.invalid_fraction,
                batch_rows=args.batch_rows,
                seed=args.seed,
                log_path=work / f"serve_{workers}_{timeout_s}.log",
            )
            row["model"] = "stand-in (pipeline sizes, untrained)" if args.model_uri is None else args.model_uri
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".csv.tmp")
    with tmp_out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp_out, args.out)
    write_meta(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
