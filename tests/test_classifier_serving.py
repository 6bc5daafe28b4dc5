"""Serving (the deployed model's endpoint; strict input): the registered champion served by the real
``mlflow models serve`` on a free 127.0.0.1 port, offline (``--env-manager local``): Korean texts get a label and
every class's probability; every row that is not a non-empty string (a number, null, NaN, a boolean, a list, an
object, blank text), a text or request over its limit, a DataFrame-form request, malformed JSON and a binary body
get HTTP 400 with a message naming the problem, and the server keeps answering."""

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
#: small limits so that the tests reach them with small requests
MAX_TEXT_CHARS, MAX_REQUEST_BYTES = 400, 3000


def post(url: str, payload, *, content_type: str = "application/json") -> tuple[int, dict]:
    """POST ``payload`` (JSON-encoded unless bytes or str); return (HTTP status, decoded JSON body)."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    body = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode("utf-8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Register a tiny classifier as champion in a sqlite store, then serve ``models:/…@champion``. Yields the base
    URL."""
    root = tmp_path_factory.mktemp("serving")
    split_dir, labels_path = write_labelled_splits(root)
    lm_dir = build_tiny_lm(root / "lm")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cwd = os.getcwd()
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(root)
    try:
        cfg = classifier_params(serving={"max_text_chars": MAX_TEXT_CHARS, "max_request_bytes": MAX_REQUEST_BYTES})
        with mlflow_run("train_classifier", cfg) as ml:
            metrics = train_classifier.run(
                DOMAINS,
                cfg,
                ml,
                split_dir=split_dir,
                labels_path=labels_path,
                lm_dir=lm_dir,
                out_dir=root / "models" / "classifier",
                token_stats_json=root / "metrics" / "token_stats.json",
                confusion_csv=root / "plots" / "c.csv",
                baseline_confusion_csv=root / "plots" / "b.csv",
                alerts_json=root / "metrics" / "alerts.json",
            )
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
    proc = subprocess.Popen(
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/domain-lm-classifier@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=tmp_path_factory.mktemp("elsewhere"),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow models serve exited {proc.returncode}:\n{(root / 'serve.log').read_text()[-3000:]}"
                )
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
    status, body = post(url + "/invocations", {"inputs": ["국회 법률 헌법을 확인하십시오."]})
    assert status == 200 and body["predictions"][0]["label"] in CLASSES


def test_the_signature_declares_a_list_of_required_strings(server):
    from mlflow.models import get_model_info

    info = get_model_info("models:/domain-lm-classifier@champion")
    assert info.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert info.signature._is_signature_from_type_hint


def test_korean_texts_get_a_label_and_every_class_probability(server):
    texts = [labelled_docs(label, 1, "serve")[0] for label in CLASSES]
    status, body = post(server + "/invocations", {"inputs": texts})
    assert status == 200
    predictions = body["predictions"]
    assert len(predictions) == len(texts)
    for p in predictions:
        assert p["label"] in CLASSES and set(p["probabilities"]) == set(CLASSES)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert (
            p["score"] == pytest.approx(max(p["probabilities"].values()))
            and p["probabilities"][p["label"]] == p["score"]
        )
    # a text at the character limit is served whole
    status, body = post(server + "/invocations", {"inputs": ["헌" * MAX_TEXT_CHARS]})
    assert status == 200 and len(body["predictions"]) == 1


TYPE_REFUSED = "Failed to validate data against type hint `list[str]`"


@pytest.mark.parametrize(
    "payload, messages",
    [
        ('{"inputs": [12345]}', [TYPE_REFUSED, "('12345', 'Expected type str, but got int')"]),
        ('{"inputs": ["헌법", null]}', [TYPE_REFUSED, "('None', 'Expected type str, but got NoneType')"]),
        ('{"inputs": ["헌법", NaN]}', [TYPE_REFUSED, "('nan', 'Expected type str, but got float')"]),
        ('{"inputs": [1.5]}', [TYPE_REFUSED, "Expected type str, but got float"]),
        ('{"inputs": [true]}', [TYPE_REFUSED, "('True', 'Expected type str, but got bool')"]),
        ('{"inputs": [["헌법"]]}', [TYPE_REFUSED, "Expected type str, but got list"]),
        ('{"inputs": [{"text": "헌법"}]}', [TYPE_REFUSED, "Expected type str, but got dict"]),
        ('{"inputs": "헌법"}', ["Expected list, but got str"]),
        ('{"inputs": {"text": ["헌법"]}}', ["Expected list, but got dict"]),
        ('{"inputs": []}', ["the batch has no rows"]),
        ('{"inputs": ["헌법", ""]}', ["row 1: the text is empty"]),
        ('{"inputs": ["헌법", " \\n\\t\\u3000"]}', ["row 1: the text is empty"]),
        (
            json.dumps({"inputs": ["헌법"] * (MAX_BATCH_ROWS + 1)}),
            [f"{MAX_BATCH_ROWS + 1} rows, over the limit of {MAX_BATCH_ROWS} rows per request"],
        ),
        (
            json.dumps({"inputs": ["헌법", "헌" * (MAX_TEXT_CHARS + 1)]}),
            [
                f"row 1: the text has {MAX_TEXT_CHARS + 1} characters, "
                f"over the limit of {MAX_TEXT_CHARS} characters per text"
            ],
        ),
        (json.dumps({"inputs": ["헌" * 300] * 4}), [f"row 3: the request's texts pass {MAX_REQUEST_BYTES} bytes"]),
        ('{"dataframe_records": [{"text": "헌법"}]}', ["must be a dictionary with 'inputs' key"]),
        ('{"dataframe_split": {"columns": ["text"], "data": [[12345]]}}', ["must be a dictionary with 'inputs' key"]),
        ('{"instances": [12345]}', ["must be a dictionary with 'inputs' key"]),
    ],
    ids=[
        "number",
        "null",
        "nan",
        "float",
        "boolean",
        "list",
        "object",
        "bare-string",
        "column-dict",
        "no-rows",
        "empty",
        "blank",
        "rows-over-limit",
        "text-over-limit",
        "bytes-over-limit",
        "dataframe-records",
        "dataframe-split",
        "instances",
    ],
)
def test_bad_input_gets_a_400_naming_the_problem_and_the_server_keeps_answering(server, payload, messages):
    status, body = post(server + "/invocations", payload)
    assert status == 400, body
    assert body["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    for message in messages:
        assert message in body["message"]
    assert_still_answers(server)


@pytest.mark.parametrize(
    "payload",
    [b'{"inputs": ["', b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 100, b"", b"[1, 2]"],
    ids=["truncated-json", "binary", "empty-body", "json-list"],
)
def test_malformed_bodies_are_refused_and_the_server_keeps_answering(server, payload):
    status, body = post(server + "/invocations", payload)
    assert status == 400 and body["error_code"] in ("BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_PARAMETER_VALUE")
    assert_still_answers(server)
