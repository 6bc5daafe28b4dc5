"""Serving (seed 003's deployment): the registered champion served by the real ``mlflow models serve`` on a free
127.0.0.1 port, offline (``--env-manager local``): Korean texts get a label and every class's probability; bad
input gets HTTP 400 with a message naming the problem, and the server keeps answering."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from classifier_fixtures import CLASSES, DOMAINS, build_tiny_lm, classifier_params, labelled_docs, write_labelled_splits
from conftest import free_port
from domainlm.common.tracking import mlflow_run
from stages import train_classifier

pytestmark = pytest.mark.slow
MAX_BATCH_ROWS = classifier_params()["serving"]["max_batch_rows"]


def post(url: str, payload, *, content_type: str = "application/json") -> tuple[int, dict]:
    """POST ``payload`` (JSON-encoded unless bytes); return (HTTP status, decoded JSON body)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode("utf-8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Register a tiny classifier as champion in a sqlite store, then serve ``models:/…@champion``. Yields the base URL."""
    root = tmp_path_factory.mktemp("serving")
    split_dir, labels_path = write_labelled_splits(root)
    lm_dir = build_tiny_lm(root / "lm")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cwd = os.getcwd()
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(root)
    try:
        cfg = classifier_params()
        with mlflow_run("train_classifier", cfg) as ml:
            metrics = train_classifier.run(
                DOMAINS, cfg, ml, split_dir=split_dir, labels_path=labels_path, lm_dir=lm_dir,
                out_dir=root / "models" / "classifier", token_stats_json=root / "metrics" / "token_stats.json",
                confusion_csv=root / "plots" / "c.csv", baseline_confusion_csv=root / "plots" / "b.csv",
                alerts_json=root / "metrics" / "alerts.json")
        assert metrics["registry"]["champion"] == 1
    finally:
        os.chdir(cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri

    port = free_port()
    log = (root / "serve.log").open("w")
    # served from another folder: the model carries its code (code_paths) and needs nothing from the repo
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/domain-lm-classifier@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=tmp_path_factory.mktemp("elsewhere"), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited {proc.returncode}:\n{(root / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /ping in 120 s:\n{(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the uvicorn worker it started share this session
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def assert_still_answers(url: str) -> None:
    status, body = post(url + "/invocations", {"dataframe_records": [{"text": "국회 법률 헌법을 확인하십시오."}]})
    assert status == 200 and body["predictions"][0]["label"] in CLASSES


def test_korean_texts_get_a_label_and_every_class_probability(server):
    texts = [labelled_docs(label, 1, "serve")[0] for label in CLASSES]
    status, body = post(server + "/invocations", {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}})
    assert status == 200
    predictions = body["predictions"]
    assert len(predictions) == len(texts)
    for p in predictions:
        assert p["label"] in CLASSES and set(p["probabilities"]) == set(CLASSES)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert p["score"] == pytest.approx(max(p["probabilities"].values())) and p["probabilities"][p["label"]] == p["score"]
    status, body = post(server + "/invocations", {"inputs": {"text": texts[:2]}})  # the tensor-style form too
    assert status == 200 and len(body["predictions"]) == 2


@pytest.mark.parametrize("payload, message", [
    ({"dataframe_records": [{"body": "헌법"}]}, "missing inputs ['text']"),
    ({"dataframe_records": [{"text": 42}]}, "text"),
    ({"dataframe_records": [{"text": "헌법"}, {"text": 42}]}, "row 1: 'text' must be a string, got int"),
    ({"dataframe_records": [{"text": "헌법"}, {"text": ""}]}, "row 1: 'text' is empty"),
    ({"dataframe_records": [{"text": "헌법"}, {"text": None}]}, "row 1: 'text' is missing (null)"),
    ({"dataframe_records": [{"text": "헌법"}] * (MAX_BATCH_ROWS + 1)},
     f"{MAX_BATCH_ROWS + 1} rows, over the limit of {MAX_BATCH_ROWS} rows per request"),
], ids=["missing-text-column", "non-string", "non-string-in-a-batch", "empty-string", "null", "batch-over-limit"])
def test_bad_input_gets_a_400_with_a_clear_message_and_the_server_keeps_answering(server, payload, message):
    status, body = post(server + "/invocations", payload)
    assert status == 400
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and message in body["message"]
    assert_still_answers(server)


def test_malformed_json_is_refused_and_the_server_keeps_answering(server):
    status, body = post(server + "/invocations", b'{"dataframe_records": [{"text": ')
    assert 400 <= status < 500 and body["error_code"] in ("BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_PARAMETER_VALUE")
    assert_still_answers(server)
