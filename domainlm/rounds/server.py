"""Serve ``models/deployed`` with ``mlflow models serve`` and swap servers blue/green without dropping requests.

The served model is exactly the DVC-tracked folder: :func:`build_pyfunc` saves ``models/deployed/model`` as an MLflow
pyfunc (the same "models from code" :class:`domainlm.classify.serving.TextClassifier` the registry logs) under
``.cache/serve/models/v<version>-<hash>/`` (git-ignored, rebuilt from the folder's :func:`tree_sha256`), and
``mlflow models serve --env-manager local`` serves that path.

A deploy (:func:`deploy`) starts the new server on the other port of the pair (blue/green), waits until ``GET /ping``
answers 200, records it in ``.cache/serve/server.json`` (what clients and a front proxy read), then stops the old
server with SIGTERM: uvicorn stops accepting, finishes the requests in flight, and exits. ``mlflow models serve``
resolves its model once, at start (a ``models:/name@alias`` URI too), so a new model always means a new process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from domainlm.classify.deployed import MANIFEST, read_manifest, tree_sha256
from domainlm.common.atomic import alive, atomic_path, write_json

log = logging.getLogger(__name__)

SERVE_DIR = Path(".cache/serve")
STATE_FILE = SERVE_DIR / "server.json"
DEFAULT_PORTS = (5077, 5078)


def build_pyfunc(
    deployed_dir: str | os.PathLike, out_root: str | os.PathLike, serving_config: Mapping[str, Any]
) -> Path:
    """Save ``<deployed_dir>/model`` as an MLflow pyfunc model folder under ``out_root`` (once per deployed content).

    Returns:
        ``<out_root>/v<version>-<first 12 hex of tree_sha256(deployed_dir)>``.

    Raises:
        ValueError: nothing is deployed (bootstrap manifest) or the manifest is malformed.
    """
    import mlflow.pyfunc

    from domainlm.classify.registry import pip_requirements
    from domainlm.classify.serving import ARTIFACT_KEY, INPUT_EXAMPLE_TEXT, SERVED_MODEL_FILE

    manifest = read_manifest(deployed_dir)
    if manifest is None:
        raise ValueError(f"{deployed_dir}: nothing is deployed yet ({MANIFEST} has version null); run a round first")
    target = Path(out_root) / f"v{manifest['version']}-{tree_sha256(deployed_dir)[:12]}"
    if (target / "MLmodel").is_file():
        return target
    code_root = Path(__file__).resolve().parents[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve_code_") as tmp, atomic_path(target, is_dir=True) as out:
        package = Path(tmp) / "domainlm"
        shutil.copytree(code_root, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.rmdir()  # save_model wants to create the folder itself
        mlflow.pyfunc.save_model(
            path=str(out),
            python_model=str(SERVED_MODEL_FILE),
            artifacts={ARTIFACT_KEY: str(Path(deployed_dir) / "model")},
            code_paths=[str(package)],
            # no signature argument: MLflow infers it from predict's type hint (list[str], domainlm.classify.serving)
            model_config=dict(serving_config),
            input_example=[INPUT_EXAMPLE_TEXT],
            pip_requirements=pip_requirements(),
            metadata={"deployed": {k: manifest[k] for k in ("registry_name", "version", "run_id", "test_macro_f1")}},
        )
    return target


def read_state(state_file: str | os.PathLike = STATE_FILE) -> dict[str, Any] | None:
    """The running server's record (``pid``, ``host``, ``port``, ``url``, ``model_path``, ``version``,
    ``started``), or ``None`` when there is none or its process is gone."""
    path = Path(state_file)
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    return state if alive(int(state["pid"])) else None


def start_server(
    model_path: str | os.PathLike,
    *,
    host: str,
    port: int,
    log_path: str | os.PathLike,
    workers: int = 1,
    timeout_s: int = 60,
) -> subprocess.Popen:
    """Start ``mlflow models serve -m <model_path> --env-manager local`` in its own session (process group), its
    output appended to ``log_path``. Returns at once; :func:`wait_ready` waits for it."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_cli),
        "models",
        "serve",
        "-m",
        str(Path(model_path).resolve()),
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "--workers",
        str(workers),
        "--timeout",
        str(timeout_s),
    ]
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )


def ping(url: str, timeout_s: float = 2.0) -> bool:
    """``GET <url>/ping`` answered 200."""
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Poll ``/ping`` until it answers 200.

    Raises:
        RuntimeError: the server exited, or did not answer within ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the model server exited with {proc.returncode} before {url}/ping answered")
        if ping(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url}/ping did not answer 200 within {timeout_s:.0f}s")


def stop_server(pid: int, *, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group (``mlflow models serve`` and its uvicorn), SIGKILL after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when this process started it (else it lingers as a zombie)
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    log.warning("server %d ignored SIGTERM for %.0fs; killing it", pid, grace_s)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def deploy(
    deployed_dir: str | os.PathLike,
    serving_config: Mapping[str, Any],
    *,
    host: str = "127.0.0.1",
    ports: Sequence[int] = DEFAULT_PORTS,
    serve_dir: str | os.PathLike = SERVE_DIR,
    workers: int = 1,
    timeout_s: int = 60,
    ready_timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Serve ``deployed_dir``: start the new server on the port of ``ports`` the old one does not use, wait for
    ``/ping``, record it in ``<serve_dir>/server.json``, then stop the old server. A server already serving this
    exact content is left running.

    Returns:
        The new state record (``pid``, ``host``, ``port``, ``url``, ``model_path``, ``version``, ``started``,
        ``replaced_pid``).

    Raises:
        ValueError: nothing deployed; ``ports`` does not hold two distinct ports.
        RuntimeError: the new server did not come up (it is stopped; the old one keeps serving).
    """
    if len(set(ports)) != 2:
        raise ValueError(f"ports must be two distinct ports (blue/green), got {list(ports)}")
    serve_dir = Path(serve_dir)
    state_file = serve_dir / "server.json"
    model_path = build_pyfunc(deployed_dir, serve_dir / "models", serving_config)
    old = read_state(state_file)
    if old and old["model_path"] == str(model_path.resolve()) and ping(old["url"]):
        log.info("already serving %s at %s (pid %d)", model_path.name, old["url"], old["pid"])
        return {**old, "replaced_pid": None}
    port = next(p for p in ports if not old or int(p) != int(old["port"]))
    url = f"http://{host}:{port}"
    proc = start_server(
        model_path,
        host=host,
        port=port,
        log_path=serve_dir / f"server-{port}.log",
        workers=workers,
        timeout_s=timeout_s,
    )
    try:
        wait_ready(url, proc, ready_timeout_s)
    except BaseException:
        stop_server(proc.pid, grace_s=5)
        raise
    manifest = read_manifest(deployed_dir) or {}
    state = {
        "pid": proc.pid,
        "host": host,
        "port": port,
        "url": url,
        "model_path": str(model_path.resolve()),
        "version": manifest.get("version"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(state_file, state)
    if old:
        stop_server(int(old["pid"]))
        log.info("stopped the old server (pid %d, %s)", old["pid"], old["url"])
    log.info("serving deployed v%s at %s (pid %d)", state["version"], url, proc.pid)
    return {**state, "replaced_pid": old["pid"] if old else None}


def stop(serve_dir: str | os.PathLike = SERVE_DIR) -> int | None:
    """Stop the recorded server, if any; return its pid."""
    state = read_state(Path(serve_dir) / "server.json")
    if state is None:
        return None
    stop_server(int(state["pid"]))
    (Path(serve_dir) / "server.json").unlink(missing_ok=True)
    return int(state["pid"])
